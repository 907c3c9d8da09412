//! Text-to-image with classifier-free guidance, as diffusers' `StableDiffusionPipeline`,
//! with optional visual-prompt tokens appended to the context.

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};
use clip_text::{ClipTextModel, ClipTextModelWithProjection, ClipTokenizer};
use model_io::Checkpoint;

use crate::{Error, Result};
use q_aligner::Aligner;
use scheduler::{BurnNoise, Sample, Scheduler};
use sd_unet::{AddedConditioning, UNet2DConditionModel};
use sd_vae::{AutoencoderKl, AutoencoderKlConfig};

use crate::concept::Concept;
use crate::image_out::RgbImage;
use crate::metadata::ImageSettings;
pub use crate::request::{Batches, GenerateOptions, GenerateRequest, VisualPrompt, DEFAULT_MAX_BATCH};
pub use crate::single_file::Base;

/// A Stable Diffusion pipeline loaded from a diffusers folder (`model_index.json`,
/// `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; SDXL's adds `text_encoder_2/`
/// and `tokenizer_2/`) or a single-file checkpoint.
pub struct Pipeline<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    /// SDXL's second text encoder; `None` for SD 1.x/2.x.
    pub text_encoder_2: Option<SecondEncoder<B>>,
    /// SDXL's `force_zeros_for_empty_prompt` (model_index.json): without a negative prompt the
    /// unconditional embeddings are zeros, not the empty prompt's.
    pub force_zeros_for_empty_prompt: bool,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKl<B>,
    pub vae_config: AutoencoderKlConfig,
    /// The float type the VAE was read in and runs in when it is not the device's default:
    /// f32 for SDXL's `force_upcast` VAE in a half-precision pipeline (see [`vae_dtype`]).
    pub vae_dtype: Option<burn::tensor::FloatDType>,
    /// The base model: its folder, or its single file.
    pub base_path: PathBuf,
    /// A single-file base's `--config` folder and `--prediction-type`, as given.
    pub base_config: Option<PathBuf>,
    pub prediction_type: Option<String>,
    /// The UNet's `config.json` as read or inferred (what a full fine-tune writes next to its
    /// weights).
    pub unet_config_json: serde_json::Value,
    /// The base UNet's tensor shapes by diffusers key (what a full fine-tune's export is
    /// checked against).
    pub base_unet_shapes: std::collections::BTreeMap<String, Vec<usize>>,
    /// Where the text encoder and the VAE came from, for messages.
    text_encoder_source: PathBuf,
    pub(crate) vae_source: PathBuf,
    /// Fingerprint of the base UNet weights (see [`Checkpoint::fingerprint`]).
    pub unet_fingerprint: String,
    /// The fingerprint of the same weights as the first releases computed it (file bytes), so
    /// concepts they trained still match.
    unet_fingerprint_legacy: String,
    unet_config: sd_unet::UNetConfig,
    /// The folder the UNet's weights came from (a concept's `unet/` once a full one is applied),
    /// for messages.
    unet_dir: PathBuf,
    scheduler_dir: PathBuf,
    /// `scheduler_dir/scheduler_config.json`, read once: each generation builds its schedulers
    /// from it.
    scheduler_config: scheduler::SchedulerConfig,
    device: B::Device,
}

/// SDXL's `text_encoder_2` and `tokenizer_2`: its penultimate states join the first encoder's
/// in the context, and its pooled projection is the UNet's `text_embeds`.
pub struct SecondEncoder<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModelWithProjection<B>,
    /// The folder it came from, for messages.
    pub source: PathBuf,
}

/// What conditions the UNet besides the latents: the cross-attention context and, for SDXL,
/// the pooled text embeddings (`[uncond; cond]` when guiding, like the context).
#[derive(Debug, Clone)]
pub struct Conditioning<B: Backend> {
    /// `[1 or 2, 77 + k, D]`.
    pub context: Tensor<B, 3>,
    /// SDXL's `text_embeds`, `[1 or 2, P]`.
    pub text_embeds: Option<Tensor<B, 2>>,
}

/// The components of a pipeline, for [`Pipeline::from_parts`]: models loaded from separate
/// folders, or built from their configs with random weights (benchmarks).
pub struct PipelineParts<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    /// The UNet's config (its `sample_size` sets the default image size; its widths the memory
    /// estimate).
    pub unet_config: sd_unet::UNetConfig,
    pub vae: AutoencoderKl<B>,
    pub vae_config: AutoencoderKlConfig,
    /// A folder with `scheduler_config.json`.
    pub scheduler_dir: PathBuf,
}

/// The float type SDXL's VAE runs in when its config asks for `force_upcast` and the device's
/// default float type is half precision (`--dtype f16`/`bf16` on Burn's ops): f32, as diffusers
/// upcasts an fp16 SDXL pipeline's VAE, which overflows in f16. `None`: the default. diffusers
/// upcasts for f16 only; bf16 has f32's range, but f32 is also the more exact decode here.
///
/// ```
/// use burn_flex::{Flex, FlexDevice};
/// let cfg: sd_vae::AutoencoderKlConfig = serde_json::from_str(r#"{"block_out_channels": [32]}"#).unwrap();
/// assert!(cfg.force_upcast); // diffusers' default
/// // An f32 pipeline (the default) needs no upcast.
/// assert_eq!(personalize::vae_dtype::<Flex>(&cfg, true, &FlexDevice), None);
/// ```
pub fn vae_dtype<B: Backend>(
    cfg: &AutoencoderKlConfig,
    sdxl: bool,
    device: &B::Device,
) -> Option<burn::tensor::FloatDType> {
    use burn::tensor::FloatDType;
    let default = burn::tensor::get_device_settings::<B>(device).float_dtype;
    (sdxl && cfg.force_upcast && matches!(default, FloatDType::F16 | FloatDType::BF16)).then_some(FloatDType::F32)
}

/// The VAE from `ckpt`, its tensors read as `dtype` when given (see [`vae_dtype`]).
fn build_vae<B: Backend>(
    ckpt: &Checkpoint,
    cfg: &AutoencoderKlConfig,
    dtype: Option<burn::tensor::FloatDType>,
    device: &B::Device,
) -> Result<AutoencoderKl<B>> {
    let w = model_io::Weights::new(ckpt, device);
    let w = match dtype {
        Some(d) => w.in_float_dtype(d),
        None => w,
    };
    let vae = AutoencoderKl::from_weights(cfg, &w)?;
    w.finish(&[])?;
    Ok(vae)
}

/// Every tensor's shape by key.
fn shapes(ckpt: &Checkpoint) -> std::collections::BTreeMap<String, Vec<usize>> {
    ckpt.names().filter_map(|k| Some((k.to_string(), ckpt.info(k)?.shape.clone()))).collect()
}

impl<B: Backend> Pipeline<B> {
    /// Loads every component of a diffusers Stable Diffusion folder.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let pipe = personalize::Pipeline::<Flex>::load("sd-v1-5".as_ref(), &FlexDevice)?;
    /// let opts = personalize::GenerateOptions { prompt: "a fox".into(), steps: 20, ..Default::default() };
    /// let images = pipe.generate(personalize::GenerateRequest::new(&opts))?;
    /// # Ok::<(), personalize::Error>(())
    /// ```
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Self::open(&Base::new(dir), device)
    }

    /// Loads a base model: a diffusers folder as [`Pipeline::load`], or a single-file
    /// checkpoint (see [`crate::SingleFile`]) with the configs of `base.config` or inferred.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let base = personalize::Base::new("v1-5-pruned-emaonly.safetensors");
    /// let pipe = personalize::Pipeline::<Flex>::open(&base, &FlexDevice)?;
    /// # Ok::<(), personalize::Error>(())
    /// ```
    pub fn open(base: &Base, device: &B::Device) -> Result<Self> {
        let dir = base.path.as_path();
        if base.is_split() {
            return Self::open_single_file(base, device);
        }
        let index = base.check_folder()?;
        let index_json: serde_json::Value = model_io::read_config(dir, "model_index.json")?;
        let class = index_json.get("_class_name").and_then(|c| c.as_str());
        match class {
            None
            | Some(
                "StableDiffusionPipeline"
                | "StableDiffusionImg2ImgPipeline"
                | "StableDiffusionXLPipeline"
                | "StableDiffusionXLImg2ImgPipeline",
            ) => {}
            Some(other) => {
                return Err(Error::Config {
                    path: index,
                    message: format!(
                        "_class_name is `{other}`; this release runs StableDiffusionPipeline and \
                         StableDiffusionXLPipeline folders"
                    ),
                })
            }
        }
        let force_zeros_for_empty_prompt =
            index_json.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);
        let unet_dir = dir.join("unet");
        let mut ckpt = Checkpoint::open_dir(&unet_dir, &["diffusion_pytorch_model"])?;
        // Of the base's own weights: a concept trained on it applies with LoRAs merged too.
        let (unet_fingerprint, unet_fingerprint_legacy) = (ckpt.fingerprint(), ckpt.legacy_fingerprint());
        let base_unet_shapes = shapes(&ckpt);
        let unet_cfg = sd_unet::UNetConfig::load(&unet_dir)?;
        let unet_config_json = model_io::read_config(&unet_dir, "config.json")?;
        let vae_config = AutoencoderKlConfig::load(&dir.join("vae"))?;
        let scheduler_config = scheduler::SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let text_dir = dir.join("text_encoder");
        let text_config = clip_text::ClipTextConfig::load(&text_dir)?;
        let mut text_ckpt = Checkpoint::open_dir(&text_dir, &["model"])?;
        let class = class.unwrap_or_default();
        if class.starts_with("StableDiffusionXL") && unet_cfg.addition_embed_type.is_none() {
            return Err(Error::Config {
                path: index,
                message: format!(
                    "_class_name is `{class}`, but unet/config.json has no addition_embed_type: the UNet is \
                     SD 1.x/2.x's, not SDXL's"
                ),
            });
        }
        let mut second = match unet_cfg.addition_embed_type {
            Some(_) => Some(SecondFolder::open(dir)?),
            None => None,
        };
        let text_2 = second.as_mut().map(|s| &mut s.checkpoint);
        crate::merge_loras::<B>(&base.loras, &mut ckpt, &unet_cfg, &mut text_ckpt, text_2, device)?;
        let text_encoder_2 = match second {
            Some(s) => Some(s.build(&unet_cfg, text_config.hidden_size, device)?),
            None => None,
        };
        let upcast = vae_dtype::<B>(&vae_config, text_encoder_2.is_some(), device);
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::from_checkpoint(&text_config, &text_ckpt, device)?,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            unet: UNet2DConditionModel::from_checkpoint(&unet_cfg, &ckpt, device)?,
            vae: build_vae(
                &Checkpoint::open_dir(&dir.join("vae"), &["diffusion_pytorch_model"])?,
                &vae_config,
                upcast,
                device,
            )?,
            vae_dtype: upcast,
            vae_config,
            base_path: dir.to_path_buf(),
            base_config: None,
            prediction_type: None,
            unet_config_json,
            base_unet_shapes,
            text_encoder_source: dir.join("text_encoder"),
            vae_source: dir.join("vae"),
            unet_fingerprint,
            unet_fingerprint_legacy,
            unet_config: unet_cfg,
            unet_dir,
            scheduler_dir: dir.join("scheduler"),
            scheduler_config,
            device: device.clone(),
        })
    }

    fn open_single_file(base: &Base, device: &B::Device) -> Result<Self> {
        let mut f = crate::SingleFile::open(base)?;
        let (unet_config, vae_config, text_config) = (f.unet_config, f.vae_config, f.text_config);
        let mut second = match (f.text_encoder_2.take(), unet_config.addition_embed_type.is_some()) {
            (Some(t), true) => Some(t),
            (None, false) => None,
            (Some(_), false) => {
                return Err(Error::Config {
                    path: f.path.clone(),
                    message: "has SDXL's two text encoders, but the UNet config has no addition_embed_type \
                              (SD 1.x/2.x's); pass --config with an SDXL folder"
                        .into(),
                })
            }
            (None, true) => {
                return Err(Error::Config {
                    path: f.path.clone(),
                    message: "the UNet is SDXL's (addition_embed_type \"text_time\"), but the file has one text \
                              encoder; an SDXL file has `conditioner.embedders.1.model.*` too"
                        .into(),
                })
            }
        };
        // Over the UNet's tensors under diffusers' keys (the same as the folder's), before LoRAs.
        let unet_fingerprint = f.unet.fingerprint();
        let base_unet_shapes = shapes(&f.unet);
        let text_2 = second.as_mut().map(|t| &mut t.checkpoint);
        crate::merge_loras::<B>(&base.loras, &mut f.unet, &unet_config, &mut f.text_encoder, text_2, device)?;
        let text_encoder_2 = match second {
            Some(t) => {
                let text_encoder = ClipTextModelWithProjection::from_checkpoint(&t.config, &t.checkpoint, device)?;
                check_second(&unet_config, text_config.hidden_size, &t.config, &text_encoder, &f.path)?;
                Some(SecondEncoder { tokenizer: t.tokenizer, text_encoder, source: f.path.clone() })
            }
            None => None,
        };
        fn built<'a, B: Backend>(ckpt: &'a Checkpoint, device: &B::Device) -> model_io::Weights<'a, B> {
            model_io::Weights::new(ckpt, device)
        }
        let w = built::<B>(&f.text_encoder, device);
        let text_encoder = ClipTextModel::from_weights(&text_config, &w.pp("text_model"))?;
        w.finish(&[])?;
        let w = built::<B>(&f.unet, device);
        let unet = UNet2DConditionModel::from_weights(&unet_config, &w)?;
        w.finish(&[])?;
        let upcast = vae_dtype::<B>(&vae_config, text_encoder_2.is_some(), device);
        let vae = build_vae(&f.vae, &vae_config, upcast, device)?;
        let scheduler_dir = match &base.config {
            _ if f.path.join("scheduler").is_dir() => f.path.join("scheduler"),
            Some(d) => d.join("scheduler"),
            None => f.path.clone(),
        };
        Ok(Self {
            tokenizer: f.tokenizer,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt: f.force_zeros_for_empty_prompt,
            unet,
            vae,
            vae_dtype: upcast,
            vae_config,
            base_path: f.path.clone(),
            base_config: base.config.clone(),
            prediction_type: base.prediction_type.clone(),
            unet_config_json: f.unet_config_json,
            base_unet_shapes,
            text_encoder_source: f.path.clone(),
            vae_source: f.path.clone(),
            unet_fingerprint,
            unet_fingerprint_legacy: String::new(),
            unet_config,
            unet_dir: f.path.clone(),
            scheduler_dir,
            scheduler_config: f.scheduler_config,
            device: device.clone(),
        })
    }

    /// A pipeline from separately built components. It has no base folder: `base_path` is the
    /// scheduler folder and `unet_fingerprint` is empty, so concepts trained elsewhere need
    /// `allow_mismatch` and training needs [`Pipeline::load`].
    pub fn from_parts(parts: PipelineParts<B>, device: &B::Device) -> Result<Self> {
        sd_only(&parts.unet_config, &parts.scheduler_dir.join("../unet/config.json"))?;
        let scheduler_config =
            scheduler::SchedulerConfig::from_file(&parts.scheduler_dir.join("scheduler_config.json"))?;
        Ok(Self {
            tokenizer: parts.tokenizer,
            text_encoder: parts.text_encoder,
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
            unet: parts.unet,
            vae: parts.vae,
            vae_dtype: None,
            vae_config: parts.vae_config,
            base_path: parts.scheduler_dir.clone(),
            base_config: None,
            prediction_type: None,
            unet_config_json: serde_json::Value::Null,
            base_unet_shapes: Default::default(),
            text_encoder_source: parts.scheduler_dir.join("../text_encoder"),
            vae_source: parts.scheduler_dir.join("../vae"),
            unet_fingerprint: String::new(),
            unet_fingerprint_legacy: String::new(),
            unet_config: parts.unet_config,
            unet_dir: parts.scheduler_dir.join("../unet"),
            scheduler_dir: parts.scheduler_dir,
            scheduler_config,
            device: device.clone(),
        })
    }

    /// `sdxl` for a StableDiffusionXLPipeline, `sd` for SD 1.x/2.x: what a concept records
    /// and is checked against.
    ///
    /// ```no_run
    /// # fn f(pipe: &personalize::Pipeline<burn_flex::Flex>) {
    /// assert!(["sd", "sdxl"].contains(&pipe.architecture()));
    /// # }
    /// ```
    pub fn architecture(&self) -> &'static str {
        if self.text_encoder_2.is_some() {
            "sdxl"
        } else {
            "sd"
        }
    }

    /// The UNet's config.
    pub fn unet_config(&self) -> &sd_unet::UNetConfig {
        &self.unet_config
    }

    /// The device the models live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Default image side: the UNet's sample size times the VAE factor (512 for SD 1.5).
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size.unwrap_or(64) * self.vae.downscale_factor()
    }

    /// The folder with `scheduler_config.json` the model's scheduler is built from; for a
    /// single file without `--config`, the file itself (its scheduler is SD 1.5's).
    pub fn scheduler_dir(&self) -> &Path {
        &self.scheduler_dir
    }

    /// The scheduler config every generation builds its schedulers from.
    pub fn scheduler_config(&self) -> &scheduler::SchedulerConfig {
        &self.scheduler_config
    }

    /// The settings a generation with `opts` records in its images' text chunks (image 0 of
    /// `opts.num_images`, no concept): the size it resolves to and the scheduler class that
    /// runs, checked as [`Pipeline::generate`] checks them, so an error comes before sampling.
    pub fn image_settings(&self, opts: &GenerateOptions) -> Result<ImageSettings> {
        let [_, _, h, w] = self.latent_shape(opts)?;
        let f = self.vae.downscale_factor();
        let (class, sigmas) = crate::metadata::scheduler_in_use(&self.scheduler_config, opts.scheduler.as_deref())?;
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
            original_size: opts.original_size,
            crop_top_left: opts.crop_top_left,
            target_size: opts.target_size,
            base: Some(self.base_path.display().to_string()),
            num_images: opts.num_images,
            batch_size: Some(self.batches(opts)?.batch),
            ..Default::default()
        })
    }

    /// The text context of `prompts`, `[N, 77, D]`: CLIP's last hidden state (SD 1.x/2.x), or
    /// SDXL's two encoders' penultimate states side by side (`D = D1 + D2`).
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor<B, 3>> {
        Ok(self.encode_text(prompts)?.0)
    }

    /// [`Pipeline::encode_prompts`] and, for SDXL, the second encoder's pooled projection
    /// `[N, P]` (the UNet's `text_embeds`), as `StableDiffusionXLPipeline.encode_prompt`.
    pub fn encode_text(&self, prompts: &[String]) -> Result<(Tensor<B, 3>, Option<Tensor<B, 2>>)> {
        let ids = |tok: &ClipTokenizer| -> Result<Vec<Vec<i64>>> {
            Ok(prompts.iter().map(|p| tok.encode(p)).collect::<model_io::Result<_>>()?)
        };
        let first = self.text_encoder.ids_tensor(&ids(&self.tokenizer)?);
        let Some(xl) = &self.text_encoder_2 else { return Ok((self.text_encoder.forward(first)?, None)) };
        let first = self.text_encoder.forward_hidden_states(first)?.penultimate();
        let second = xl.text_encoder.forward(xl.text_encoder.text_model.ids_tensor(&ids(&xl.tokenizer)?))?;
        Ok((Tensor::cat(vec![first, second.text.penultimate()], 2), Some(second.text_embeds)))
    }

    /// Applies a concept's UNet changes (LoRA or full weights). Refuses a concept trained on
    /// another base model unless `allow_mismatch`.
    pub fn apply_concept(&mut self, concept: &Concept<B>, allow_mismatch: bool) -> Result<()> {
        let arch = concept.info.architecture.as_deref().unwrap_or("sd");
        if arch != self.architecture() {
            let name = |a: &str| if a == "sdxl" { "SDXL" } else { "SD 1.x/2.x" };
            return Err(Error::Config {
                path: concept.dir.join("concept.json"),
                message: format!(
                    "the concept was trained on an {} base (architecture `{arch}`), but {} is {}; \
                     a concept only works on the architecture it was trained on",
                    name(arch),
                    self.base_path.display(),
                    name(self.architecture())
                ),
            });
        }
        if !self.is_base_of(&concept.info.base_unet_fingerprint) && !allow_mismatch {
            return Err(Error::BaseMismatch {
                concept: concept.dir.clone(),
                base: self.base_path.clone(),
                trained_on: concept.info.base_unet_fingerprint.clone(),
                here: self.unet_fingerprint.clone(),
                named: concept.info.base_model.clone(),
            });
        }
        if self.aligner_width_mismatch(&concept.aligner) {
            return Err(Error::invalid(format!(
                "concept {} makes tokens of width {}, but this UNet's cross_attention_dim is {}",
                concept.dir.display(),
                concept.aligner.out_dim(),
                self.unet.cross_attention_dim()
            )));
        }
        match concept.info.unet {
            crate::UnetChange::Lora => {
                let path = concept.dir.join("unet_lora.safetensors");
                let (t, meta) = model_io::tensor_file::read_tensors_with_metadata(&path)?;
                for (name, v) in &t {
                    if v.as_f32(name).is_ok_and(|v| v.iter().any(|x| !x.is_finite())) {
                        return Err(Error::invalid(format!(
                            "{}: tensor `{name}` holds NaN or Inf; the file is damaged",
                            path.display()
                        )));
                    }
                }
                if t.is_empty() {
                    return Err(Error::invalid(format!(
                        "{}: holds no tensors; expected the LoRA's lora_A/lora_B pairs",
                        path.display()
                    )));
                }
                let on = |e: model_io::Error| Error::invalid(format!("{}: {e}", path.display()));
                // The adapter config current diffusers writes into the file holds over concept.json.
                match sd_unet::lora::PeftLoraConfig::from_metadata(&meta, "unet").map_err(on)? {
                    Some(cfg) if concept.info.lora_alpha.is_some_and(|a| a != cfg.lora_alpha) => {
                        return Err(Error::Config {
                            path: concept.dir.join("concept.json"),
                            message: format!(
                                "lora_alpha is {}, but {} records lora_alpha {}",
                                concept.info.lora_alpha.unwrap_or_default(),
                                path.display(),
                                cfg.lora_alpha
                            ),
                        });
                    }
                    Some(cfg) => sd_unet::lora::load_lora_scaled(&mut self.unet, &t, &|m, r| cfg.scale(m, r)),
                    None => sd_unet::lora::load_lora(&mut self.unet, &t, concept.info.lora_alpha),
                }
                .map_err(on)?;
            }
            crate::UnetChange::Full => {
                self.unet_dir = concept.dir.join("unet");
                self.unet = UNet2DConditionModel::load(&self.unet_dir, &self.device)?
            }
            crate::UnetChange::Frozen => {}
        }
        Ok(())
    }

    /// True when `fingerprint` (a concept's `base_unet_fingerprint`) is this UNet's, in the
    /// current form or the first releases' form.
    pub fn is_base_of(&self, fingerprint: &str) -> bool {
        !fingerprint.is_empty() && (fingerprint == self.unet_fingerprint || fingerprint == self.unet_fingerprint_legacy)
    }

    fn aligner_width_mismatch(&self, a: &Aligner<B>) -> bool {
        a.out_dim() != self.unet.cross_attention_dim()
    }

    /// The conditional and unconditional contexts, stacked `[uncond; cond]` (each
    /// `[N, 77 + k, D]`) when guiding, or the conditional alone: [`Pipeline::conditioning`]'s
    /// context.
    pub fn contexts(&self, opts: &GenerateOptions, visual: Option<&VisualPrompt<B>>, n: usize) -> Result<Tensor<B, 3>> {
        Ok(self.conditioning(opts, visual, n)?.context)
    }

    /// The contexts of [`Pipeline::contexts`] and, for SDXL, the pooled `text_embeds` stacked
    /// the same way. Without a negative prompt an SDXL model with `force_zeros_for_empty_prompt`
    /// gets zeros for the unconditional text (as diffusers); visual tokens come after the text
    /// in both halves, the aligner's output for zero queries in the unconditional one. Errors
    /// naming the stage (text encoder, visual queries, aligner) when one makes NaN or infinite
    /// values.
    pub fn conditioning(
        &self,
        opts: &GenerateOptions,
        visual: Option<&VisualPrompt<B>>,
        n: usize,
    ) -> Result<Conditioning<B>> {
        let text = |prompt: &str| -> Result<(Tensor<B, 3>, Option<Tensor<B, 2>>)> {
            let (t, pooled) = self.encode_text(&[prompt.to_string()])?;
            if !crate::check::all_finite(&t) || pooled.as_ref().is_some_and(|p| !crate::check::all_finite(p)) {
                let (whose, name, source) = match &self.text_encoder_2 {
                    Some(xl) => ("text encoders'", "text encoders", &xl.source),
                    None => ("text encoder's", "text encoder", &self.text_encoder_source),
                };
                return Err(crate::check::nonfinite_error(
                    &format!("the {whose} output for {prompt:?}"),
                    name,
                    &self.text_encoder,
                    source,
                ));
            }
            Ok((t, pooled))
        };
        let guided = opts.guidance > 1.0;
        if !guided && opts.negative_prompt.is_some() {
            tracing::warn!(
                "--negative-prompt has no effect with --guidance {} (guidance needs a scale above 1)",
                opts.guidance
            );
        }
        if opts.guidance < 1.0 {
            tracing::warn!("--guidance {} is below 1: guidance is off, as with 1", opts.guidance);
        }
        let (mut cond, cond_pooled) = text(&opts.prompt)?;
        let zeros =
            self.text_encoder_2.is_some() && self.force_zeros_for_empty_prompt && opts.negative_prompt.is_none();
        let (mut uncond, uncond_pooled) = match guided {
            false => (None, None),
            true if zeros => (Some(cond.zeros_like()), cond_pooled.as_ref().map(Tensor::zeros_like)),
            true => {
                let (u, p) = text(opts.negative_prompt.as_deref().unwrap_or_default())?;
                (Some(u), p)
            }
        };
        if let Some(v) = visual {
            if self.aligner_width_mismatch(v.aligner) {
                return Err(Error::invalid(format!(
                    "the aligner makes tokens of width {}, but the UNet's cross_attention_dim is {}",
                    v.aligner.out_dim(),
                    self.unet.cross_attention_dim()
                )));
            }
            let [_, q, d] = v.queries.dims();
            if !crate::check::all_finite(&v.queries) {
                return Err(Error::NonFinite("the visual prompt's BLIP-2 queries hold NaN or infinite values".into()));
            }
            let max: f64 = v.queries.clone().abs().max().into_scalar().elem();
            if max > 1e4 {
                return Err(Error::invalid(format!(
                    "the visual prompt's BLIP-2 queries reach {max:.1e}, not BLIP-2 output (a few units at most)"
                )));
            }
            let mean = v.queries.clone().mean_dim(0).reshape([1, q, d]);
            let tokens = v.aligner.forward(mean)?;
            let empty = match uncond.is_some() {
                true => Some(v.aligner.unconditional(1, q, &self.device)?),
                false => None,
            };
            if !crate::check::all_finite(&tokens) || empty.as_ref().is_some_and(|e| !crate::check::all_finite(e)) {
                return Err(crate::check::nonfinite_error(
                    "the aligner's visual tokens",
                    "aligner",
                    v.aligner,
                    Path::new("aligner.safetensors"),
                ));
            }
            cond = q_aligner::assemble(cond, tokens);
            uncond = match (uncond, empty) {
                (Some(u), Some(e)) => Some(q_aligner::assemble(u, e)),
                _ => None,
            };
        }
        Ok(Conditioning {
            context: stack(uncond, cond, n),
            text_embeds: cond_pooled.map(|c| stack(uncond_pooled, c, n)),
        })
    }

    /// SDXL's `add_time_ids` for `opts`: original size, crop top-left and target size as
    /// (height, width) and (top, left), defaulting to the image size and (0, 0). Errors on an
    /// absurd value; warns that they do nothing on SD 1.x/2.x.
    pub fn time_ids(&self, opts: &GenerateOptions) -> Result<[f32; 6]> {
        let given = [
            ("--original-size", opts.original_size),
            ("--crop-top-left", opts.crop_top_left),
            ("--target-size", opts.target_size),
        ];
        if self.text_encoder_2.is_none() {
            for (flag, v) in given {
                if v.is_some() {
                    tracing::warn!(
                        "{flag} has no effect: the model is not SDXL (only SDXL's UNet takes size conditioning)"
                    );
                }
            }
        }
        for (flag, v) in given {
            if let Some([a, b]) = v {
                if a.max(b) > 16384 || (flag != "--crop-top-left" && a.min(b) == 0) {
                    return Err(Error::invalid(format!(
                        "{flag} {a},{b} is absurd; expected {} up to 16384",
                        if flag == "--crop-top-left" { "TOP,LEFT" } else { "HEIGHT,WIDTH, each from 1" }
                    )));
                }
            }
        }
        let [_, _, h, w] = self.latent_shape(opts)?;
        let f = self.vae.downscale_factor();
        let size = [h * f, w * f];
        let ([oh, ow], [ct, cl], [th, tw]) = (
            opts.original_size.unwrap_or(size),
            opts.crop_top_left.unwrap_or([0, 0]),
            opts.target_size.unwrap_or(size),
        );
        Ok([oh, ow, ct, cl, th, tw].map(|v| v as f32))
    }

    /// Checks the size and returns the latent shape `[N, C, h, w]`.
    pub fn latent_shape(&self, opts: &GenerateOptions) -> Result<[usize; 4]> {
        if opts.num_images == 0 {
            return Err(Error::invalid("--num-images must be at least 1"));
        }
        if opts.batch_size == Some(0) {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        if !opts.guidance.is_finite() {
            return Err(Error::invalid(format!("--guidance {} must be a finite number", opts.guidance)));
        }
        if opts.guidance.abs() > 100.0 {
            return Err(Error::invalid(format!(
                "--guidance {} is absurd (A1111 allows up to 30, ComfyUI 100); 7.5 is the default",
                opts.guidance
            )));
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

    /// Bytes one batch of `batch` images of `shape`'s latents needs
    /// ([`crate::memory::generation_bytes`]).
    pub fn batch_bytes(&self, opts: &GenerateOptions, batch: usize) -> Result<f64> {
        let [_, _, h, w] = self.latent_shape(opts)?;
        let dtype = burn::tensor::Tensor::<B, 1>::empty([1], &self.device).dtype().size();
        Ok(crate::memory::generation_bytes(
            &self.unet_config,
            &self.vae_config,
            batch,
            h,
            w,
            opts.guidance > 1.0,
            dtype,
        ))
    }

    /// The batches a generation runs: `opts.batch_size`, or as many images as fit in the memory
    /// available ([`crate::memory::available_bytes`]), at most [`DEFAULT_MAX_BATCH`]. Errors,
    /// with the estimate and the limit, when even one image cannot fit or when the given
    /// batch cannot.
    pub fn batches(&self, opts: &GenerateOptions) -> Result<Batches> {
        let [n, _, h, w] = self.latent_shape(opts)?;
        let f = self.vae.downscale_factor();
        let what = |b: usize| {
            let images = if b == 1 { "one image".to_string() } else { format!("a batch of {b} images") };
            format!("generating {images} of {}x{}", w * f, h * f)
        };
        let one = self.batch_bytes(opts, 1)?;
        let avail = crate::memory::available_bytes();
        let batch = match (opts.batch_size, avail) {
            (Some(b), Some(a)) => {
                let b = b.min(n);
                let need = self.batch_bytes(opts, b)?;
                if need > a as f64 {
                    let hint = if one <= a as f64 { "; lower --batch-size" } else { "; lower --height/--width" };
                    return Err(crate::memory::too_big(&what(b), need, a, hint));
                }
                b
            }
            (Some(b), None) => b.min(n),
            (None, Some(a)) => {
                if one > a as f64 {
                    return Err(crate::memory::too_big(&what(1), one, a, "; lower --height/--width"));
                }
                let fits = (a as f64 / one).floor() as usize;
                fits.clamp(1, DEFAULT_MAX_BATCH).min(n)
            }
            (None, None) => DEFAULT_MAX_BATCH.min(n),
        };
        Ok(Batches { count: n, batch })
    }

    /// Initial noise from `seed` (before scaling by `init_noise_sigma`), `[N, C, h, w]`.
    pub fn noise(&self, shape: [usize; 4], seed: u64) -> Tensor<B, 4> {
        let mut rng = scheduler::SeededRng::new(seed);
        let mut v = vec![0f32; shape.iter().product()];
        rng.fill_standard_normal(&mut v);
        Tensor::from_data(TensorData::new(v, shape), &self.device)
    }

    /// Runs the denoising loop and decodes, returning every image: [`Pipeline::generate_each`]
    /// collected.
    pub fn generate(&self, request: GenerateRequest<'_, B>) -> Result<Vec<RgbImage>> {
        let mut out = Vec::new();
        self.generate_each(request, &mut |_, _| {}, &mut |_, img| {
            out.push(img);
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs the denoising loop and decodes, batch by batch ([`Pipeline::batches`]), handing each
    /// image to `on_image(index, image)` as soon as its batch is decoded: memory stays bounded by
    /// one batch, whatever the number of images.
    ///
    /// Image `i`'s initial noise is the `i`-th slice of the seed's noise stream, so it does not
    /// depend on the batch size. Ancestral schedulers (`euler-a`, `ddpm`) draw their step noise
    /// for a whole batch, from `seed + 1 + first image of the batch`: for them the batch size
    /// is part of the settings. The request's `latents` (unscaled initial noise, as diffusers'
    /// `latents=`) override the seed's and set the number of images; `only` runs just the batch
    /// holding that image and hands over just it (re-running one image of an earlier
    /// generation). `on_step(done, total)` is called after each step of each batch (progress
    /// bars).
    ///
    /// Stops with [`Error::Interrupted`] between steps once [`crate::interrupt::request`] was
    /// called (Ctrl-C); the images handed over until then are kept by the caller. Stops with
    /// an error naming the stage when one makes NaN or infinite values.
    pub fn generate_each(
        &self,
        request: GenerateRequest<'_, B>,
        on_step: &mut dyn FnMut(usize, usize),
        on_image: &mut dyn FnMut(usize, RgbImage) -> Result<()>,
    ) -> Result<()> {
        let GenerateRequest { options: opts, visual, latents, only } = request;
        let mut opts = opts.clone();
        let shape = self.latent_shape(&opts)?;
        if let Some(l) = &latents {
            let d = l.dims();
            if d[1..] != shape[1..] || d[0] == 0 {
                return Err(Error::invalid(format!(
                    "latents have shape {d:?}; expected [N >= 1, {}, {}, {}] for {}x{} images",
                    shape[1],
                    shape[2],
                    shape[3],
                    shape[2] * self.vae.downscale_factor(),
                    shape[3] * self.vae.downscale_factor()
                )));
            }
            if !crate::check::all_finite(l) {
                return Err(Error::NonFinite("the initial latents hold NaN or infinite values".into()));
            }
            let max: f64 = l.clone().abs().max().into_scalar().elem();
            if max > 1e4 {
                return Err(Error::invalid(format!(
                    "the initial latents reach {max:.1e}; they are unscaled noise (standard normal, as diffusers' latents=)"
                )));
            }
            opts.num_images = d[0];
        }
        let n = opts.num_images;
        if let Some(i) = only {
            if i >= n {
                return Err(Error::invalid(format!("image {i} asked for, but the generation makes {n}")));
            }
        }
        if opts.steps == 0 {
            return Err(Error::invalid("--steps must be at least 1"));
        }
        let batches = self.batches(&opts)?;
        let ranges: Vec<_> = batches.ranges().filter(|r| only.is_none_or(|i| r.contains(&i))).collect();
        let cond1 = self.conditioning(&opts, visual, 1)?;
        // Checked (and warned about on SD 1.x/2.x) whatever the model.
        let time_ids = self.time_ids(&opts)?;
        let time_ids =
            cond1.text_embeds.as_ref().map(|_| sd_unet::f32_tensor::<B, 2>(time_ids.to_vec(), [1, 6], &self.device));
        let guided = opts.guidance > 1.0;
        // A fresh scheduler per batch (the multistep ones keep the previous outputs).
        let sched_cfg = &self.scheduler_config;
        let new_sched = || -> Result<Box<dyn Scheduler<Tensor<B, 4>>>> {
            let mut s = scheduler::from_config(sched_cfg, opts.scheduler.as_deref())?;
            s.set_timesteps(opts.steps)?;
            Ok(s)
        };
        let timesteps = new_sched()?.timesteps().to_vec();
        // Every step's timestep features in one upload: the loop below sends nothing from the
        // host to the device.
        let t_features =
            self.unet.timestep_features(sd_unet::f32_tensor(timesteps.clone(), [timesteps.len()], &self.device));
        let sched_file = self.scheduler_dir.join("scheduler_config.json");
        let serr = |e: scheduler::SchedulerError| {
            let m = e.to_string();
            if m.contains("scheduler_config.json") {
                Error::invalid(m)
            } else {
                Error::invalid(format!("the scheduler ({}): {m}", sched_file.display()))
            }
        };
        let total = ranges.len() * timesteps.len();
        let mut rng = scheduler::SeededRng::new(opts.seed);
        let mut drawn = 0; // images whose initial noise the stream has passed
        let per_image: usize = shape[1..].iter().product();
        let mut done_steps = 0;
        for range in ranges {
            let b = range.len();
            let x0 = match &latents {
                Some(l) => l.clone().narrow(0, range.start, b),
                None => {
                    let mut skip = vec![0f32; per_image];
                    while drawn < range.start {
                        rng.fill_standard_normal(&mut skip);
                        drawn += 1;
                    }
                    let mut v = vec![0f32; b * per_image];
                    rng.fill_standard_normal(&mut v);
                    drawn += b;
                    Tensor::from_data(TensorData::new(v, [b, shape[1], shape[2], shape[3]]), &self.device)
                }
            };
            let ctx = batch_share(&cond1.context, guided, b);
            let added = match (&cond1.text_embeds, &time_ids) {
                (Some(p), Some(t)) => Some(AddedConditioning {
                    text_embeds: batch_share(p, guided, b),
                    time_ids: t.clone().repeat_dim(0, if guided { 2 * b } else { b }),
                }),
                _ => None,
            };
            let mut sched = new_sched()?;
            let mut noise =
                BurnNoise::seeded::<B>(&self.device, opts.seed.wrapping_add(1).wrapping_add(range.start as u64));
            let mut x = x0.scale(sched.init_noise_sigma());
            for (i, &t) in timesteps.iter().enumerate() {
                if crate::interrupt::requested() {
                    return Err(Error::Interrupted(format!("stopped at step {} of image {}", i + 1, range.start)));
                }
                let input = if guided { Tensor::cat(vec![x.clone(), x.clone()], 0) } else { x.clone() };
                let input = sched.scale_model_input(&input, t).map_err(serr)?;
                let t_feat = t_features.clone().narrow(0, i, 1);
                let pred = self.unet.forward_features_with(input, t_feat, ctx.clone(), added.as_ref())?;
                let pred = if guided {
                    let uncond = pred.clone().narrow(0, 0, b);
                    let text = pred.narrow(0, b, b);
                    uncond.clone() + (text - uncond) * opts.guidance
                } else {
                    pred
                };
                x = sched.step(&pred, t, &x, &mut noise).map_err(serr)?;
                // One scalar read per step: NaN stops here, named, instead of a black image.
                if !crate::check::all_finite(&x) {
                    let at = format!("step {} of {} (timestep {t})", i + 1, timesteps.len());
                    return Err(if !crate::check::all_finite(&pred) {
                        crate::check::nonfinite_error(
                            &format!("the UNet's prediction at {at}"),
                            "UNet",
                            &self.unet,
                            &self.unet_dir,
                        )
                    } else {
                        Error::invalid(format!(
                            "the scheduler's step made NaN or infinite latents at {at} from a finite prediction; check scheduler_config.json in {}",
                            self.scheduler_dir.display()
                        ))
                    });
                }
                done_steps += 1;
                on_step(done_steps, total);
            }
            for (j, img) in self.decode(x)?.into_iter().enumerate() {
                let i = range.start + j;
                if only.is_none_or(|o| o == i) {
                    on_image(i, img)?;
                }
            }
        }
        Ok(())
    }

    /// Scaled latents to 8-bit images (diffusers' `postprocess`: `(x / 2 + 0.5).clamp(0, 1)`,
    /// then `round(x · 255)`). Errors when the decode makes NaN or infinite values.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
        // SDXL's force_upcast: its VAE overflows in half precision, so under the CPU's bf16
        // GEMMs it decodes with f32 ones (diffusers upcasts the VAE of an fp16 pipeline); under
        // a half default float type it was read in f32 (`vae_dtype`) and takes f32 latents.
        let upcast = self.text_encoder_2.is_some() && self.vae_config.force_upcast && cpu_kernels::bf16_gemm_on();
        if upcast {
            cpu_kernels::use_bf16_gemm(false);
        }
        let latents = latents / self.vae_config.scaling_factor;
        let latents = match self.vae_dtype {
            Some(d) => latents.cast(d),
            None => latents,
        };
        let img = self.vae.decode(latents);
        if upcast {
            cpu_kernels::use_bf16_gemm(true);
        }
        let img = img?;
        if !crate::check::all_finite(&img) {
            return Err(crate::check::nonfinite_error("the VAE decode", "VAE", &self.vae, &self.vae_source));
        }
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

/// `[uncond; cond]` (each repeated `n` times) when there is an unconditional half, else `cond`
/// repeated.
fn stack<B: Backend, const D: usize>(uncond: Option<Tensor<B, D>>, cond: Tensor<B, D>, n: usize) -> Tensor<B, D> {
    let cond = cond.repeat_dim(0, n);
    match uncond {
        Some(u) => Tensor::cat(vec![u.repeat_dim(0, n), cond], 0),
        None => cond,
    }
}

/// A batch of `b` images' share of a conditioning made for one ([`Pipeline::conditioning`]
/// with `n = 1`): each half repeated `b` times.
fn batch_share<B: Backend, const D: usize>(one: &Tensor<B, D>, guided: bool, b: usize) -> Tensor<B, D> {
    match guided {
        true => {
            let [u, c] = [0, 1].map(|i| one.clone().narrow(0, i, 1));
            stack(Some(u), c, b)
        }
        false => one.clone().repeat_dim(0, b),
    }
}

/// Loads SDXL's `text_encoder_2` and `tokenizer_2` from `dir`, checked against the UNet: the
/// two encoders' widths add up to its `cross_attention_dim`, and the projection is as wide as
/// the pooled `text_embeds` it takes.
/// An SDXL folder's `text_encoder_2/` and `tokenizer_2/`, read but not yet built: LoRAs merge
/// into the checkpoint first.
struct SecondFolder {
    dir: PathBuf,
    tokenizer: PathBuf,
    config: clip_text::ClipTextConfig,
    checkpoint: Checkpoint,
}

impl SecondFolder {
    fn open(dir: &Path) -> Result<Self> {
        let (te, tok) = (dir.join("text_encoder_2"), dir.join("tokenizer_2"));
        for (sub, what) in [(&te, "text_encoder_2"), (&tok, "tokenizer_2")] {
            if !sub.is_dir() {
                return Err(Error::Config {
                    path: sub.clone(),
                    message: format!(
                        "missing: the UNet is SDXL's (addition_embed_type \"text_time\"), and an SDXL folder has \
                         `{what}/` (StableDiffusionXLPipeline's second text encoder)"
                    ),
                });
            }
        }
        let config = clip_text::ClipTextConfig::load(&te)?;
        let checkpoint = Checkpoint::open_dir(&te, &["model"])?;
        Ok(Self { dir: te, tokenizer: tok, config, checkpoint })
    }

    fn build<B: Backend>(
        self,
        unet: &sd_unet::UNetConfig,
        width_1: usize,
        device: &B::Device,
    ) -> Result<SecondEncoder<B>> {
        let text_encoder = ClipTextModelWithProjection::from_checkpoint(&self.config, &self.checkpoint, device)?;
        check_second(unet, width_1, &self.config, &text_encoder, &self.dir.join("config.json"))?;
        Ok(SecondEncoder { tokenizer: ClipTokenizer::from_dir(&self.tokenizer)?, text_encoder, source: self.dir })
    }
}

/// The second encoder fits the UNet: the two encoders' widths add up to its
/// `cross_attention_dim`, and the projection is as wide as the pooled `text_embeds` its
/// `add_embedding` takes. `path` (its config, or the single file) is named in the error.
fn check_second<B: Backend>(
    unet: &sd_unet::UNetConfig,
    width_1: usize,
    cfg: &clip_text::ClipTextConfig,
    text_encoder: &ClipTextModelWithProjection<B>,
    path: &Path,
) -> Result<()> {
    let cross = unet.cross_attention_dim;
    if width_1 + cfg.hidden_size != cross {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "hidden_size {} with text_encoder's {width_1} makes a context {} wide, but the UNet's \
                 cross_attention_dim is {cross}; the context width matches neither encoder pair",
                cfg.hidden_size,
                width_1 + cfg.hidden_size
            ),
        });
    }
    let pooled = unet
        .projection_class_embeddings_input_dim
        .unwrap_or(0)
        .saturating_sub(6 * unet.addition_time_embed_dim.unwrap_or(0));
    if text_encoder.projection_dim() != pooled {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "projection_dim {} makes pooled text_embeds of that width, but the UNet's add_embedding takes {pooled} \
                 (projection_class_embeddings_input_dim minus 6 × addition_time_embed_dim)",
                text_encoder.projection_dim()
            ),
        });
    }
    Ok(())
}

/// The pipeline runs SD 1.x/2.x: an SDXL UNet (which loads, and runs as a stage) is refused
/// here with a message, not on its first step for lack of the added conditioning.
fn sd_only(cfg: &sd_unet::UNetConfig, path: &std::path::Path) -> Result<()> {
    if cfg.addition_embed_type.is_some() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "the UNet is SDXL's (addition_embed_type \"text_time\"); generating and training \
                      run SD 1.x/2.x pipelines only for now (SDXL's UNet runs as `personalize stage unet`)"
                .into(),
        });
    }
    Ok(())
}
