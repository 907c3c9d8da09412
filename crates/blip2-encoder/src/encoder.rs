//! The frozen BLIP-2 image encoder: vision transformer, then Q-Former.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use model_io::{Checkpoint, Error, Result, Weights};

use crate::config::Blip2Config;
use crate::preprocess::ImageProcessor;
use crate::qformer::QFormer;
use crate::vision::VisionModel;

/// Images encoded per forward pass by [`Blip2Encoder::encode_images`].
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// [`Blip2Encoder::encode_images`] shows a progress bar (on a terminal) above this many images.
pub const PROGRESS_THRESHOLD: usize = 4;

/// Prefixes of checkpoint tensors the encoder never reads (they stay on disk): the language
/// model and its projection (Blip2Model, Blip2ForConditionalGeneration), and the retrieval
/// heads and Q-Former text embeddings (Blip2ForImageTextRetrieval). The Q-Former's text-branch
/// feed-forward (`qformer.encoder.layer.N.intermediate` / `.output`) is skipped per layer.
pub const SKIPPED_PREFIXES: &[&str] = &[
    "language_model.",
    "language_projection.",
    "vision_projection.",
    "text_projection.",
    "itm_head.",
    "embeddings.",
    "qformer.embeddings.",
];

/// BLIP-2's frozen image side: the EVA vision transformer and the Q-Former, giving the query
/// output `[B, Q, 768]` (Q = `num_query_tokens`, 32 in the published checkpoints) that
/// `Blip2Model.get_qformer_features` returns, and the image embeddings it attends to.
///
/// Loads the transformers checkpoints as published (Blip2Model, Blip2ForConditionalGeneration,
/// Blip2ForImageTextRetrieval; single or sharded safetensors, f32/f16/bf16). The language model
/// and the retrieval heads are never read from disk.
///
/// ```no_run
/// use burn_flex::{Flex, FlexDevice};
/// use blip2_encoder::Blip2Encoder;
/// let enc = Blip2Encoder::<Flex>::load("blip2-opt-2.7b".as_ref(), &FlexDevice)?;
/// let queries = enc.encode_images(&["dog1.jpg".into(), "dog2.png".into()])?; // [2, 32, 768]
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct Blip2Encoder<B: Backend> {
    vision: VisionModel<B>,
    qformer: QFormer<B>,
    image_size: usize,
    #[module(skip)]
    processor: ImageProcessor,
}

impl<B: Backend> Blip2Encoder<B> {
    /// Loads `dir/config.json`, the weights (`model.safetensors` or
    /// `model.safetensors.index.json`, or their `.fp16` variants) and
    /// `dir/preprocessor_config.json` when present.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg = Blip2Config::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir, &["model"])?;
        // Say plainly what is wrong with a checkpoint holding only a vision model or a language
        // model, rather than naming the first Q-Former tensor that happens to be read.
        if !ckpt.names().any(|n| n.starts_with("qformer.")) {
            return Err(Error::MissingTensor {
                checkpoint: ckpt.name().into(),
                name: "qformer.layernorm.weight".into(),
                hint: " (the checkpoint has no Q-Former weights: no `qformer.*` tensors)".into(),
            });
        }
        let w = Weights::new(&ckpt, device);
        let mut enc = Self::from_weights(&cfg, &w)?;
        let text_branch: Vec<String> = (0..cfg.qformer_config.num_hidden_layers)
            .flat_map(|i| {
                [format!("qformer.encoder.layer.{i}.intermediate."), format!("qformer.encoder.layer.{i}.output.")]
            })
            .collect();
        let skip: Vec<&str> = SKIPPED_PREFIXES.iter().copied().chain(text_branch.iter().map(String::as_str)).collect();
        w.finish(&skip)?;
        let processor = ImageProcessor::load(dir, enc.image_size)?;
        enc.set_processor(processor)
            .map_err(|e| Error::Config { path: dir.join("preprocessor_config.json"), message: e.to_string() })?;
        Ok(enc)
    }

    /// Builds the encoder from weights under `w`, the root of a BLIP-2 checkpoint
    /// (`vision_model.*`, `query_tokens`, `qformer.*`), or from [`Weights::random`] for
    /// benchmarks. The image processor is BlipImageProcessor's default at the vision size.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// use blip2_encoder::{Blip2Config, Blip2Encoder};
    /// let enc = Blip2Encoder::<Flex>::from_weights(&Blip2Config::default(), &model_io::Weights::random(&FlexDevice))?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn from_weights(cfg: &Blip2Config, w: &Weights<B>) -> Result<Self> {
        cfg.check().map_err(Error::invalid)?;
        // Never trained: its layers lay their weights out for the backend and release the
        // mapped originals (`Weights::frozen`).
        let w = &w.frozen();
        let vision = VisionModel::load(&w.pp("vision_model"), &cfg.vision_config)?;
        let qformer = QFormer::load(w, &cfg.qformer_config, cfg.num_query_tokens, cfg.vision_config.hidden_size)?;
        let size = cfg.vision_config.image_size;
        Ok(Self { vision, qformer, image_size: size, processor: ImageProcessor::new(size) })
    }

    /// The side of the square images the vision model takes (224 for the published models).
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Number of query vectors per image (32 for the published models).
    pub fn num_query_tokens(&self) -> usize {
        self.qformer.num_queries()
    }

    /// Width of the query vectors (768 for the published models).
    pub fn hidden_size(&self) -> usize {
        self.qformer.hidden_size()
    }

    /// The image processor [`Blip2Encoder::encode_images`] uses.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Replaces the image processor; fails if it does not produce `image_size` squares.
    pub fn set_processor(&mut self, processor: ImageProcessor) -> Result<()> {
        let s = self.image_size;
        if processor.output_size() != (s, s) {
            return Err(Error::invalid(format!(
                "the image processor resizes to {}x{} but the vision model takes {s}x{s}",
                processor.height, processor.width
            )));
        }
        self.processor = processor;
        Ok(())
    }

    /// `pixel_values` `[B, 3, S, S]` to `(query_output [B, Q, D], image_embeds [B, N, Dv])`:
    /// the Q-Former's last hidden state and the vision model's last hidden state (after its
    /// post layer norm, as the Q-Former sees it). Fails on a wrong channel count or size.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        let [b, c, h, w] = pixel_values.dims();
        let s = self.image_size;
        if b == 0 || c != 3 || h != s || w != s {
            return Err(Error::invalid(format!(
                "pixel_values has shape [{b}, {c}, {h}, {w}]; the BLIP-2 vision model takes [B, 3, {s}, {s}] with B >= 1"
            )));
        }
        let image_embeds = self.vision.forward(pixel_values);
        let query_output = self.qformer.forward(image_embeds.clone());
        Ok((query_output, image_embeds))
    }

    /// Encodes image files to their query outputs `[N, Q, D]`, in the order given, with
    /// [`DEFAULT_BATCH_SIZE`] images per forward pass. See [`Blip2Encoder::encode_images_batched`].
    pub fn encode_images(&self, paths: &[PathBuf]) -> Result<Tensor<B, 3>> {
        self.encode_images_batched(paths, DEFAULT_BATCH_SIZE)
    }

    /// Encodes image files to their query outputs `[N, Q, D]`, in the order given.
    ///
    /// Files are decoded and resized in parallel (rayon) a group at a time, so memory stays
    /// bounded however many images there are; each group is encoded in batches of
    /// `batch_size`. Above [`PROGRESS_THRESHOLD`] images a progress bar is drawn on stderr
    /// (when it is a terminal). The first unreadable file (in `paths` order) fails the call,
    /// naming it.
    ///
    /// ```no_run
    /// # fn f(enc: &blip2_encoder::Blip2Encoder<burn_flex::Flex>) -> model_io::Result<()> {
    /// let dir = std::path::Path::new("photos");
    /// let entries = std::fs::read_dir(dir).map_err(|e| model_io::Error::Io { path: dir.into(), cause: e })?;
    /// let paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    /// let queries = enc.encode_images_batched(&paths, 16)?;
    /// # Ok(()) }
    /// ```
    pub fn encode_images_batched(&self, paths: &[PathBuf], batch_size: usize) -> Result<Tensor<B, 3>> {
        if paths.is_empty() {
            return Err(Error::invalid("no images to encode"));
        }
        let batch_size = batch_size.max(1);
        // Decode enough files at once to keep every thread busy, in whole batches.
        let group = batch_size * rayon::current_num_threads().div_ceil(batch_size).max(1);
        let bar = if paths.len() > PROGRESS_THRESHOLD {
            let style = ProgressStyle::with_template("encoding images {bar:30} {pos}/{len} [{elapsed} < {eta}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            ProgressBar::new(paths.len() as u64).with_style(style)
        } else {
            ProgressBar::hidden()
        };
        let device = self.qformer.device();
        let (h, w) = self.processor.output_size();
        let per = 3 * h * w;
        let mut outputs = Vec::with_capacity(paths.len().div_ceil(batch_size));
        for files in paths.chunks(group) {
            let (pixels, _) = self.processor.process(files)?;
            for chunk in pixels.chunks(batch_size * per) {
                let n = chunk.len() / per;
                let x = Tensor::<B, 4>::from_data(TensorData::new(chunk.to_vec(), [n, 3, h, w]), &device);
                outputs.push(self.forward(x)?.0);
                bar.inc(n as u64);
            }
        }
        bar.finish_and_clear();
        Ok(Tensor::cat(outputs, 0))
    }
}
