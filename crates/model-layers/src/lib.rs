//! The layers the model crates are built from, each loaded from checkpoint tensors through
//! [`model_io::Weights`] and in PyTorch's conventions:
//!
//! * [`nn`]: `Linear` (with the CPU's packed GEMM for frozen weights), `Conv2d`, `GroupNorm`,
//!   `LayerNorm`, `Embedding`;
//! * [`resnet`]: diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, which the VAE
//!   and the UNet share.
//!
//! Loading (files, keys, shapes, dtypes) is model-io's; this crate is what is built from it.
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! use model_io::{Checkpoint, Weights};
//! use model_layers::nn::Linear;
//!
//! let ckpt = Checkpoint::open_dir("text_encoder".as_ref(), &["model"])?;
//! let w = Weights::<Flex>::new(&ckpt, &FlexDevice);
//! let q = Linear::load(&w.pp("text_model.encoder.layers.0.self_attn.q_proj"), 768, 768, true)?;
//! # Ok::<(), model_io::Error>(())
//! ```

pub mod nn;
pub mod resnet;
