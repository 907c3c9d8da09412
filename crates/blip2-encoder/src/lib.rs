//! BLIP-2's frozen image encoder on Burn: image preprocessing, the EVA vision transformer and
//! the Q-Former, exact against transformers.
//!
//! * [`Blip2Config`] reads a transformers BLIP-2 `config.json` (`vision_config`,
//!   `qformer_config`, `num_query_tokens`); its default is the published ViT-g + Q-Former.
//! * [`Blip2Encoder`] loads `Blip2Model`, `Blip2ForConditionalGeneration` or
//!   `Blip2ForImageTextRetrieval` checkpoints (single or sharded safetensors) without reading
//!   the language model, and computes the query output `[B, Q, 768]` of
//!   `Blip2Model.get_qformer_features` — the visual prompt — and the image embeddings.
//! * [`ImageProcessor`] turns image files into `pixel_values` as `BlipImageProcessor` does
//!   (Pillow-exact bicubic resize, CLIP normalisation), applying EXIF orientation, with a
//!   [`MAX_PIXELS`] limit checked before decoding; many files are processed in parallel.
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! use blip2_encoder::Blip2Encoder;
//! let enc = Blip2Encoder::<Flex>::load("blip2-opt-2.7b".as_ref(), &FlexDevice)?;
//! let (pixels, shape) = enc.processor().process(&["dog.jpg".into()])?;
//! let x = burn::tensor::Tensor::<Flex, 4>::from_data(burn::tensor::TensorData::new(pixels, shape), &FlexDevice);
//! let (query_output, image_embeds) = enc.forward(x)?; // [1, 32, 768], [1, 257, 1408]
//! # Ok::<(), model_io::Error>(())
//! ```

mod config;
mod encoder;
mod preprocess;
mod qformer;
pub mod resample;
mod vision;

pub use config::{Blip2Config, Blip2QFormerConfig, Blip2VisionConfig};
pub use encoder::{Blip2Encoder, DEFAULT_BATCH_SIZE, PROGRESS_THRESHOLD, SKIPPED_PREFIXES};
pub use preprocess::{decode_rgb8, ImageProcessor, CLIP_MEAN, CLIP_STD, MAX_PIXELS};
