//! CLIP text side of Stable Diffusion: the BPE tokenizer and the text encoder.
//!
//! * [`ClipTokenizer`] reads a tokenizer folder exactly as the SD repositories publish it
//!   (`vocab.json` + `merges.txt`, pad token from `special_tokens_map.json`) or a
//!   `tokenizer.json`, and gives the same ids as transformers' `CLIPTokenizer`.
//! * [`ClipTextModel`] loads a transformers `CLIPTextModel` folder and computes
//!   `last_hidden_state`.
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! use clip_text::{ClipTextModel, ClipTokenizer};
//! let tok = ClipTokenizer::from_dir("sd/tokenizer".as_ref())?;
//! let enc = ClipTextModel::<Flex>::load("sd/text_encoder".as_ref(), &FlexDevice)?;
//! let emb = enc.forward(enc.ids_tensor(&[tok.encode("a watercolor fox")?]))?;
//! # Ok::<(), model_io::Error>(())
//! ```

pub mod ldm;
mod model;
mod tokenizer;

pub use model::{
    key_prefix, ClipTextConfig, ClipTextModel, ClipTextModelWithProjection, ProjectedOutputs, TextOutputs,
};
pub use tokenizer::ClipTokenizer;
