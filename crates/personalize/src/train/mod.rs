//! Personalisation training (`personalize train`): the aligner and, per [`UnetMode`], the UNet
//! (all weights, LoRA adapters, or none) on Burn's autodiff backend.
//!
//! What a step does, as diffusers' DreamBooth script with latents cached:
//!
//! 1. Once, before training: each image is cropped and resized to the resolution in
//!    `1 + augment` views (the centre crop of the shorter side, then random square crops of
//!    `[min_crop, 1]` of it, each mirrored with probability 1/2 when `flip`), and every view is
//!    encoded by the frozen VAE; the latent distribution (mean, std) of each view is kept on the
//!    host. The prompt's CLIP embeddings are computed once (on SDXL both encoders' and the pooled
//!    projection, with each view's `add_time_ids` from its crop, as diffusers'
//!    `train_dreambooth_lora_sdxl.py`). The BLIP-2 queries of the images are
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
//! use personalize::train::{train, TrainConfig, TrainData, TrainRequest, UnetMode};
//! let images = personalize::train::load_images(&["dog.jpg".into()])?;
//! let queries = model_io::tensor_file::read_tensors("queries.safetensors".as_ref())?.remove("queries").unwrap();
//! let cfg = TrainConfig { unet_mode: UnetMode::Lora { rank: 4, alpha: 4.0 }, ..TrainConfig::default() };
//! let data = TrainData { images, queries, class_images: vec![] };
//! let request = TrainRequest { base: &personalize::Base::new("sd-v1-5"), config: &cfg, data: &data, out: "my-dog".as_ref(), resume: false };
//! let report = train::<Autodiff<Flex>>(&request, &FlexDevice, &mut |s| {
//!     println!("step {} loss {:.4}", s.step, s.loss)
//! })?;
//! # Ok::<(), personalize::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use model_io::tensor_file::{read_tensors, read_tensors_with_metadata, write_tensors, HostTensor};
use q_aligner::{Aligner, AlignerSettings, QuerySelection};
use scheduler::{HostSample, Scheduler, SeededRng};

use crate::concept::{Concept, ConceptInfo};
use crate::image_out::{write_png, RgbImage};
use crate::metadata::ImageSettings;
use crate::pipeline::{GenerateOptions, GenerateRequest, Pipeline, VisualPrompt};
mod checkpoint;
mod class_images;
mod config;
mod data;
mod lock;
mod model;
mod output;
mod parts;

use checkpoint::ckpt_name;
pub use checkpoint::list_checkpoints;
pub use class_images::{generate_class_images, ClassImages};
pub use config::{PriorConfig, TrainConfig, UnetMode};
pub use lock::{OutLock, RUN_OUTPUTS};

pub use data::{image_files, load_image, load_images, plot_losses};
use data::{render, time_ids, views};
pub use model::{Batch, GradNorms, Optimizer, TrainModel};
pub use parts::AdamW;
use parts::{host_params, load_params};

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

/// A view's cached latent distribution (host, `[C, h, w]` each).
struct CachedLatent {
    image: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// SDXL's original size, crop top-left and target size of the view.
    time_ids: [f32; 6],
}

/// A prompt's frozen encoding: the context `[1, 77, D]` and, on SDXL, the pooled `[1, P]`.
struct CachedText {
    context: HostTensor,
    pooled: Option<HostTensor>,
}

/// One training run: the base model, the settings, the data, and the concept folder.
pub struct TrainRequest<'a> {
    /// The base model: a diffusers folder, or a single file with its `--config` and
    /// `--prediction-type`.
    pub base: &'a crate::Base,
    /// The settings.
    pub config: &'a TrainConfig,
    /// The images, their BLIP-2 queries and the class images.
    pub data: &'a TrainData,
    /// The concept folder to write (checkpoints under `checkpoints/`).
    pub out: &'a Path,
    /// Continue from the latest checkpoint in `out` instead of starting over.
    pub resume: bool,
}

/// The trainer: frozen parts (text encoder, VAE, tokenizer in `pipe`), the trained
/// [`TrainModel`] and its [`Optimizer`], with the cached latents and embeddings. [`train`]
/// drives it.
pub struct Trainer<B: AutodiffBackend> {
    pub cfg: TrainConfig,
    /// The base pipeline on the inner backend. Its UNet is pointed at the trained weights before
    /// sample images are made.
    pub pipe: Pipeline<B::InnerBackend>,
    /// The aligner and the UNet being trained.
    pub model: TrainModel<B>,
    /// AdamW of the aligner and of the UNet, and the gradient clip.
    pub opt: Optimizer<B>,
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
    text: CachedText,
    class_text: Option<CachedText>,
    queries: HostTensor,
    data_fingerprint: String,
}

/// A batch drawn from a pool of views: the view indices, the noisy latents, the targets and
/// the timesteps (host).
struct Drawn {
    picks: Vec<usize>,
    noisy: HostSample,
    target: HostSample,
    ts: Vec<usize>,
}

/// The step's own generator: a function of the seed and the step only.
fn step_rng(seed: u64, step: usize) -> SeededRng {
    SeededRng::new(seed ^ (step as u64).wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Loads the base model, checks the data, caches latents and embeddings, builds the aligner
    /// and the UNet per the mode, and with `resume` restores the latest checkpoint in `out_dir`.
    pub fn new(request: &TrainRequest<'_>, device: &B::Device) -> Result<Self> {
        let TrainRequest { base, config: cfg, data, out: out_dir, resume } = *request;
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
            return Err(Error::NonFinite("the BLIP-2 queries contain NaN or infinite values".into()));
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

        let pipe = Pipeline::<B::InnerBackend>::open(base, device)?;
        let f = pipe.vae.downscale_factor();
        if !cfg.resolution.is_multiple_of(f) {
            return Err(Error::invalid(format!(
                "--resolution {} must be a multiple of the VAE factor {f}",
                cfg.resolution
            )));
        }
        if let Some(avail) = crate::memory::available_bytes() {
            let h = cfg.resolution / f;
            let mut need = crate::memory::training_bytes(pipe.unet_config(), &pipe.vae_config, cfg.batch, h, h);
            if cfg.gradient_checkpointing {
                // Balanced checkpointing kept 0.55 of the activations of SD 1.5's LoRA step at
                // 512² (peak RSS 14.2 -> 9.4 GiB over 3.4 GiB of weights), rounded up.
                need *= 0.6;
            }
            if need > avail as f64 {
                let what = format!("training at --resolution {} with --batch {}", cfg.resolution, cfg.batch);
                return Err(crate::memory::too_big(&what, need, avail, "; lower --resolution or --batch"));
            }
        }
        let sched = scheduler::from_config::<HostSample>(pipe.scheduler_config(), None)?;
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
        let encode_text = |p: &str| -> Result<CachedText> {
            let (context, pooled) = pipe.encode_text(&[p.to_string()])?;
            Ok(CachedText { context: HostTensor::from_tensor(context), pooled: pooled.map(HostTensor::from_tensor) })
        };
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
        let aligner = Aligner::<B>::new(dq, hidden, d_text, &settings, &mut init, device);
        let model = TrainModel::new(aligner, pipe.unet.clone(), cfg.unet_mode, &mut init);

        let mut t = Self {
            cfg: cfg.clone(),
            pipe,
            model,
            opt: Optimizer::new(cfg.weight_decay, cfg.max_grad_norm),
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
                t.load_checkpoint(dir).map_err(|e| match e {
                    e @ Error::ResumeMismatch { .. } => e,
                    e => Error::invalid(format!("cannot resume from {}: {e}", dir.display())),
                })?;
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
                let data = TensorData::new(render(img, v, res), [1, 3, res, res]);
                let x = match pipe.vae_dtype {
                    // SDXL's upcast VAE in a half-precision run takes f32 images.
                    Some(d) => Tensor::<B::InnerBackend, 4>::from_data(data, (device, burn::tensor::DType::from(d))),
                    None => Tensor::<B::InnerBackend, 4>::from_data(data, device),
                };
                let (mean, logvar) = pipe.vae.encode(x)?;
                let std = (logvar * 0.5).exp();
                let mean = HostTensor::from_tensor(mean).as_f32("mean")?.to_vec();
                let std = HostTensor::from_tensor(std).as_f32("std")?.to_vec();
                if mean.iter().chain(&std).any(|v| !v.is_finite()) {
                    let vae = pipe.vae_source.clone();
                    return Err(crate::check::nonfinite_error(
                        &format!("the VAE encoding of training image {i}"),
                        "VAE",
                        &pipe.vae,
                        &vae,
                    ));
                }
                out.push(CachedLatent { image: i, mean, std, time_ids: time_ids(v, img.width, img.height, res) });
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
    fn draw(&self, rng: &mut SeededRng, pool: &[CachedLatent]) -> Result<Drawn> {
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
        let x0 = HostSample::new(x0, shape.clone())?;
        let noise = HostSample::new(noise, shape)?;
        let noisy = self.sched.add_noise(&x0, &noise, &ts)?;
        let target = self.sched.training_target(&x0, &noise, &ts)?;
        Ok(Drawn { picks, noisy, target, ts })
    }

    fn tensor4(&self, s: HostSample) -> Tensor<B, 4> {
        let shape: [usize; 4] = [s.shape[0], s.shape[1], s.shape[2], s.shape[3]];
        Tensor::from_data(TensorData::new(s.data, shape), &self.device)
    }

    /// The batch of the views `picks` of `pool`, with the prompt's encoding `text`; `queries`
    /// (`None` for class images) of their images.
    fn batch(
        &self,
        drawn: Drawn,
        pool: &[CachedLatent],
        text: &CachedText,
        queries: Option<Tensor<B, 3>>,
    ) -> Result<Batch<B>> {
        let Drawn { picks, noisy, target, ts } = drawn;
        let b = picks.len();
        // In f32 under any --dtype: the UNet's sinusoids need exact timesteps (see sd_unet::f32_tensor).
        let timesteps = sd_unet::f32_tensor::<B, 1>(ts.iter().map(|&t| t as f32).collect(), [ts.len()], &self.device);
        let added = match &text.pooled {
            Some(p) => {
                let ids: Vec<f32> = picks.iter().flat_map(|&i| pool[i].time_ids).collect();
                Some(sd_unet::AddedConditioning {
                    text_embeds: p.to_float::<B, 2>("text_embeds", &self.device)?.repeat_dim(0, b),
                    time_ids: sd_unet::f32_tensor(ids, [b, 6], &self.device),
                })
            }
            None => None,
        };
        let text = text.context.to_float::<B, 3>("text", &self.device)?.repeat_dim(0, b);
        Ok(Batch { queries, text, noisy: self.tensor4(noisy), timesteps, target: self.tensor4(target), added })
    }

    /// One optimizer step. Errors (without updating anything) on a NaN or infinite loss or
    /// gradient.
    pub fn train_step(&mut self) -> Result<StepInfo> {
        let step = self.step + 1;
        let mut rng = step_rng(self.cfg.seed, step);
        let drawn = self.draw(&mut rng, &self.views)?;
        let (picks, b) = (drawn.picks.clone(), drawn.picks.len());

        // Queries of the drawn views' images.
        let [_, q, dq] = [self.queries.shape[0], self.queries.shape[1], self.queries.shape[2]];
        let all = self.queries.as_f32("queries")?;
        let mut qb = Vec::with_capacity(b * q * dq);
        for &p in &picks {
            let i = self.views[p].image;
            qb.extend_from_slice(&all[i * q * dq..(i + 1) * q * dq]);
        }
        let qt = Tensor::<B, 3>::from_data(TensorData::new(qb, [b, q, dq]), &self.device);
        let loss = self.model.loss(self.batch(drawn, &self.views, &self.text, Some(qt))?)?;
        let loss_v = scalar(&loss);

        let (total, prior_v) = match (&self.cfg.prior, &self.class_text) {
            (Some(p), Some(ct)) => {
                let class = self.draw(&mut rng, &self.class_views)?;
                let pl = self.model.loss(self.batch(class, &self.class_views, ct, None)?)?;
                let pv = scalar(&pl);
                (loss + pl * p.weight, Some(pv))
            }
            _ => (loss, None),
        };
        if !loss_v.is_finite() || prior_v.is_some_and(|v| !v.is_finite()) {
            return Err(self.nan_error(step, "loss"));
        }
        let grads = total.backward();
        let norms = self.opt.norms(&self.model, &grads);
        if !norms.total().is_finite() {
            return Err(self.nan_error(step, "gradient"));
        }
        let lr = self.cfg.lr * self.warmup(step);
        let unet_lr = self.cfg.unet_lr.unwrap_or(self.cfg.lr) * self.warmup(step);
        self.model = self.opt.step(self.model.clone(), &grads, &norms, lr, unet_lr);
        if self.cfg.unet_mode == UnetMode::Full {
            // Let the inner pipeline share the new weights instead of keeping the old ones.
            self.pipe.unet = self.model.unet.valid();
        }
        self.step = step;
        self.losses.push(LossRow { step, loss: loss_v as f32, prior_loss: prior_v.map(|v| v as f32), lr });
        Ok(StepInfo {
            step,
            total_steps: self.cfg.steps,
            loss: loss_v,
            prior_loss: prior_v,
            grad_norm_aligner: norms.aligner,
            grad_norm_unet: norms.unet,
            lr,
        })
    }

    fn nan_error(&self, step: usize, what: &str) -> Error {
        // Nothing of this step was applied: weights that hold NaN now held it before, and a
        // lower learning rate would not help.
        let damaged = crate::check::first_nonfinite_param::<B, _>(&self.model.unet)
            .map(|p| format!("the UNet's weight `{p}`"))
            .or_else(|| {
                crate::check::first_nonfinite_param::<B, _>(&self.model.aligner)
                    .map(|p| format!("the aligner's weight `{p}`"))
            })
            .or_else(|| {
                let bad = |t: &CachedText| {
                    std::iter::once(&t.context)
                        .chain(&t.pooled)
                        .any(|t| t.as_f32("text").is_ok_and(|v| v.iter().any(|x| !x.is_finite())))
                };
                (bad(&self.text) || self.class_text.as_ref().is_some_and(bad))
                    .then(|| "the text encoder's embedding of the prompt".to_string())
            });
        if let Some(d) = damaged {
            let from = if step == 1 && self.resumed_from.is_none() { "the base model" } else { "a checkpoint" };
            return Error::NonFinite(format!(
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
        Error::NonFinite(format!(
            "the {what} became NaN or infinite at step {step}; training stopped, nothing of this step was kept; {kept}"
        ))
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
    request: &TrainRequest<'_>,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<TrainReport> {
    let (cfg, out_dir) = (request.config, request.out);
    let created = !out_dir.exists();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::Io { path: out_dir.to_path_buf(), cause: e })?;
    let lock = OutLock::take(out_dir)?;
    let mut t = match Trainer::<B>::new(request, device) {
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
