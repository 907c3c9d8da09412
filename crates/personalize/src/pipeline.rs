//! Text-to-image with classifier-free guidance, as diffusers' `StableDiffusionPipeline`,
//! with optional visual-prompt tokens appended to the context.

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use clip_text::{ClipTextModel, ClipTokenizer};
use model_io::{Checkpoint, Error, Result};
use q_aligner::Aligner;
use scheduler::{BurnNoise, Sample, Scheduler};
use sd_unet::UNet2DConditionModel;
use sd_vae::{AutoencoderKl, AutoencoderKlConfig};

use crate::concept::Concept;
use crate::image_out::RgbImage;
use crate::metadata::ImageSettings;

/// A Stable Diffusion pipeline loaded from a diffusers folder (`model_index.json`,
/// `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
pub struct Pipeline<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKl<B>,
    pub vae_config: AutoencoderKlConfig,
    pub base_dir: PathBuf,
    /// Fingerprint of the base UNet weights (see [`Checkpoint::fingerprint`]).
    pub unet_fingerprint: String,
    unet_sample_size: Option<usize>,
    scheduler_dir: PathBuf,
    device: B::Device,
}

/// The components of a pipeline, for [`Pipeline::from_parts`]: models loaded from separate
/// folders, or built from their configs with random weights (benchmarks).
pub struct PipelineParts<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    /// The UNet config's `sample_size` (latent side of the default image size).
    pub unet_sample_size: Option<usize>,
    pub vae: AutoencoderKl<B>,
    pub vae_config: AutoencoderKlConfig,
    /// A folder with `scheduler_config.json`.
    pub scheduler_dir: PathBuf,
}

/// What to generate. Defaults follow `StableDiffusionPipeline.__call__`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    /// Empty string when `None`, as diffusers.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    /// A scheduler name (`ddim`, `euler`, `dpm++2m`, ...) overriding the model's.
    pub scheduler: Option<String>,
    pub seed: u64,
    pub num_images: usize,
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            num_images: 1,
            height: None,
            width: None,
        }
    }
}

/// Visual-prompt conditioning for one generation: an aligner and the BLIP-2 queries of the
/// reference image(s).
pub struct VisualPrompt<'a, B: Backend> {
    pub aligner: &'a Aligner<B>,
    /// `[N, Q, 768]`; several images are averaged into one visual prompt.
    pub queries: Tensor<B, 3>,
}

impl<B: Backend> Pipeline<B> {
    /// Loads every component of a diffusers Stable Diffusion folder.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let pipe = personalize::Pipeline::<Flex>::load("sd-v1-5".as_ref(), &FlexDevice)?;
    /// let opts = personalize::GenerateOptions { prompt: "a fox".into(), steps: 20, ..Default::default() };
    /// let images = pipe.generate(&opts, None, None, &mut |_, _| {})?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Err(Error::Config { path: index, message: "missing: not a diffusers pipeline folder".into() });
        }
        let _: serde_json::Value = model_io::read_config(dir, "model_index.json")?;
        let unet_dir = dir.join("unet");
        let unet_fingerprint = Checkpoint::open_dir(&unet_dir, &["diffusion_pytorch_model"])?.fingerprint();
        let unet_cfg = sd_unet::UNetConfig::load(&unet_dir)?;
        let vae_config = AutoencoderKlConfig::load(&dir.join("vae"))?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::load(&dir.join("text_encoder"), device)?,
            unet: UNet2DConditionModel::load(&unet_dir, device)?,
            vae: AutoencoderKl::load(&dir.join("vae"), device)?,
            vae_config,
            base_dir: dir.to_path_buf(),
            unet_fingerprint,
            unet_sample_size: unet_cfg.sample_size,
            scheduler_dir: dir.join("scheduler"),
            device: device.clone(),
        })
    }

    /// A pipeline from separately built components. It has no base folder: `base_dir` is the
    /// scheduler folder and `unet_fingerprint` is empty, so concepts trained elsewhere need
    /// `allow_mismatch` and training needs [`Pipeline::load`].
    pub fn from_parts(parts: PipelineParts<B>, device: &B::Device) -> Self {
        Self {
            tokenizer: parts.tokenizer,
            text_encoder: parts.text_encoder,
            unet: parts.unet,
            vae: parts.vae,
            vae_config: parts.vae_config,
            base_dir: parts.scheduler_dir.clone(),
            unet_fingerprint: String::new(),
            unet_sample_size: parts.unet_sample_size,
            scheduler_dir: parts.scheduler_dir,
            device: device.clone(),
        }
    }

    /// The device the models live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Default image side: the UNet's sample size times the VAE factor (512 for SD 1.5).
    pub fn default_size(&self) -> usize {
        self.unet_sample_size.unwrap_or(64) * self.vae.downscale_factor()
    }

    /// The folder with `scheduler_config.json` the model's scheduler is built from.
    pub fn scheduler_dir(&self) -> &Path {
        &self.scheduler_dir
    }

    /// The settings a generation with `opts` records in its images' text chunks (image 0 of
    /// `opts.num_images`, no concept): the size it resolves to and the scheduler class that
    /// runs, checked as [`Pipeline::generate`] checks them, so an error comes before sampling.
    pub fn image_settings(&self, opts: &GenerateOptions) -> Result<ImageSettings> {
        let [_, _, h, w] = self.latent_shape(opts)?;
        let f = self.vae.downscale_factor();
        let (class, sigmas) = crate::metadata::scheduler_in_use(&self.scheduler_dir, opts.scheduler.as_deref())?;
        Ok(ImageSettings {
            prompt: opts.prompt.clone(),
            negative_prompt: opts.negative_prompt.clone(),
            seed: opts.seed,
            steps: opts.steps,
            guidance: opts.guidance,
            scheduler: opts.scheduler.clone(),
            scheduler_class: Some(class),
            sigmas,
            height: Some(h * f),
            width: Some(w * f),
            base: Some(self.base_dir.display().to_string()),
            num_images: opts.num_images,
            ..Default::default()
        })
    }

    /// CLIP embeddings of `prompts`: `[N, 77, D]`.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor<B, 3>> {
        let rows: Vec<Vec<i64>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect::<Result<_>>()?;
        self.text_encoder.forward(self.text_encoder.ids_tensor(&rows))
    }

    /// Applies a concept's UNet changes (LoRA or full weights). Refuses a concept trained on
    /// another base model unless `allow_mismatch`.
    pub fn apply_concept(&mut self, concept: &Concept<B>, allow_mismatch: bool) -> Result<()> {
        if concept.info.base_unet_fingerprint != self.unet_fingerprint && !allow_mismatch {
            return Err(Error::invalid(format!(
                "concept {} was trained on another base model ({}; this one is {}); pass --allow-base-mismatch to use it anyway",
                concept.dir.display(),
                concept.info.base_model,
                self.base_dir.display()
            )));
        }
        if self.aligner_width_mismatch(&concept.aligner) {
            return Err(Error::invalid(format!(
                "concept {} makes tokens of width {}, but this UNet's cross_attention_dim is {}",
                concept.dir.display(),
                concept.aligner.out_dim(),
                self.unet.cross_attention_dim()
            )));
        }
        match concept.info.unet.as_str() {
            "lora" => {
                let path = concept.dir.join("unet_lora.safetensors");
                let (t, meta) = model_io::tensor_file::read_tensors_with_metadata(&path)?;
                let on = |e: Error| Error::invalid(format!("{}: {e}", path.display()));
                // The adapter config current diffusers writes into the file holds over concept.json.
                match sd_unet::lora::PeftLoraConfig::from_metadata(&meta, "unet").map_err(on)? {
                    Some(cfg) => sd_unet::lora::load_lora_scaled(&mut self.unet, &t, &|m, r| cfg.scale(m, r)),
                    None => sd_unet::lora::load_lora(&mut self.unet, &t, concept.info.lora_alpha),
                }
                .map_err(on)?;
            }
            "full" => self.unet = UNet2DConditionModel::load(&concept.dir.join("unet"), &self.device)?,
            _ => {}
        }
        Ok(())
    }

    fn aligner_width_mismatch(&self, a: &Aligner<B>) -> bool {
        a.out_dim() != self.unet.cross_attention_dim()
    }

    /// The conditional and unconditional contexts, stacked `[uncond; cond]` (each
    /// `[N, 77 + k, D]`) when guiding, or the conditional alone.
    pub fn contexts(&self, opts: &GenerateOptions, visual: Option<&VisualPrompt<B>>, n: usize) -> Result<Tensor<B, 3>> {
        let cond_text = self.encode_prompts(&[opts.prompt.clone()])?;
        let guided = opts.guidance > 1.0;
        let mut cond = cond_text;
        let mut uncond =
            if guided { Some(self.encode_prompts(&[opts.negative_prompt.clone().unwrap_or_default()])?) } else { None };
        if let Some(v) = visual {
            if self.aligner_width_mismatch(v.aligner) {
                return Err(Error::invalid(format!(
                    "the aligner makes tokens of width {}, but the UNet's cross_attention_dim is {}",
                    v.aligner.out_dim(),
                    self.unet.cross_attention_dim()
                )));
            }
            let [_, q, d] = v.queries.dims();
            let mean = v.queries.clone().mean_dim(0).reshape([1, q, d]);
            cond = q_aligner::assemble(cond, v.aligner.forward(mean)?);
            uncond = match uncond {
                Some(u) => Some(q_aligner::assemble(u, v.aligner.unconditional(1, q, &self.device)?)),
                None => None,
            };
        }
        let cond = cond.repeat_dim(0, n);
        Ok(match uncond {
            Some(u) => Tensor::cat(vec![u.repeat_dim(0, n), cond], 0),
            None => cond,
        })
    }

    /// Checks the size and returns the latent shape `[N, C, h, w]`.
    pub fn latent_shape(&self, opts: &GenerateOptions) -> Result<[usize; 4]> {
        if opts.num_images == 0 {
            return Err(Error::invalid("--num-images must be at least 1"));
        }
        if !opts.guidance.is_finite() {
            return Err(Error::invalid(format!("--guidance {} must be a finite number", opts.guidance)));
        }
        let f = self.vae.downscale_factor();
        let (h, w) = (opts.height.unwrap_or(self.default_size()), opts.width.unwrap_or(self.default_size()));
        for (name, v) in [("height", h), ("width", w)] {
            if v == 0 || v % f != 0 {
                return Err(Error::invalid(format!("--{name} {v} must be a positive multiple of {f}")));
            }
        }
        Ok([opts.num_images, self.unet.in_channels(), h / f, w / f])
    }

    /// Initial noise from `seed` (before scaling by `init_noise_sigma`), `[N, C, h, w]`.
    pub fn noise(&self, shape: [usize; 4], seed: u64) -> Tensor<B, 4> {
        let mut rng = scheduler::SeededRng::new(seed);
        let mut v = vec![0f32; shape.iter().product()];
        rng.fill_standard_normal(&mut v);
        Tensor::from_data(TensorData::new(v, shape), &self.device)
    }

    /// Runs the denoising loop and decodes. `latents` (unscaled initial noise, as diffusers'
    /// `latents=`) overrides the seed's and sets the number of images. `on_step(i, n)` is
    /// called after each step (progress bars).
    pub fn generate(
        &self,
        opts: &GenerateOptions,
        visual: Option<&VisualPrompt<B>>,
        latents: Option<Tensor<B, 4>>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<RgbImage>> {
        let shape = self.latent_shape(opts)?;
        let latents = match latents {
            Some(l) => {
                let d = l.dims();
                if d[1..] != shape[1..] || d[0] == 0 {
                    return Err(Error::invalid(format!(
                        "latents have shape {d:?}; expected [N, {}, {}, {}] for {}x{} images",
                        shape[1],
                        shape[2],
                        shape[3],
                        shape[2] * self.vae.downscale_factor(),
                        shape[3] * self.vae.downscale_factor()
                    )));
                }
                l
            }
            None => self.noise(shape, opts.seed),
        };
        let n = latents.dims()[0];
        if opts.steps == 0 {
            return Err(Error::invalid("--steps must be at least 1"));
        }
        let ctx = self.contexts(opts, visual, n)?;
        let guided = opts.guidance > 1.0;
        let mut sched: Box<dyn Scheduler<Tensor<B, 4>>> =
            scheduler::load(&self.scheduler_dir, opts.scheduler.as_deref())
                .map_err(|e| Error::invalid(e.to_string()))?;
        sched.set_timesteps(opts.steps).map_err(|e| Error::invalid(e.to_string()))?;
        let mut noise = BurnNoise::seeded::<B>(&self.device, opts.seed.wrapping_add(1));
        let mut x = latents.scale(sched.init_noise_sigma());
        let timesteps = sched.timesteps().to_vec();
        // Every step's timestep features in one upload: the loop below sends nothing from the
        // host to the device and reads nothing back.
        let t_features = self
            .unet
            .timestep_features(Tensor::from_data(TensorData::new(timesteps.clone(), [timesteps.len()]), &self.device));
        let serr = |e: scheduler::SchedulerError| Error::invalid(e.to_string());
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided { Tensor::cat(vec![x.clone(), x.clone()], 0) } else { x.clone() };
            let input = sched.scale_model_input(&input, t).map_err(serr)?;
            let pred = self.unet.forward_features(input, t_features.clone().slice([i..i + 1]), ctx.clone())?;
            let pred = if guided {
                let mut halves = pred.chunk(2, 0);
                let text = halves.pop().expect("two halves");
                let uncond = halves.pop().expect("two halves");
                uncond.clone() + (text - uncond) * opts.guidance
            } else {
                pred
            };
            x = sched.step(&pred, t, &x, &mut noise).map_err(serr)?;
            on_step(i + 1, timesteps.len());
        }
        self.decode(x)
    }

    /// Scaled latents to 8-bit images (diffusers' `postprocess`: `(x / 2 + 0.5).clamp(0, 1)`,
    /// then `round(x · 255)`).
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
        let img = self.vae.decode(latents / self.vae_config.scaling_factor)?;
        let img = (img / 2.0 + 0.5).clamp(0.0, 1.0);
        let [n, c, h, w] = img.dims();
        if c != 3 {
            return Err(Error::invalid(format!("the VAE makes {c} channels; PNG output needs 3")));
        }
        let v = model_io::tensor_file::HostTensor::from_tensor(img.permute([0, 2, 3, 1]));
        let v = v.as_f32("image")?;
        Ok((0..n)
            .map(|i| RgbImage {
                width: w,
                height: h,
                data: v[i * h * w * 3..(i + 1) * h * w * 3].iter().map(|x| (x * 255.0).round() as u8).collect(),
            })
            .collect())
    }
}
