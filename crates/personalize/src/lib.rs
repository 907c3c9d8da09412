//! The personalisation pipeline: generation (with or without a visual prompt) and concept
//! folders, composed from the stage crates (`clip-text`, `sd-unet`, `sd-vae`, `scheduler`,
//! `q-aligner`).
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! use personalize::{GenerateOptions, Pipeline};
//! let pipe = Pipeline::<Flex>::load("sd-v1-5".as_ref(), &FlexDevice)?;
//! let opts = GenerateOptions { prompt: "a watercolor fox".into(), steps: 25, ..Default::default() };
//! for (i, img) in pipe.generate(&opts, None, None, &mut |_, _| {})?.iter().enumerate() {
//!     personalize::write_png(format!("{i:04}.png").as_ref(), img, &[("prompt", opts.prompt.clone())])?;
//! }
//! # Ok::<(), model_io::Error>(())
//! ```

mod concept;
mod image_out;
mod pipeline;
pub mod train;

pub use concept::{Concept, ConceptInfo};
pub use image_out::{read_png, write_png, RgbImage};
pub use pipeline::{GenerateOptions, Pipeline, PipelineParts, VisualPrompt};
