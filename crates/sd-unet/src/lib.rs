//! Stable Diffusion's denoising UNet (diffusers `UNet2DConditionModel`, SD 1.x, 2.x and SDXL) on
//! Burn, with LoRA adapters on the attention projections.
//!
//! * [`UNetConfig`] reads the `unet/config.json` as published (per-block head counts, linear or
//!   convolutional projections, upcast attention, any cross-attention width);
//! * [`UNet2DConditionModel::load`] reads the weights (f32 or fp16, single or sharded);
//! * [`UNet2DConditionModel::forward`] takes a context of any length: 77 text tokens plus
//!   however many visual tokens; SDXL's UNet also takes [`AddedConditioning`] (pooled text
//!   embeds and time ids) through [`UNet2DConditionModel::forward_with`];
//! * [`lora`] attaches zero-initialised adapters, reads and writes them in the layout
//!   diffusers' `load_lora_weights` reads.
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! let mut unet = sd_unet::UNet2DConditionModel::<Flex>::load("sd/unet".as_ref(), &FlexDevice)?;
//! sd_unet::lora::attach(&mut unet, 4, 4.0, &mut seeded::SplitMix64::new(0)); // output unchanged until trained
//! # Ok::<(), model_io::Error>(())
//! ```

mod attention;
mod blocks;
mod config;
mod embeddings;
pub mod export;
mod keys;
pub mod ldm;
pub mod lora;
mod lora_io;
mod unet;

pub use attention::{Attention, BasicTransformerBlock, Transformer2D, TransformerSpec};
pub use config::{PerBlock, UNetConfig};
pub use embeddings::{f32_tensor, timestep_embedding, AddedConditioning};
pub use unet::UNet2DConditionModel;
