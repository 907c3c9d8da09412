//! Stable Diffusion's variational autoencoder (diffusers `AutoencoderKL`) on Burn.
//!
//! [`AutoencoderKl::load`] reads a published `vae/` folder (config.json +
//! diffusion_pytorch_model(.fp16).safetensors); [`AutoencoderKl::encode`] gives the latent
//! mean and log-variance, [`AutoencoderKl::decode`] turns unscaled latents into pixels.
//! Multiply latents by `scaling_factor` from the config before the UNet, divide after.
//!
//! Its ResNet blocks (`ResnetBlock2D`, `Downsample2D`, `Upsample2D`) are the `model-layers`
//! crate's, shared with the UNet.
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! let vae = sd_vae::AutoencoderKl::<Flex>::load("sd/vae".as_ref(), &FlexDevice)?;
//! let cfg = sd_vae::AutoencoderKlConfig::load("sd/vae".as_ref())?;
//! println!("latents are {}x smaller, scaled by {}", vae.downscale_factor(), cfg.scaling_factor);
//! # Ok::<(), model_io::Error>(())
//! ```

mod attention;
mod config;
pub mod ldm;
mod vae;

pub use attention::SpatialSelfAttention;
pub use config::AutoencoderKlConfig;
pub use vae::{AutoencoderKl, Decoder, Encoder};
