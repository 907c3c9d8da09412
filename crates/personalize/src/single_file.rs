//! Single-file checkpoints (the A1111/civitai layout, `model.safetensors` holding
//! `model.diffusion_model.*`, `first_stage_model.*` and `cond_stage_model.*`; SDXL's
//! `conditioner.embedders.{0,1}.*` for its two text encoders): split into the UNet, VAE and
//! text encoder(s) as diffusers' `from_single_file` splits them, each a view of the file under
//! its model's keys (the key maps are the model crates' `ldm` modules), with the configs from a
//! diffusers folder (`--config`) or inferred from the shapes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clip_text::ClipTokenizer;
use model_io::Checkpoint;

use crate::{Error, Result};

/// Where a base model comes from: a diffusers folder, or a single file with optional configs.
///
/// ```
/// let base = personalize::Base::new("v1-5-pruned-emaonly.safetensors")
///     .with_config("sd-v1-5")
///     .with_prediction_type("v_prediction");
/// assert!(base.config.is_some());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Base {
    /// A diffusers pipeline folder, an ONNX pipeline folder (`unet/model.onnx`, ...) or a single
    /// `.safetensors` file.
    pub path: PathBuf,
    /// Single files and ONNX folders: a diffusers folder whose configs (`unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, `scheduler/`) describe the file's models, as `from_single_file(config=…)`.
    pub config: Option<PathBuf>,
    /// Single files and ONNX folders: `epsilon` or `v_prediction`, over the file's metadata (the
    /// ONNX folder's scheduler) and the default.
    pub prediction_type: Option<String>,
    /// LoRA files merged into the UNet and the text encoder as they load, in order.
    pub loras: Vec<crate::LoraSpec>,
}

impl Base {
    /// A base at `path`, configs inferred.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), ..Self::default() }
    }

    /// With the configs of a diffusers folder.
    pub fn with_config(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config = Some(dir.into());
        self
    }

    /// Whether the base is split into its models as it loads: a single file or an ONNX folder
    /// (a diffusers safetensors folder is not).
    pub fn is_split(&self) -> bool {
        self.path.is_file() || crate::onnx_folder::is_onnx_folder(&self.path)
    }

    /// Whether the base is SDXL, from its configs or a single file's tensor names alone
    /// (nothing loaded): `model_index.json` names a `StableDiffusionXL…` pipeline, the UNet has
    /// `addition_embed_type`, or the single file has `conditioner.embedders.*`. Lets a command
    /// refuse what SDXL does not run yet before heavy work.
    ///
    /// ```
    /// assert!(!personalize::Base::new("no-such-folder").is_sdxl());
    /// ```
    pub fn is_sdxl(&self) -> bool {
        if self.path.is_file() {
            let p = &self.path;
            let file = Checkpoint::open_files(&p.display().to_string(), std::slice::from_ref(p));
            return file.is_ok_and(|f| f.names().any(|k| k.starts_with("conditioner.embedders.")));
        }
        let read = |f: &str| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(self.path.join(f)).ok()?).ok()
        };
        let class = read("model_index.json").and_then(|v| v.get("_class_name")?.as_str().map(str::to_string));
        class.is_some_and(|c| c.starts_with("StableDiffusionXL"))
            || read("unet/config.json").is_some_and(|v| v.get("addition_embed_type").is_some_and(|t| !t.is_null()))
    }

    /// For a folder base: refuses single-file options and a folder without
    /// `model_index.json`; returns that file's path.
    pub(crate) fn check_folder(&self) -> Result<PathBuf> {
        let dir = &self.path;
        if self.config.is_some() || self.prediction_type.is_some() {
            return Err(Error::invalid(format!(
                "{}: --config and --prediction-type apply to single-file checkpoints; a diffusers folder has its own configs",
                dir.display()
            )));
        }
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Err(Error::Config {
                path: index,
                message: "missing: not a diffusers pipeline folder (nor a single .safetensors file)".into(),
            });
        }
        Ok(index)
    }

    /// With LoRAs merged in (`--lora FILE:SCALE`).
    pub fn with_loras(mut self, loras: Vec<crate::LoraSpec>) -> Self {
        self.loras = loras;
        self
    }

    /// `--prediction-type` as diffusers spells it (`v` is `v_prediction`); another value is an
    /// error.
    pub(crate) fn prediction_override(&self) -> Result<Option<String>> {
        match self.prediction_type.as_deref() {
            None => Ok(None),
            Some(p @ ("epsilon" | "v_prediction")) => Ok(Some(p.to_string())),
            Some("v") => Ok(Some("v_prediction".to_string())),
            Some(other) => {
                Err(Error::invalid(format!("--prediction-type `{other}`: expected epsilon or v_prediction")))
            }
        }
    }

    /// With a prediction type (`epsilon`, `v_prediction`).
    pub fn with_prediction_type(mut self, p: impl Into<String>) -> Self {
        self.prediction_type = Some(p.into());
        self
    }
}

/// The text encoder's layout in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// SD 1.x: transformers' CLIP under `cond_stage_model.transformer.`.
    Clip,
    /// SD 2.x: OpenCLIP under `cond_stage_model.model.`.
    OpenClip,
}

/// A single file (or an ONNX pipeline folder) split into its models: each checkpoint a view of
/// the file under the model's own (diffusers) keys, with the configs the models are built from.
pub struct SingleFile {
    pub path: PathBuf,
    pub unet: Checkpoint,
    pub vae: Checkpoint,
    pub text_encoder: Checkpoint,
    pub text_layout: TextLayout,
    /// The UNet's `config.json` as read or inferred (what a full fine-tune writes).
    pub unet_config_json: serde_json::Value,
    pub unet_config: sd_unet::UNetConfig,
    /// The VAE's and the text encoder's `config.json`, as read or inferred.
    pub vae_config_json: serde_json::Value,
    pub text_config_json: serde_json::Value,
    pub vae_config: sd_vae::AutoencoderKlConfig,
    pub text_config: clip_text::ClipTextConfig,
    pub tokenizer: ClipTokenizer,
    pub scheduler_config: scheduler::SchedulerConfig,
    /// SDXL's second text encoder (`conditioner.embedders.1.model.*`); `None` for SD 1.x/2.x.
    pub text_encoder_2: Option<SecondText>,
    /// SDXL's `force_zeros_for_empty_prompt`: `--config`'s `model_index.json`, else SDXL's
    /// default (true); false for SD 1.x/2.x.
    pub force_zeros_for_empty_prompt: bool,
}

/// SDXL's second text encoder in a single file: OpenCLIP ViT-bigG as a
/// `CLIPTextModelWithProjection` (keys `text_model.*`, `text_projection.weight`), with its
/// config and tokenizer (`tokenizer_2`, padding with `!`).
pub struct SecondText {
    pub checkpoint: Checkpoint,
    /// Its `config.json`, as read or inferred.
    pub config_json: serde_json::Value,
    pub config: clip_text::ClipTextConfig,
    pub tokenizer: ClipTokenizer,
}

/// Top-level keys of LDM checkpoints that are not weights of the three models: the EMA copy,
/// the training schedule's buffers, the loss's log-variance, SGM's (SDXL) denoiser sigmas.
fn ignored(key: &str) -> bool {
    key.starts_with("model_ema.")
        || key.starts_with("denoiser.")
        || !key.contains('.')
        || key.starts_with("cond_stage_model.transformer.text_model.embeddings.position_ids")
}

/// Whether `path` names a pickle checkpoint: by extension, or, for a file not named
/// `.safetensors`, by its first bytes (a PyTorch zip or a raw pickle). A `.safetensors` file is
/// never sniffed: its first bytes are a header length, which can read as either.
fn is_pickle(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("ckpt" | "pt" | "pth" | "bin" | "pkl") => return true,
        Some("safetensors") => return false,
        _ => {}
    }
    let mut head = [0u8; 9];
    if std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_err() {
        return false;
    }
    // A safetensors header (its JSON opens at byte 8) under another name is not sniffed.
    head[8] != b'{' && (head[..2] == *b"PK" || head[0] == 0x80 && (2..=5).contains(&head[1]))
}

fn config_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Config { path: path.to_path_buf(), message: message.into() }
}

impl SingleFile {
    /// Opens a single-file checkpoint and splits it (see the module docs), or an ONNX pipeline
    /// folder ([`SingleFile::open_onnx_folder`]). A pickle file (`.ckpt`), an SDXL refiner, a
    /// file with keys of no known model, or one missing a model is an error saying which.
    pub fn open(base: &Base) -> Result<Self> {
        let path = base.path.as_path();
        if path.is_dir() {
            return Self::open_onnx_folder(base);
        }
        if is_pickle(path) {
            return Err(config_error(
                path,
                "is a pickle checkpoint (.ckpt/.pt/.bin): loading one can run arbitrary code, so it is \
                 refused. Convert it once to safetensors, e.g. `python -c \"import torch, safetensors.torch as s; \
                 d = torch.load('model.ckpt', map_location='cpu', weights_only=True); \
                 s.save_file({k: v.contiguous() for k, v in d.get('state_dict', d).items() if hasattr(v, 'contiguous')}, \
                 'model.safetensors')\"`",
            ));
        }
        let file = Checkpoint::open_files(&path.display().to_string(), &[path.to_path_buf()])?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut parts: BTreeMap<&str, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
        let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
        let mut text_layout = None;
        // Whether the text encoder is SDXL's (`conditioner.embedders.0.transformer.*`).
        let mut sdxl_text: Option<bool> = None;
        let mut vae_prefix: Option<&str> = None;
        let mut keys: Vec<&str> = file.names().collect();
        keys.sort_unstable();
        for k in keys {
            let shape = file.info(k).map(|i| i.shape.clone()).unwrap_or_default();
            let put = |part: &'static str, rest: &str, parts: &mut BTreeMap<&str, BTreeMap<String, Vec<usize>>>| {
                parts.entry(part).or_default().insert(rest.to_string(), shape.clone());
            };
            if k.starts_with("conditioner.embedders.0.model.") {
                return Err(config_error(
                    path,
                    "is an SDXL refiner checkpoint (OpenCLIP at `conditioner.embedders.0.model.*`); the refiner \
                     is not supported (SDXL base files are)",
                ));
            } else if let Some(r) = k.strip_prefix(clip_text::ldm::SDXL_OPEN_CLIP_PREFIX) {
                put("text2", r, &mut parts);
            } else if let Some(r) = k.strip_prefix(clip_text::ldm::SDXL_CLIP_PREFIX) {
                if text_layout.is_some_and(|t| t != TextLayout::Clip) || sdxl_text == Some(false) {
                    return Err(config_error(
                        path,
                        "holds an SD 1.x/2.x text encoder (`cond_stage_model.*`) and SDXL's \
                         (`conditioner.embedders.*`); keep one",
                    ));
                }
                (text_layout, sdxl_text) = (Some(TextLayout::Clip), Some(true));
                put("text", r, &mut parts);
            } else if let Some(r) = k.strip_prefix(sd_unet::ldm::PREFIX) {
                put("unet", r, &mut parts);
            } else if let Some((p, r)) = sd_vae::ldm::PREFIXES.iter().find_map(|p| Some((*p, k.strip_prefix(p)?))) {
                if vae_prefix.is_some_and(|q| q != p) {
                    return Err(config_error(path, "holds two VAEs (`first_stage_model.*` and `vae.*`); keep one"));
                }
                vae_prefix = Some(p);
                put("vae", r, &mut parts);
            } else if let Some((layout, r)) = [
                (TextLayout::Clip, clip_text::ldm::CLIP_PREFIX),
                (TextLayout::OpenClip, clip_text::ldm::OPEN_CLIP_PREFIX),
            ]
            .into_iter()
            .find_map(|(l, p)| Some((l, k.strip_prefix(p)?)))
            {
                if sdxl_text == Some(true) {
                    return Err(config_error(
                        path,
                        "holds an SD 1.x/2.x text encoder (`cond_stage_model.*`) and SDXL's \
                         (`conditioner.embedders.*`); keep one",
                    ));
                }
                if text_layout.is_some_and(|t| t != layout) {
                    return Err(config_error(
                        path,
                        "holds two text encoders (`cond_stage_model.transformer.*` and `cond_stage_model.model.*`); keep one",
                    ));
                }
                (text_layout, sdxl_text) = (Some(layout), Some(false));
                put("text", r, &mut parts);
            } else if !ignored(k) {
                let top = k.split('.').take(2).collect::<Vec<_>>().join(".");
                *unknown.entry(top).or_default() += 1;
            }
        }
        let found = || {
            let mut f: Vec<String> = parts.iter().map(|(p, t)| format!("{p}: {} tensors", t.len())).collect();
            f.extend(unknown.iter().map(|(p, n)| format!("`{p}.*`: {n} tensors")));
            if f.is_empty() {
                "no tensors".to_string()
            } else {
                f.join(", ")
            }
        };
        if !unknown.is_empty() {
            return Err(config_error(
                path,
                format!(
                    "not a Stable Diffusion 1.x/2.x or SDXL single file (model.diffusion_model.*, \
                     first_stage_model.*, cond_stage_model.* or conditioner.embedders.*); found {}",
                    found()
                ),
            ));
        }
        for (part, what) in [
            ("unet", "UNet (model.diffusion_model.*)"),
            ("vae", "VAE (first_stage_model.*)"),
            ("text", "text encoder (cond_stage_model.*)"),
        ] {
            if !parts.contains_key(part) {
                return Err(config_error(path, format!("has no {what}; found {}", found())));
            }
        }
        let sdxl = sdxl_text == Some(true) || parts.contains_key("text2");
        for (part, what) in [
            ("text", "first text encoder (conditioner.embedders.0.transformer.*)"),
            ("text2", "second text encoder (conditioner.embedders.1.model.*)"),
        ] {
            if sdxl && !parts.contains_key(part) {
                return Err(config_error(path, format!("is an SDXL file without its {what}; found {}", found())));
            }
        }
        let text_layout = text_layout.unwrap_or(TextLayout::Clip);
        let meta = file.metadata();
        let prediction = match base.prediction_override()? {
            Some(p) => Some(p),
            None => metadata_prediction(meta),
        };
        // As diffusers' `from_single_file` without a config: an SD 2.x file (OpenCLIP) gets
        // SD 2.1's v-prediction; the 512-pixel 2.x-base models need `--prediction-type epsilon`.
        let prediction = match prediction {
            None if base.config.is_none() && text_layout == TextLayout::OpenClip => {
                tracing::warn!(
                    "{}: an SD 2.x file without a prediction type in its metadata; using v_prediction as SD 2.1 \
                     (pass --prediction-type epsilon for a 2.x-base model)",
                    path.display()
                );
                Some("v_prediction".to_string())
            }
            p => p,
        };
        let v_prediction = prediction.as_deref() == Some("v_prediction");
        let mut force_zeros_for_empty_prompt = sdxl;
        let (unet_config, vae_config, text_config, tokenizer, mut scheduler_config) = match &base.config {
            Some(dir) => {
                let read = |sub: &str| -> Result<serde_json::Value> {
                    Ok(model_io::read_config(&dir.join(sub), "config.json")?)
                };
                let sched = scheduler::SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
                if sdxl {
                    let index: Option<serde_json::Value> = model_io::read_config(dir, "model_index.json").ok();
                    if let Some(v) = index.as_ref().and_then(|i| i.get("force_zeros_for_empty_prompt")?.as_bool()) {
                        force_zeros_for_empty_prompt = v;
                    }
                }
                (
                    read("unet")?,
                    read("vae")?,
                    read("text_encoder")?,
                    ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
                    sched,
                )
            }
            None => {
                let infer = |r: std::result::Result<serde_json::Value, String>, what: &str| {
                    r.map_err(|m| {
                        config_error(
                            path,
                            format!("{what}: {m}; pass --config DIR with a diffusers folder describing this model"),
                        )
                    })
                };
                let unet = infer(sd_unet::ldm::infer_config(&parts["unet"], v_prediction), "the UNet's config")?;
                let mut vae = infer(sd_vae::ldm::infer_config(&parts["vae"]), "the VAE's config")?;
                let open_clip = text_layout == TextLayout::OpenClip;
                let text = infer(clip_text::ldm::infer_config(&parts["text"], open_clip), "the text encoder's config")?;
                let tokenizer = ClipTokenizer::bundled(open_clip.then_some("!"))?;
                let sched = scheduler::SchedulerConfig::from_json_str(if sdxl {
                    scheduler::SDXL_SCHEDULER_CONFIG
                } else {
                    scheduler::SD15_SCHEDULER_CONFIG
                })?;
                if sdxl {
                    // SDXL's VAE (same layout as SD's) is trained at another latent scale.
                    vae["scaling_factor"] = 0.13025.into();
                }
                (unet, vae, text, tokenizer, sched)
            }
        };
        if let Some(p) = &prediction {
            scheduler_config.set("prediction_type", serde_json::Value::String(p.clone()));
        }
        let cfg_path =
            |sub: &str| base.config.as_ref().map_or_else(|| path.to_path_buf(), |d| d.join(sub).join("config.json"));
        let unet_cfg: sd_unet::UNetConfig = serde_json::from_value(unet_config.clone())
            .map_err(|e| Error::Json { path: cfg_path("unet"), cause: e })?;
        unet_cfg.validate().map_err(|m| config_error(&cfg_path("unet"), m))?;
        let vae_cfg = sd_vae::AutoencoderKlConfig::from_json(vae_config.clone(), &cfg_path("vae"))?;
        let text_cfg = clip_text::ClipTextConfig::from_json(text_config.clone(), &cfg_path("text_encoder"))?;

        let view = |part: &str, entries: Vec<clip_text::ldm::Entry>| file.derive(&format!("{name} [{part}]"), entries);
        let place =
            |what: &str, key: &str| config_error(path, format!("`{key}` has no place in the {what} as configured"));
        let mut unet_entries = Vec::new();
        let unet_map = sd_unet::ldm::key_map(&unet_cfg);
        for k in parts["unet"].keys() {
            let m = unet_map.to_model(k).ok_or_else(|| place("UNet", &format!("{}{k}", sd_unet::ldm::PREFIX)))?;
            unet_entries.push((m, format!("{}{k}", sd_unet::ldm::PREFIX), model_io::Derive::Same));
        }
        let vae_prefix = vae_prefix.unwrap_or("");
        let vae_map = sd_vae::ldm::key_map(&vae_cfg);
        let mut vae_entries = Vec::new();
        for (k, shape) in &parts["vae"] {
            let m = vae_map.to_model(k).ok_or_else(|| place("VAE", &format!("{vae_prefix}{k}")))?;
            let d = sd_vae::ldm::derive(&m, shape);
            vae_entries.push((m, format!("{vae_prefix}{k}"), d));
        }
        let clip_prefix = if sdxl { clip_text::ldm::SDXL_CLIP_PREFIX } else { clip_text::ldm::CLIP_PREFIX };
        let text_entries = match text_layout {
            TextLayout::Clip => {
                clip_text::ldm::clip_entries_under(clip_prefix, parts["text"].keys().map(String::as_str))
            }
            TextLayout::OpenClip => clip_text::ldm::open_clip_entries(&parts["text"], text_cfg.num_hidden_layers)
                .map_err(|m| config_error(path, m))?,
        };
        let text_encoder_2 = match parts.get("text2") {
            None => None,
            Some(shapes) => {
                let (config_json, tokenizer) = match &base.config {
                    Some(dir) => (
                        model_io::read_config(&dir.join("text_encoder_2"), "config.json")?,
                        ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
                    ),
                    None => (
                        clip_text::ldm::infer_config_with_projection(shapes).map_err(|m| {
                            config_error(
                                path,
                                format!(
                                    "the second text encoder's config: {m}; pass --config DIR with a diffusers \
                                     SDXL folder describing this model"
                                ),
                            )
                        })?,
                        ClipTokenizer::bundled(Some("!"))?,
                    ),
                };
                let config = clip_text::ClipTextConfig::from_json(config_json.clone(), &cfg_path("text_encoder_2"))?;
                let entries = clip_text::ldm::open_clip_entries_under(
                    clip_text::ldm::SDXL_OPEN_CLIP_PREFIX,
                    shapes,
                    config.num_hidden_layers,
                    true,
                )
                .map_err(|m| config_error(path, m))?;
                Some(SecondText { checkpoint: view("text encoder 2", entries)?, config_json, config, tokenizer })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            unet: view("unet", unet_entries)?,
            vae: view("vae", vae_entries)?,
            text_encoder: view("text encoder", text_entries)?,
            text_layout,
            unet_config_json: unet_config,
            unet_config: unet_cfg,
            vae_config_json: vae_config,
            text_config_json: text_config,
            vae_config: vae_cfg,
            text_config: text_cfg,
            tokenizer,
            scheduler_config,
            text_encoder_2,
            force_zeros_for_empty_prompt,
        })
    }
}

/// The prediction type a file's metadata states: ModelSpec's `modelspec.prediction_type`
/// (`epsilon`, `v`), or kohya's `ss_v_parameterization`.
fn metadata_prediction(meta: &BTreeMap<String, String>) -> Option<String> {
    match meta.get("modelspec.prediction_type").map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("v" | "v_prediction" | "v-prediction") => return Some("v_prediction".into()),
        Some("epsilon" | "eps") => return Some("epsilon".into()),
        _ => {}
    }
    match meta.get("ss_v_parameterization").map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("true") => Some("v_prediction".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_states_the_prediction_type() {
        let m = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(metadata_prediction(&m("modelspec.prediction_type", "v")).as_deref(), Some("v_prediction"));
        assert_eq!(metadata_prediction(&m("modelspec.prediction_type", "epsilon")).as_deref(), Some("epsilon"));
        assert_eq!(metadata_prediction(&m("ss_v_parameterization", "True")).as_deref(), Some("v_prediction"));
        assert_eq!(metadata_prediction(&m("ss_v_parameterization", "False")), None);
        assert_eq!(metadata_prediction(&BTreeMap::new()), None);
    }

    #[test]
    fn a_safetensors_header_is_never_taken_for_a_pickle() {
        let d = tempfile::tempdir().unwrap();
        // A 640-byte header: its length starts with the bytes 0x80 0x02 of a pickle.
        let mut header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
        header.resize(640, b' ');
        let mut bytes = 640u64.to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend([0u8; 4]);
        assert_eq!(&bytes[..2], &[0x80, 0x02]);
        for name in ["m.safetensors", "m.sft", "m"] {
            let p = d.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            assert!(!is_pickle(&p), "{name}");
        }
        let p = d.path().join("m.data");
        std::fs::write(&p, [0x80, 0x02, 0x7d, 0x71, 0, 0, 0, 0, 0]).unwrap();
        assert!(is_pickle(&p));
    }
}
