//! Personalisation training (`personalize train`): the aligner and, per [`UnetMode`], the UNet
//! (all weights, LoRA adapters, or none) on Burn's autodiff backend.
//!
//! What a step does, as diffusers' DreamBooth script with latents cached:
//!
//! 1. Once, before training: each image is cropped and resized to the resolution in
//!    `1 + augment` views (the centre crop of the shorter side, then random square crops of
//!    `[min_crop, 1]` of it, each mirrored with probability 1/2 when `flip`), and every view is
//!    encoded by the frozen VAE; the latent distribution (mean, std) of each view is kept on the
//!    host. The prompt's CLIP embeddings are computed once. The BLIP-2 queries of the images are
//!    given by the caller (`TrainData::queries`). None of these models is ever differentiated.
//! 2. Each step draws `batch` views uniformly, a latent from each view's distribution
//!    (`latent_dist.sample()`), Gaussian noise and a timestep in `[0, num_train_timesteps)`; the
//!    noisy latent and the regression target (epsilon or v, from the scheduler config) are
//!    computed on the host by `scheduler`'s DDPM training helpers.
//! 3. The UNet sees the context `[77 text tokens][aligner(first k / pooled queries)]`; the loss
//!    is the mean squared error (plus `prior_weight` × the class images' loss with prior
//!    preservation). Gradients are clipped to a global norm of `max_grad_norm`, then AdamW
//!    (torch's) updates the aligner and the UNet parameters the mode names.
//!
//! All randomness comes from [`scheduler::SeededRng`]: the initial aligner and LoRA weights from
//! the seed, each step's draws from `(seed, step)`, so a run stopped and resumed from a
//! checkpoint ends with exactly the weights of an uninterrupted run.
//!
//! ```no_run
//! use burn_autodiff::Autodiff;
//! use burn_flex::{Flex, FlexDevice};
//! use personalize::train::{train, TrainConfig, TrainData, UnetMode};
//! let images = personalize::train::load_images(&["dog.jpg".into()])?;
//! let queries = model_io::tensor_file::read_tensors("queries.safetensors".as_ref())?.remove("queries").unwrap();
//! let cfg = TrainConfig { unet_mode: UnetMode::Lora { rank: 4, alpha: 4.0 }, ..TrainConfig::default() };
//! let data = TrainData { images, queries, class_images: vec![] };
//! let report = train::<Autodiff<Flex>>("sd-v1-5".as_ref(), &cfg, &data, "my-dog".as_ref(), false, &FlexDevice, &mut |s| {
//!     println!("step {} loss {:.4}", s.step, s.loss)
//! })?;
//! # Ok::<(), model_io::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use model_io::nn::Linear;
use model_io::tensor_file::{read_tensors, read_tensors_with_metadata, write_tensors, HostTensor};
use model_io::{Error, Result};
use q_aligner::{Aligner, AlignerSettings, QuerySelection};
use scheduler::{HostSample, Scheduler, SeededRng};
use sd_unet::UNet2DConditionModel;

use crate::concept::{Concept, ConceptInfo};
use crate::image_out::{write_png, RgbImage};
use crate::metadata::ImageSettings;
use crate::pipeline::{GenerateOptions, Pipeline, VisualPrompt};
#[path = "train_data.rs"]
mod train_data;
#[path = "train_parts.rs"]
mod train_parts;

pub use train_data::{image_files, load_image, load_images, plot_losses};
use train_data::{render, views};
use train_parts::{adamw_step, diffusers_unet_tensors, grad_sq_norm, host_params, load_params, set_require_grad};
pub use train_parts::{write_unet_safetensors, AdamW};

/// Which UNet weights train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnetMode {
    /// Every UNet weight (the concept folder gets `unet/`).
    Full,
    /// LoRA adapters on `to_q`, `to_k`, `to_v`, `to_out.0` of every attention layer; the base
    /// weights stay frozen (the concept folder gets `unet_lora.safetensors`).
    Lora { rank: usize, alpha: f64 },
    /// The UNet is frozen: only the aligner trains.
    Frozen,
}

impl UnetMode {
    /// `full`, `lora` or `frozen` (the `unet` field of `concept.json`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Lora { .. } => "lora",
            Self::Frozen => "frozen",
        }
    }
}

/// Prior preservation (DreamBooth): a second loss on images of the class, conditioned on the
/// class prompt alone (77 text tokens, no visual tokens), so the UNet keeps what it knows of
/// the class.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorConfig {
    pub class_prompt: String,
    /// Weight of the prior loss (DreamBooth's `prior_loss_weight`, 1.0).
    pub weight: f64,
}

/// Training settings. [`Default`] gives settings a user can run as is (LoRA rank 4).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps in total (a resumed run continues up to this).
    pub steps: usize,
    /// AdamW learning rate of the aligner (constant, after `warmup_steps` of linear warm-up).
    pub lr: f64,
    /// Learning rate of the UNet weights or adapters (default: `lr`).
    pub unet_lr: Option<f64>,
    /// Linear warm-up of the learning rate from 0 over this many steps.
    pub warmup_steps: usize,
    /// Images (views) per step.
    pub batch: usize,
    /// Training image side in pixels (a multiple of the VAE factor, 8).
    pub resolution: usize,
    /// Visual tokens `k` appended to the 77 text tokens.
    pub num_queries: usize,
    pub query_selection: QuerySelection,
    /// Hidden width of the aligner (default: the text-embedding width).
    pub aligner_hidden: Option<usize>,
    /// GELU after the aligner's second layer (the method's default).
    pub aligner_final_gelu: bool,
    pub unet_mode: UnetMode,
    pub seed: u64,
    /// Write a checkpoint, the concept folder and a sample image every this many steps (and at
    /// the end). 0: only at the end.
    pub save_every: usize,
    /// The text part of the conditioning.
    pub prompt: String,
    /// Random crops per image besides the centre crop (their latents are cached).
    pub augment: usize,
    /// Smallest random crop, as a fraction of the shorter side.
    pub min_crop: f64,
    /// Mirror random crops with probability 1/2.
    pub flip: bool,
    /// AdamW decoupled weight decay (DreamBooth: 1e-2).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (DreamBooth: 1.0); `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Denoising steps of the sample images written at each save; 0 disables them.
    pub sample_steps: usize,
    /// Guidance scale of the sample images.
    pub sample_guidance: f64,
    pub prior: Option<PriorConfig>,
    /// Complete checkpoints to keep (older ones are deleted once a newer one is written).
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 400,
            lr: 1e-4,
            unet_lr: None,
            warmup_steps: 0,
            batch: 1,
            resolution: 512,
            num_queries: 8,
            query_selection: QuerySelection::First,
            aligner_hidden: None,
            aligner_final_gelu: true,
            unet_mode: UnetMode::Lora { rank: 4, alpha: 4.0 },
            seed: 0,
            save_every: 100,
            prompt: "a photo".into(),
            augment: 3,
            min_crop: 0.8,
            flip: false,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            sample_steps: 25,
            sample_guidance: 7.5,
            prior: None,
            keep_checkpoints: 1,
        }
    }
}

impl TrainConfig {
    /// Checks the settings that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad(format!("--resolution {} must be a positive multiple of 8", self.resolution));
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if self.num_queries == 0 {
            return bad("--queries must be at least 1 (the visual prompt's token count)".into());
        }
        if self.aligner_hidden == Some(0) {
            return bad("--aligner-hidden must be at least 1".into());
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return bad(format!("the gradient-norm clip {g} must be a positive number"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        if let Some(l) = self.unet_lr {
            if !(l.is_finite() && l > 0.0) {
                return bad(format!("--unet-lr {l} must be a positive number"));
            }
        }
        if let UnetMode::Lora { rank, alpha } = self.unet_mode {
            if rank == 0 {
                return bad("--lora-rank must be at least 1".into());
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                return bad(format!("--lora-alpha {alpha} must be a positive number"));
            }
        }
        if !(self.min_crop > 0.0 && self.min_crop <= 1.0) {
            return bad(format!("the smallest crop {} must be in (0, 1]", self.min_crop));
        }
        if let Some(p) = &self.prior {
            if !(p.weight.is_finite() && p.weight >= 0.0) {
                return bad(format!("--prior-weight {} must be a non-negative number", p.weight));
            }
        }
        Ok(())
    }

    /// The settings recorded in `concept.json` (`training`) and checked on `--resume`.
    pub fn to_json(&self) -> serde_json::Value {
        let (rank, alpha) = match self.unet_mode {
            UnetMode::Lora { rank, alpha } => (Some(rank), Some(alpha)),
            _ => (None, None),
        };
        serde_json::json!({
            "steps": self.steps, "lr": self.lr, "unet_lr": self.unet_lr.unwrap_or(self.lr), "warmup_steps": self.warmup_steps, "batch": self.batch,
            "resolution": self.resolution, "num_queries": self.num_queries,
            "query_selection": self.query_selection.as_str(), "aligner_hidden": self.aligner_hidden,
            "aligner_final_gelu": self.aligner_final_gelu, "unet": self.unet_mode.name(),
            "lora_rank": rank, "lora_alpha": alpha, "seed": self.seed, "prompt": self.prompt,
            "augment": self.augment, "min_crop": self.min_crop, "flip": self.flip,
            "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
            "class_prompt": self.prior.as_ref().map(|p| p.class_prompt.clone()),
            "prior_weight": self.prior.as_ref().map(|p| p.weight),
            "optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8)",
            "latents": "sampled from the cached VAE latent distribution each step",
        })
    }
}

/// What training reads: the images, their BLIP-2 queries and (prior preservation) class images.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub images: Vec<RgbImage>,
    /// `[N, Q, Dq]`: the Q-Former queries of each image (N = number of images).
    pub queries: HostTensor,
    /// Images of the class for prior preservation (unused without [`TrainConfig::prior`]).
    pub class_images: Vec<RgbImage>,
}

/// Reported after every step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub step: usize,
    pub total_steps: usize,
    /// The instance loss.
    pub loss: f64,
    /// The class images' loss (prior preservation).
    pub prior_loss: Option<f64>,
    /// Gradient norms before clipping.
    pub grad_norm_aligner: f64,
    pub grad_norm_unet: f64,
    pub lr: f64,
}

/// The outcome of [`train`].
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps_done: usize,
    /// Mean loss over the last (up to) 10 steps.
    pub final_loss: Option<f64>,
    pub losses: Vec<f64>,
    /// The step a `--resume` continued from.
    pub resumed_from: Option<usize>,
    pub concept_dir: PathBuf,
}

/// One line of `loss.csv`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct LossRow {
    step: usize,
    // f32, as computed: JSON round-trips f32 exactly, so a resumed run's log is bit-identical.
    loss: f32,
    prior_loss: Option<f32>,
    lr: f64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointState {
    step: usize,
    optimizer_t: u64,
    settings: serde_json::Value,
    data_fingerprint: String,
    base_unet_fingerprint: String,
    losses: Vec<LossRow>,
}

/// A view's cached latent distribution (host, `[C, h, w]` each).
struct CachedLatent {
    image: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// The trainer: frozen parts (text encoder, VAE, tokenizer in `pipe`), trained parts (`aligner`,
/// `unet`) and the optimizer, with the cached latents and embeddings. [`train`] drives it.
pub struct Trainer<B: AutodiffBackend> {
    pub cfg: TrainConfig,
    /// The base pipeline on the inner backend. Its UNet is pointed at the trained weights before
    /// sample images are made.
    pub pipe: Pipeline<B::InnerBackend>,
    pub unet: UNet2DConditionModel<B>,
    pub aligner: Aligner<B>,
    /// AdamW of the aligner and of the UNet.
    pub opt: AdamW<B::InnerBackend>,
    pub opt_unet: AdamW<B::InnerBackend>,
    /// Steps done.
    pub step: usize,
    pub resumed_from: Option<usize>,
    losses: Vec<LossRow>,
    out_dir: PathBuf,
    device: B::Device,
    sched: Box<dyn Scheduler<HostSample>>,
    latent_shape: [usize; 3],
    scaling: f32,
    views: Vec<CachedLatent>,
    class_views: Vec<CachedLatent>,
    text: HostTensor,
    class_text: Option<HostTensor>,
    queries: HostTensor,
    data_fingerprint: String,
}

fn uniform(rng: &mut SeededRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
}

/// The step's own generator: a function of the seed and the step only.
fn step_rng(seed: u64, step: usize) -> SeededRng {
    SeededRng::new(seed ^ (step as u64).wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

fn ckpt_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// The complete checkpoints in `dir/checkpoints`, oldest first: `(step, path)`.
pub fn list_checkpoints(out_dir: &Path) -> Vec<(usize, PathBuf)> {
    let dir = out_dir.join("checkpoints");
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let p = e.path();
            p.join("state.json").is_file().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Loads the base model, checks the data, caches latents and embeddings, builds the aligner
    /// and the UNet per the mode, and with `resume` restores the latest checkpoint in `out_dir`.
    pub fn new(
        base_dir: &Path,
        cfg: &TrainConfig,
        data: &TrainData,
        out_dir: &Path,
        resume: bool,
        device: &B::Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if data.images.is_empty() {
            return Err(Error::invalid("no training images given"));
        }
        let qs = &data.queries.shape;
        if qs.len() != 3 || qs[0] != data.images.len() {
            return Err(Error::invalid(format!(
                "the queries have shape {qs:?}; expected [{}, Q, D] (one row per training image)",
                data.images.len()
            )));
        }
        let qv = data.queries.as_f32("queries")?;
        if qv.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid("the BLIP-2 queries contain NaN or infinite values"));
        }
        if cfg.query_selection == QuerySelection::First && cfg.num_queries > qs[1] {
            return Err(Error::invalid(format!(
                "--queries {} is more than the {} queries BLIP-2 gives",
                cfg.num_queries, qs[1]
            )));
        }
        if cfg.prior.is_some() && data.class_images.is_empty() {
            return Err(Error::invalid(
                "prior preservation needs class images (--class-images DIR, or let the base model make them)",
            ));
        }
        let existing = list_checkpoints(out_dir);
        if !resume && !existing.is_empty() {
            return Err(Error::invalid(format!(
                "{} already holds a training run (checkpoints up to step {}); pass --resume to continue it, --overwrite to replace it, or choose another --out",
                out_dir.display(),
                existing.last().map(|c| c.0).unwrap_or(0)
            )));
        }
        if !resume && out_dir.join("concept.json").is_file() {
            return Err(Error::invalid(format!(
                "{} already holds a concept (concept.json); pass --overwrite to replace it or choose another --out",
                out_dir.display()
            )));
        }
        match existing.last() {
            None if resume => {
                return Err(Error::invalid(format!(
                    "--resume: {} has no checkpoint to continue from ({} holds none)",
                    out_dir.display(),
                    out_dir.join("checkpoints").display()
                )))
            }
            Some((step, _)) if resume && *step > cfg.steps => {
                return Err(Error::invalid(format!(
                    "--resume: {} is at step {step}, past --steps {}; give --steps {step} or more",
                    out_dir.display(),
                    cfg.steps
                )))
            }
            _ => {}
        }

        let pipe = Pipeline::<B::InnerBackend>::load(base_dir, device)?;
        let f = pipe.vae.downscale_factor();
        if !cfg.resolution.is_multiple_of(f) {
            return Err(Error::invalid(format!(
                "--resolution {} must be a multiple of the VAE factor {f}",
                cfg.resolution
            )));
        }
        if let Some(avail) = crate::memory::available_bytes() {
            let h = cfg.resolution / f;
            let need = crate::memory::training_bytes(pipe.unet_config(), &pipe.vae_config, cfg.batch, h, h);
            if need > avail as f64 {
                let what = format!("training at --resolution {} with --batch {}", cfg.resolution, cfg.batch);
                return Err(crate::memory::too_big(&what, need, avail, "; lower --resolution or --batch"));
            }
        }
        let serr = |e: scheduler::SchedulerError| Error::invalid(e.to_string());
        let sched = scheduler::load::<HostSample>(&base_dir.join("scheduler"), None).map_err(serr)?;
        let d_text = pipe.unet.cross_attention_dim();
        let latent_shape = [pipe.vae.latent_channels(), cfg.resolution / f, cfg.resolution / f];

        let mut h = model_io::Fnv64::new();
        for img in data.images.iter().chain(&data.class_images) {
            h.feed(&(img.width as u64).to_le_bytes());
            h.feed(&img.data);
        }
        for v in qv {
            h.feed(&v.to_le_bytes());
        }
        let data_fingerprint = format!("{:016x}", h.finish());

        // Frozen encoders, once.
        let encode_text =
            |p: &str| -> Result<HostTensor> { Ok(HostTensor::from_tensor(pipe.encode_prompts(&[p.to_string()])?)) };
        let text = encode_text(&cfg.prompt)?;
        let class_text = cfg.prior.as_ref().map(|p| encode_text(&p.class_prompt)).transpose()?;
        let views = Self::cache_latents(&pipe, cfg, &data.images, cfg.seed ^ 0x5EED_0001, device)?;
        let class_views = if cfg.prior.is_some() {
            Self::cache_latents(&pipe, cfg, &data.class_images, cfg.seed ^ 0x5EED_0002, device)?
        } else {
            vec![]
        };

        // Trained parts, initialised from the seed.
        let mut init = SeededRng::new(cfg.seed);
        let settings = AlignerSettings {
            num_queries: cfg.num_queries,
            query_selection: cfg.query_selection,
            final_gelu: cfg.aligner_final_gelu,
        };
        let (dq, hidden) = (qs[2], cfg.aligner_hidden.unwrap_or(d_text));
        let mut aligner = Aligner::<B>::new(dq, hidden, d_text, &settings, device);
        let mut lin = |i: usize, o: usize| {
            let b = 1.0 / (i as f64).sqrt();
            let w = Tensor::<B, 2>::from_data(TensorData::new(uniform(&mut init, i * o, b), [i, o]), device);
            let bias = Tensor::<B, 1>::from_data(TensorData::new(uniform(&mut init, o, b), [o]), device);
            Linear::new(w, Some(bias))
        };
        aligner.fc1 = lin(dq, hidden);
        aligner.fc2 = lin(hidden, d_text);

        let mut unet =
            set_require_grad(UNet2DConditionModel::<B>::from_inner(pipe.unet.clone()), cfg.unet_mode == UnetMode::Full);
        if let UnetMode::Lora { rank, alpha } = cfg.unet_mode {
            sd_unet::lora::attach(&mut unet, rank, alpha);
            for a in unet.attentions_mut() {
                for (_, p) in a.projections_mut() {
                    let (i, _) = p.base.dims();
                    if let Some(l) = p.lora.as_mut() {
                        let w = uniform(&mut init, i * rank, 1.0 / (i as f64).sqrt());
                        l.down.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [i, rank]), device));
                    }
                }
            }
        }

        let mut t = Self {
            cfg: cfg.clone(),
            pipe,
            unet,
            aligner,
            opt: AdamW::new(cfg.weight_decay),
            opt_unet: AdamW::new(cfg.weight_decay),
            step: 0,
            resumed_from: None,
            losses: Vec::new(),
            out_dir: out_dir.to_path_buf(),
            device: device.clone(),
            sched,
            latent_shape,
            scaling: 1.0,
            views,
            class_views,
            text,
            class_text,
            queries: data.queries.clone(),
            data_fingerprint,
        };
        t.scaling = t.pipe.vae_config.scaling_factor as f32;
        if resume {
            if let Some((step, dir)) = existing.last() {
                t.load_checkpoint(dir)
                    .map_err(|e| Error::invalid(format!("cannot resume from {}: {e}", dir.display())))?;
                t.resumed_from = Some(*step);
            }
        }
        Ok(t)
    }

    fn cache_latents(
        pipe: &Pipeline<B::InnerBackend>,
        cfg: &TrainConfig,
        images: &[RgbImage],
        seed: u64,
        device: &B::Device,
    ) -> Result<Vec<CachedLatent>> {
        let mut rng = SeededRng::new(seed);
        let res = cfg.resolution;
        let mut out = Vec::new();
        for (i, img) in images.iter().enumerate() {
            if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
                return Err(Error::invalid(format!("training image {i} is empty or not RGB")));
            }
            for v in views(img.width, img.height, cfg.augment, cfg.min_crop, cfg.flip, &mut rng) {
                let x = Tensor::<B::InnerBackend, 4>::from_data(
                    TensorData::new(render(img, v, res), [1, 3, res, res]),
                    device,
                );
                let (mean, logvar) = pipe.vae.encode(x)?;
                let std = (logvar * 0.5).exp();
                let mean = HostTensor::from_tensor(mean).as_f32("mean")?.to_vec();
                let std = HostTensor::from_tensor(std).as_f32("std")?.to_vec();
                if mean.iter().chain(&std).any(|v| !v.is_finite()) {
                    let vae = pipe.base_dir.join("vae");
                    return Err(crate::check::nonfinite_error(
                        &format!("the VAE encoding of training image {i}"),
                        "VAE",
                        &pipe.vae,
                        &vae,
                    ));
                }
                out.push(CachedLatent { image: i, mean, std });
            }
        }
        Ok(out)
    }

    /// The learning-rate factor of the warm-up at `step`.
    fn warmup(&self, step: usize) -> f64 {
        if self.cfg.warmup_steps > 0 && step <= self.cfg.warmup_steps {
            step as f64 / self.cfg.warmup_steps as f64
        } else {
            1.0
        }
    }

    /// A batch's noisy latents, targets and timesteps (host), with the view indices.
    fn draw(
        &self,
        rng: &mut SeededRng,
        pool: &[CachedLatent],
    ) -> Result<(Vec<usize>, HostSample, HostSample, Vec<usize>)> {
        let b = self.cfg.batch;
        let [c, hh, ww] = self.latent_shape;
        let n = c * hh * ww;
        let picks: Vec<usize> = (0..b).map(|_| (rng.next_u64() % pool.len() as u64) as usize).collect();
        let mut x0 = Vec::with_capacity(b * n);
        for &p in &picks {
            let v = &pool[p];
            for j in 0..n {
                x0.push((v.mean[j] + v.std[j] * rng.standard_normal()) * self.scaling);
            }
        }
        let mut noise = vec![0f32; b * n];
        rng.fill_standard_normal(&mut noise);
        let tmax = self.sched.train_schedule().num_train_timesteps() as u64;
        let ts: Vec<usize> = (0..b).map(|_| (rng.next_u64() % tmax) as usize).collect();
        let shape = vec![b, c, hh, ww];
        let serr = |e: scheduler::SchedulerError| Error::invalid(e.to_string());
        let x0 = HostSample::new(x0, shape.clone()).map_err(serr)?;
        let noise = HostSample::new(noise, shape).map_err(serr)?;
        let noisy = self.sched.add_noise(&x0, &noise, &ts).map_err(serr)?;
        let target = self.sched.training_target(&x0, &noise, &ts).map_err(serr)?;
        Ok((picks, noisy, target, ts))
    }

    fn tensor4(&self, s: HostSample) -> Tensor<B, 4> {
        let shape: [usize; 4] = [s.shape[0], s.shape[1], s.shape[2], s.shape[3]];
        Tensor::from_data(TensorData::new(s.data, shape), &self.device)
    }

    fn mse(&self, noisy: HostSample, target: HostSample, ts: &[usize], ctx: Tensor<B, 3>) -> Result<Tensor<B, 1>> {
        let tt = Tensor::<B, 1>::from_data(
            TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), [ts.len()]),
            &self.device,
        );
        let pred = self.unet.forward(self.tensor4(noisy), tt, ctx)?;
        Ok((pred - self.tensor4(target)).powi_scalar(2).mean())
    }

    fn text_batch(&self, t: &HostTensor, b: usize) -> Result<Tensor<B, 3>> {
        Ok(t.to_float::<B, 3>("text", &self.device)?.repeat_dim(0, b))
    }

    /// One optimizer step. Errors (without updating anything) on a NaN or infinite loss or
    /// gradient.
    pub fn train_step(&mut self) -> Result<StepInfo> {
        let step = self.step + 1;
        let mut rng = step_rng(self.cfg.seed, step);
        let (picks, noisy, target, ts) = self.draw(&mut rng, &self.views)?;
        let b = picks.len();

        // Queries of the drawn views' images.
        let [_, q, dq] = [self.queries.shape[0], self.queries.shape[1], self.queries.shape[2]];
        let all = self.queries.as_f32("queries")?;
        let mut qb = Vec::with_capacity(b * q * dq);
        for &p in &picks {
            let i = self.views[p].image;
            qb.extend_from_slice(&all[i * q * dq..(i + 1) * q * dq]);
        }
        let qt = Tensor::<B, 3>::from_data(TensorData::new(qb, [b, q, dq]), &self.device);
        let ctx = q_aligner::assemble(self.text_batch(&self.text, b)?, self.aligner.forward(qt)?);
        let loss = self.mse(noisy, target, &ts, ctx)?;
        let loss_v = scalar(&loss);

        let (total, prior_v) = match (&self.cfg.prior, &self.class_text) {
            (Some(p), Some(ct)) => {
                let (_, cn, ctg, cts) = self.draw(&mut rng, &self.class_views)?;
                let pl = self.mse(cn, ctg, &cts, self.text_batch(ct, b)?)?;
                let pv = scalar(&pl);
                (loss + pl * p.weight, Some(pv))
            }
            _ => (loss, None),
        };
        if !loss_v.is_finite() || prior_v.is_some_and(|v| !v.is_finite()) {
            return Err(self.nan_error(step, "loss"));
        }
        let grads = total.backward();
        let ga = grad_sq_norm::<B, _>(&self.aligner, &grads).sqrt();
        let gu = grad_sq_norm::<B, _>(&self.unet, &grads).sqrt();
        let norm = (ga * ga + gu * gu).sqrt();
        if !norm.is_finite() {
            return Err(self.nan_error(step, "gradient"));
        }
        let scale = match self.cfg.max_grad_norm {
            Some(m) if norm > m => m / (norm + 1e-6),
            _ => 1.0,
        };
        let lr = self.cfg.lr * self.warmup(step);
        let unet_lr = self.cfg.unet_lr.unwrap_or(self.cfg.lr) * self.warmup(step);
        self.opt.t += 1;
        self.opt_unet.t += 1;
        self.aligner = adamw_step::<B, _>(self.aligner.clone(), &mut self.opt, &grads, lr, scale);
        if self.cfg.unet_mode != UnetMode::Frozen {
            self.unet = adamw_step::<B, _>(self.unet.clone(), &mut self.opt_unet, &grads, unet_lr, scale);
        }
        if self.cfg.unet_mode == UnetMode::Full {
            // Let the inner pipeline share the new weights instead of keeping the old ones.
            self.pipe.unet = self.unet.valid();
        }
        self.step = step;
        self.losses.push(LossRow { step, loss: loss_v as f32, prior_loss: prior_v.map(|v| v as f32), lr });
        Ok(StepInfo {
            step,
            total_steps: self.cfg.steps,
            loss: loss_v,
            prior_loss: prior_v,
            grad_norm_aligner: ga,
            grad_norm_unet: gu,
            lr,
        })
    }

    fn nan_error(&self, step: usize, what: &str) -> Error {
        // Nothing of this step was applied: weights that hold NaN now held it before, and a
        // lower learning rate would not help.
        let damaged = crate::check::first_nonfinite_param::<B, _>(&self.unet)
            .map(|p| format!("the UNet's weight `{p}`"))
            .or_else(|| {
                crate::check::first_nonfinite_param::<B, _>(&self.aligner)
                    .map(|p| format!("the aligner's weight `{p}`"))
            })
            .or_else(|| {
                let bad = |t: &HostTensor| t.as_f32("text").is_ok_and(|v| v.iter().any(|x| !x.is_finite()));
                (bad(&self.text) || self.class_text.as_ref().is_some_and(bad))
                    .then(|| "the text encoder's embedding of the prompt".to_string())
            });
        if let Some(d) = damaged {
            let from = if step == 1 && self.resumed_from.is_none() { "the base model" } else { "a checkpoint" };
            return Error::invalid(format!(
                "the {what} became NaN or infinite at step {step} because {d} holds NaN or Inf: {from} is damaged (a lower --lr will not help)"
            ));
        }
        let last = list_checkpoints(&self.out_dir).last().cloned();
        let kept = match last {
            Some((s, p)) => format!(
                "the last good checkpoint is {} (step {s}) and the concept folder holds its weights; lower --lr and rerun with --resume",
                p.display()
            ),
            None => "no checkpoint was written yet (lower --lr and start again)".to_string(),
        };
        Error::invalid(format!(
            "the {what} became NaN or infinite at step {step}; training stopped, nothing of this step was kept; {kept}"
        ))
    }

    /// The trainable state as host tensors: `aligner.<path>` and `unet.<path>`.
    fn trainable_host(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (k, v) in host_params::<B, _>(&self.aligner, true) {
            out.insert(format!("aligner.{k}"), v);
        }
        for (k, v) in host_params::<B, _>(&self.unet, true) {
            out.insert(format!("unet.{k}"), v);
        }
        out
    }

    fn state(&self) -> CheckpointState {
        CheckpointState {
            step: self.step,
            optimizer_t: self.opt.t,
            settings: resume_settings(&self.cfg),
            data_fingerprint: self.data_fingerprint.clone(),
            base_unet_fingerprint: self.pipe.unet_fingerprint.clone(),
            losses: self.losses.clone(),
        }
    }

    /// Writes `checkpoints/step-XXXXXX/` atomically: everything goes into a temporary folder
    /// first, which is renamed into place only once complete, so a crash or a full disk never
    /// leaves a half-written checkpoint. Older checkpoints beyond `keep_checkpoints` are
    /// deleted afterwards.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let root = self.out_dir.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(|e| Error::Io { path: root.clone(), cause: e })?;
        let fin = root.join(ckpt_name(self.step));
        let tmp = root.join(format!(".tmp-{}-{}", ckpt_name(self.step), std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let write = || -> Result<()> {
            std::fs::create_dir_all(&tmp).map_err(|e| Error::Io { path: tmp.clone(), cause: e })?;
            write_tensors(&tmp.join("trainable.safetensors"), &self.trainable_host(), &BTreeMap::new())?;
            let mut opt = self.opt.to_host("aligner.");
            opt.extend(self.opt_unet.to_host("unet."));
            let meta = BTreeMap::from([("t".to_string(), self.opt.t.to_string())]);
            write_tensors(&tmp.join("optimizer.safetensors"), &opt, &meta)?;
            let state = serde_json::to_vec_pretty(&self.state()).map_err(|e| Error::invalid(e.to_string()))?;
            model_io::write_atomic(&tmp.join("state.json"), &state)?;
            if fin.exists() {
                std::fs::remove_dir_all(&fin).map_err(|e| Error::Io { path: fin.clone(), cause: e })?;
            }
            std::fs::rename(&tmp, &fin).map_err(|e| Error::Io { path: fin.clone(), cause: e })?;
            if let Ok(d) = std::fs::File::open(&root) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::invalid(format!(
                "could not write checkpoint for step {} ({e}); no partial checkpoint was left",
                self.step
            )));
        }
        let all = list_checkpoints(&self.out_dir);
        let keep = self.cfg.keep_checkpoints.max(1);
        if all.len() > keep {
            for (_, p) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(fin)
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let text = std::fs::read_to_string(dir.join("state.json"))
            .map_err(|e| Error::Io { path: dir.join("state.json"), cause: e })?;
        let st: CheckpointState =
            serde_json::from_str(&text).map_err(|e| Error::Json { path: dir.join("state.json"), cause: e })?;
        let now = resume_settings(&self.cfg);
        if st.settings != now {
            let diff = now.as_object().and_then(|o| {
                o.iter().find(|(k, v)| st.settings.get(k.as_str()) != Some(v)).map(|(k, v)| (k.clone(), v.clone()))
            });
            let (k, v) = diff.unwrap_or_default();
            return Err(Error::invalid(format!(
                "it was trained with other settings (`{k}` was {}, now {v}); resume with the same settings",
                st.settings.get(&k).cloned().unwrap_or_default()
            )));
        }
        if st.data_fingerprint != self.data_fingerprint {
            return Err(Error::invalid("it was trained on other images or queries"));
        }
        if !self.pipe.is_base_of(&st.base_unet_fingerprint) {
            return Err(Error::invalid("it was trained on another base model"));
        }
        let t = read_tensors(&dir.join("trainable.safetensors"))?;
        let pick = |prefix: &str| -> BTreeMap<String, HostTensor> {
            t.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone()))).collect()
        };
        self.aligner = load_params::<B, _>(self.aligner.clone(), &pick("aligner."), "checkpoint aligner")?;
        self.unet = load_params::<B, _>(self.unet.clone(), &pick("unet."), "checkpoint UNet")?;
        let (ot, meta) = read_tensors_with_metadata(&dir.join("optimizer.safetensors"))?;
        let t = meta.get("t").and_then(|v| v.parse().ok()).unwrap_or(st.optimizer_t);
        let (mut oa, mut ou) = (AdamW::new(self.cfg.weight_decay), AdamW::new(self.cfg.weight_decay));
        oa.load_host(&ot, "aligner.", &self.device)?;
        ou.load_host(&ot, "unet.", &self.device)?;
        (oa.t, ou.t) = (t, t);
        self.opt = oa;
        self.opt_unet = ou;
        self.step = st.step;
        self.losses = st.losses;
        if self.cfg.unet_mode == UnetMode::Full {
            self.pipe.unet = self.unet.valid();
        }
        Ok(())
    }

    /// The LoRA tensors as written to `unet_lora.safetensors`: diffusers/PEFT keys, with the
    /// scale `alpha / rank` folded into `lora_B`, so loaders that assume `alpha = rank`
    /// (diffusers' `load_lora_weights` on a plain PEFT file) reproduce our UNet exactly.
    pub fn lora_file_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut t = sd_unet::lora::lora_tensors(&self.unet.valid());
        if let UnetMode::Lora { rank, alpha } = self.cfg.unet_mode {
            let s = (alpha / rank as f64) as f32;
            if s != 1.0 {
                for (k, v) in t.iter_mut() {
                    if k.ends_with("lora_B.weight") {
                        if let model_io::tensor_file::HostData::F32(d) = &mut v.data {
                            d.iter_mut().for_each(|x| *x *= s);
                        }
                    }
                }
            }
        }
        t
    }

    fn final_loss(&self) -> Option<f64> {
        let n = self.losses.len().min(10);
        (n > 0).then(|| self.losses[self.losses.len() - n..].iter().map(|r| r.loss as f64).sum::<f64>() / n as f64)
    }

    /// Writes the concept folder (docs/ARCHITECTURE.md): `concept.json`, `aligner.safetensors`,
    /// `unet_lora.safetensors` or `unet/`, `visual_queries.safetensors`, `loss.csv`,
    /// `loss.png`. Each file is written atomically.
    pub fn write_concept(&mut self) -> Result<()> {
        let dir = self.out_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), cause: e })?;
        self.aligner.valid().save(&dir.join("aligner.safetensors"))?;
        write_tensors(
            &dir.join("visual_queries.safetensors"),
            &BTreeMap::from([("queries".to_string(), self.queries.clone())]),
            &BTreeMap::new(),
        )?;
        let (rank, alpha) = match self.cfg.unet_mode {
            UnetMode::Lora { rank, .. } => {
                // The scale is folded into lora_B: the adapter config diffusers reads says alpha = rank.
                let meta = sd_unet::lora::PeftLoraConfig::metadata(
                    "unet",
                    rank,
                    rank as f64,
                    &sd_unet::Attention::<B>::PROJECTIONS,
                );
                write_tensors(&dir.join("unet_lora.safetensors"), &self.lora_file_tensors(), &meta)?;
                (Some(rank), Some(rank as f64))
            }
            UnetMode::Full => {
                self.write_full_unet(&dir.join("unet"))?;
                (None, None)
            }
            UnetMode::Frozen => (None, None),
        };
        let mut csv = String::from("step,loss,prior_loss,lr\n");
        for r in &self.losses {
            csv.push_str(&format!(
                "{},{},{},{}\n",
                r.step,
                r.loss,
                r.prior_loss.map(|v| v.to_string()).unwrap_or_default(),
                r.lr
            ));
        }
        model_io::write_atomic(&dir.join("loss.csv"), csv.as_bytes())?;
        let losses: Vec<f64> = self.losses.iter().map(|r| r.loss as f64).collect();
        write_png(&dir.join("loss.png"), &plot_losses(&losses, 640, 360), &[("title", "training loss".into())])?;
        let info = ConceptInfo {
            version: 1,
            base_model: self.pipe.base_dir.display().to_string(),
            base_unet_fingerprint: self.pipe.unet_fingerprint.clone(),
            num_queries: self.cfg.num_queries,
            query_selection: self.cfg.query_selection.as_str().to_string(),
            prompt: Some(self.cfg.prompt.clone()),
            unet: self.cfg.unet_mode.name().to_string(),
            lora_rank: rank,
            lora_alpha: alpha,
            training: self.cfg.to_json(),
            steps_done: self.step,
            final_loss: self.final_loss(),
        };
        Concept::<B::InnerBackend>::write_info(&dir, &info)
    }

    /// The full UNet in diffusers' layout: `config.json` (the base's) and
    /// `diffusion_pytorch_model.safetensors`, every key and shape checked against the base.
    fn write_full_unet(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.into(), cause: e })?;
        let tensors = diffusers_unet_tensors::<B, _>(&self.unet);
        let base = model_io::Checkpoint::open_dir(&self.pipe.base_dir.join("unet"), &["diffusion_pytorch_model"])?;
        let names: std::collections::BTreeSet<String> = base.names().map(str::to_string).collect();
        for (k, v) in &tensors {
            match base.info(k) {
                Some(i) if i.shape == v.shape => {}
                Some(i) => {
                    return Err(Error::invalid(format!(
                        "UNet export: `{k}` has shape {:?}, the base {:?}",
                        v.shape, i.shape
                    )))
                }
                None => return Err(Error::invalid(format!("UNet export: `{k}` is not a key of the base UNet"))),
            }
        }
        if let Some(k) = names.iter().find(|k| !tensors.contains_key(*k)) {
            return Err(Error::invalid(format!("UNet export: base key `{k}` has no parameter")));
        }
        let cfg = std::fs::read(self.pipe.base_dir.join("unet/config.json"))
            .map_err(|e| Error::Io { path: self.pipe.base_dir.join("unet/config.json"), cause: e })?;
        model_io::write_atomic(&dir.join("config.json"), &cfg)?;
        write_tensors(
            &dir.join("diffusion_pytorch_model.safetensors"),
            &tensors,
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )
    }

    /// A sample image with the trained concept (the prompt, the mean of the training queries),
    /// as `samples/step-XXXXXX.png`.
    pub fn write_sample(&mut self) -> Result<Option<PathBuf>> {
        if self.cfg.sample_steps == 0 {
            return Ok(None);
        }
        self.pipe.unet = self.unet.valid();
        let aligner = self.aligner.valid();
        let opts = GenerateOptions {
            prompt: self.cfg.prompt.clone(),
            steps: self.cfg.sample_steps,
            guidance: self.cfg.sample_guidance,
            seed: self.cfg.seed,
            height: Some(self.cfg.resolution),
            width: Some(self.cfg.resolution),
            ..Default::default()
        };
        // The concept folder (recorded with the step) holds the weights of its last save and
        // the training queries as its cached visual prompt: `generate --params-from` a sample
        // re-runs it with the concept as it is then.
        let settings = ImageSettings {
            concept: Some(self.out_dir.display().to_string()),
            training_step: Some(self.step),
            ..self.pipe.image_settings(&opts)?
        };
        let text = settings.png_text()?;
        let q = self.queries.to_float::<B::InnerBackend, 3>("queries", &self.device)?;
        let vp = VisualPrompt { aligner: &aligner, queries: q };
        let img = self.pipe.generate(&opts, Some(&vp), None, &mut |_, _| {})?;
        let dir = self.out_dir.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), cause: e })?;
        let path = dir.join(format!("{}.png", ckpt_name(self.step)));
        write_png(&path, &img[0], &text)?;
        Ok(Some(path))
    }

    /// Checkpoint, then concept folder, then a sample image.
    pub fn save(&mut self) -> Result<()> {
        self.save_checkpoint()?;
        self.write_concept()?;
        self.write_sample()?;
        Ok(())
    }

    /// The report of the run so far.
    pub fn report(&self) -> TrainReport {
        TrainReport {
            steps_done: self.step,
            final_loss: self.final_loss(),
            losses: self.losses.iter().map(|r| r.loss as f64).collect(),
            resumed_from: self.resumed_from,
            concept_dir: self.out_dir.clone(),
        }
    }
}

/// The settings a resumed run must share with the checkpoint (all but the step count and the
/// saving / sampling cadence).
fn resume_settings(cfg: &TrainConfig) -> serde_json::Value {
    let mut v = cfg.to_json();
    if let Some(o) = v.as_object_mut() {
        o.remove("steps");
    }
    v
}

fn scalar<B: burn::tensor::backend::Backend>(t: &Tensor<B, 1>) -> f64 {
    let d = t.clone().into_data().convert::<f64>();
    d.as_slice::<f64>().map(|v| v[0]).unwrap_or(f64::NAN)
}

/// Trains a concept: [`Trainer::new`], then steps up to `cfg.steps`, saving (checkpoint,
/// concept folder, sample) every `save_every` steps and at the end. `on_step` is called after
/// each step. On a NaN loss it stops with an error that names the last good checkpoint (whose
/// weights the concept folder holds).
pub fn train<B: AutodiffBackend>(
    base_dir: &Path,
    cfg: &TrainConfig,
    data: &TrainData,
    out_dir: &Path,
    resume: bool,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<TrainReport> {
    let created = !out_dir.exists();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::Io { path: out_dir.to_path_buf(), cause: e })?;
    let lock = OutLock::take(out_dir)?;
    let mut t = match Trainer::<B>::new(base_dir, cfg, data, out_dir, resume, device) {
        Ok(t) => t,
        Err(e) => {
            // Refused before training: leave no trace (remove_dir only removes an empty folder).
            drop(lock);
            if created {
                let _ = std::fs::remove_dir(out_dir);
            }
            return Err(e);
        }
    };
    let _lock = lock;
    while t.step < cfg.steps {
        if crate::interrupt::requested() {
            if t.resumed_from.unwrap_or(0) == t.step {
                return Err(Error::Interrupted(format!(
                    "stopped before step {} of {}; nothing new to keep",
                    t.step + 1,
                    cfg.steps
                )));
            }
            // Ctrl-C: keep every finished step (no sample image: that could take minutes).
            let path = t.save_checkpoint()?;
            t.write_concept()?;
            return Err(Error::Interrupted(format!(
                "stopped after step {} of {}; checkpoint {} written, the concept folder holds its weights; continue with --resume",
                t.step,
                cfg.steps,
                path.display()
            )));
        }
        let info = t.train_step()?;
        on_step(&info);
        if t.step == cfg.steps || (cfg.save_every > 0 && t.step % cfg.save_every == 0) {
            t.save()?;
        }
    }
    if t.resumed_from.is_some_and(|s| s >= cfg.steps) {
        // Nothing left to do; make sure the concept folder matches the checkpoint.
        t.write_concept()?;
    }
    Ok(t.report())
}

/// `OUT/.lock` while a run trains into OUT: a second run on the same folder is refused instead
/// of both finishing and one result being lost. Removed when dropped (also on an error); a
/// lock whose process is gone (killed) is taken over.
pub struct OutLock {
    path: PathBuf,
    /// False when this process already held the lock (taken again inside a run): only the
    /// first taker removes it.
    owned: bool,
}

impl OutLock {
    /// Takes the lock of `out_dir`, or fails naming the process that holds it.
    pub fn take(out_dir: &Path) -> Result<Self> {
        let path = out_dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write as _;
                    f.write_all(std::process::id().to_string().as_bytes())
                        .map_err(|e| Error::Io { path: path.clone(), cause: e })?;
                    return Ok(Self { path, owned: true });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim();
                    if pid == std::process::id().to_string() {
                        return Ok(Self { path, owned: false });
                    }
                    // Where /proc exists, a holder that is gone leaves a stale lock.
                    let gone = Path::new("/proc/self").exists()
                        && (pid.parse::<u32>().is_err() || !Path::new("/proc").join(pid).exists());
                    if !gone {
                        return Err(Error::invalid(format!(
                            "{} is in use by another training run (process {pid}; lock {}); wait for it or choose another --out",
                            out_dir.display(),
                            path.display()
                        )));
                    }
                    tracing::warn!("removing the stale lock {} of process {pid}, which is gone", path.display());
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(Error::Io { path, cause: e }),
            }
        }
        Err(Error::invalid(format!("{}: could not take the lock", path.display())))
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a training run writes into its output folder (besides `class_images/`, which a later
/// run reuses): removed by `train --overwrite` before it starts again.
pub const RUN_OUTPUTS: &[&str] = &[
    "checkpoints",
    "samples",
    "concept.json",
    "aligner.safetensors",
    "unet_lora.safetensors",
    "unet",
    "visual_queries.safetensors",
    "loss.csv",
    "loss.png",
];

/// What [`generate_class_images`] makes.
#[derive(Debug, Clone)]
pub struct ClassImages {
    /// The base model folder.
    pub base_dir: PathBuf,
    pub prompt: String,
    /// How many images.
    pub n: usize,
    /// Their side, in pixels.
    pub resolution: usize,
    /// Denoising steps per image.
    pub steps: usize,
    /// Image `i` has seed `seed + i`.
    pub seed: u64,
    /// The folder they are written to.
    pub dir: PathBuf,
}

/// Makes `n` images of `prompt` with the base model (DreamBooth's class images for prior
/// preservation), `resolution`² pixels, `steps` denoising steps, seeds `seed`, `seed + 1`, ...,
/// and writes them to `dir` as `class-0000.png`, ... (skipping the names that exist, so an
/// interrupted run continues). `on_image(i, n)` after each. Returns every image file of `dir`.
pub fn generate_class_images<B: burn::tensor::backend::Backend>(
    job: &ClassImages,
    device: &B::Device,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PathBuf>> {
    let ClassImages { base_dir, prompt, n, resolution, steps, seed, dir } = job;
    let (base_dir, dir, n, resolution, steps, seed) =
        (base_dir.as_path(), dir.as_path(), *n, *resolution, *steps, *seed);
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.into(), cause: e })?;
    let mut pipe: Option<Pipeline<B>> = None;
    for i in 0..n {
        let path = dir.join(format!("class-{i:04}.png"));
        if !path.is_file() {
            if pipe.is_none() {
                pipe = Some(Pipeline::load(base_dir, device)?);
            }
            let p = pipe.as_ref().expect("loaded above");
            let opts = GenerateOptions {
                prompt: prompt.to_string(),
                steps,
                seed: seed.wrapping_add(i as u64),
                height: Some(resolution),
                width: Some(resolution),
                ..Default::default()
            };
            let text = p.image_settings(&opts)?.png_text()?;
            let img = p.generate(&opts, None, None, &mut |_, _| {})?;
            write_png(&path, &img[0], &text)?;
        }
        on_image(i + 1, n);
    }
    image_files(dir)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What [`bench_train_step`] measured.
#[derive(Debug, Clone)]
pub struct TrainStepBench {
    /// Seconds per training step (forward, backward, AdamW), after one warm-up step: the mean.
    pub seconds_per_step: f64,
    /// The time of each timed step (the warm-up step excluded), in order.
    pub step_seconds: Vec<f64>,
    /// Peak resident memory of the process ([`peak_rss_bytes`]) after the steps.
    pub peak_rss_bytes: Option<u64>,
    /// Trainable parameters (aligner + UNet part).
    pub trainable_params: usize,
}

/// Times training steps of a UNet built from `unet_config_dir/config.json` with random weights
/// (as `cargo xtask bench train-step` does for SD 1.5): an aligner on random `[batch, 32, 768]`
/// queries, context `[77 random text tokens][k visual tokens]`, random latents at
/// `resolution / 8`, epsilon loss, AdamW. `steps` timed steps follow one warm-up step.
pub fn bench_train_step<B: AutodiffBackend>(
    unet_config_dir: &Path,
    mode: UnetMode,
    resolution: usize,
    batch: usize,
    steps: usize,
    device: &B::Device,
) -> Result<TrainStepBench> {
    let ucfg = sd_unet::UNetConfig::load(unet_config_dir)?;
    let inner = UNet2DConditionModel::<B::InnerBackend>::from_weights(&ucfg, &model_io::Weights::random(device))?;
    let mut unet = set_require_grad(UNet2DConditionModel::<B>::from_inner(inner), mode == UnetMode::Full);
    if let UnetMode::Lora { rank, alpha } = mode {
        sd_unet::lora::attach(&mut unet, rank, alpha);
    }
    let d = unet.cross_attention_dim();
    let settings = AlignerSettings::default();
    let mut aligner = Aligner::<B>::new(768, d, d, &settings, device);
    let (mut oa, mut ou) = (AdamW::<B::InnerBackend>::new(1e-2), AdamW::<B::InnerBackend>::new(1e-2));
    let h = resolution / 8;
    let trainable = host_params::<B, _>(&aligner, true)
        .values()
        .chain(host_params::<B, _>(&unet, true).values())
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut rng = SeededRng::new(0);
    let mut randn = |shape: Vec<usize>| {
        let mut v = vec![0f32; shape.iter().product()];
        rng.fill_standard_normal(&mut v);
        TensorData::new(v, shape)
    };
    let mut step_seconds = Vec::with_capacity(steps);
    for i in 0..=steps {
        let start = std::time::Instant::now();
        let q = Tensor::<B, 3>::from_data(randn(vec![batch, 32, 768]), device);
        let text = Tensor::<B, 3>::from_data(randn(vec![batch, 77, d]), device);
        let x = Tensor::<B, 4>::from_data(randn(vec![batch, 4, h, h]), device);
        let target = Tensor::<B, 4>::from_data(randn(vec![batch, 4, h, h]), device);
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![500f32; batch], [batch]), device);
        let ctx = q_aligner::assemble(text, aligner.forward(q)?);
        let loss = (unet.forward(x, t, ctx)? - target).powi_scalar(2).mean();
        let grads = loss.backward();
        oa.t += 1;
        ou.t += 1;
        aligner = adamw_step::<B, _>(aligner, &mut oa, &grads, 1e-4, 1.0);
        if mode != UnetMode::Frozen {
            unet = adamw_step::<B, _>(unet, &mut ou, &grads, 1e-4, 1.0);
        }
        drop(grads);
        let _ = scalar(&aligner.fc2.bias.as_ref().expect("bias").val().sum());
        if i > 0 {
            step_seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(TrainStepBench {
        seconds_per_step: step_seconds.iter().sum::<f64>() / steps.max(1) as f64,
        step_seconds,
        peak_rss_bytes: peak_rss_bytes(),
        trainable_params: trainable,
    })
}
