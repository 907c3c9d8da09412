//! The personalisation pipeline: generation (with or without a visual prompt) and concept
//! folders, composed from the stage crates (`clip-text`, `sd-unet`, `sd-vae`, `scheduler`,
//! `q-aligner`).
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! use personalize::{GenerateOptions, Pipeline};
//! let pipe = Pipeline::<Flex>::load("sd-v1-5".as_ref(), &FlexDevice)?;
//! let opts = GenerateOptions { prompt: "a watercolor fox".into(), steps: 25, ..Default::default() };
//! let settings = pipe.image_settings(&opts)?;
//! for (i, img) in pipe.generate(personalize::GenerateRequest::new(&opts))?.iter().enumerate() {
//!     let text = personalize::ImageSettings { image_index: i, ..settings.clone() }.png_text()?;
//!     personalize::write_png(format!("{i:04}.png").as_ref(), img, &text)?;
//! }
//! # Ok::<(), personalize::Error>(())
//! ```

pub mod check;
mod concept;
mod error;
mod export;
mod image_out;
pub mod interrupt;
mod lora;
pub mod memory;
mod metadata;
mod onnx_folder;
mod pipeline;
mod request;
mod single_file;
pub mod train;

pub use concept::{Concept, ConceptInfo, UnetChange, CONCEPT_VERSION};
pub use error::{Error, Result};

/// The concept's UNet LoRA in kohya's layout (`lora_unet_*`), which `train` writes next to
/// `unet_lora.safetensors` for A1111, ComfyUI and kohya's tools.
pub const KOHYA_LORA_FILE: &str = "unet_lora.kohya.safetensors";
pub use export::MergedModel;
pub use image_out::{check_png_text, read_png, read_png_text, write_png, RgbImage};
pub use lora::{merge_loras, LoraSpec, LoraSummary, LoraTarget};
pub use metadata::{model_name, scheduler_in_use, ImageSettings, PARAMETERS_KEY, SETTINGS_KEY};
pub use pipeline::{
    vae_dtype, Base, Batches, Conditioning, GenerateOptions, GenerateRequest, Pipeline, PipelineParts, SecondEncoder,
    VisualPrompt, DEFAULT_MAX_BATCH,
};
pub use single_file::{SingleFile, TextLayout};
