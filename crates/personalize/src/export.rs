//! A base model with LoRAs and a concept's UNet change merged into its weights, written as a
//! diffusers folder (`StableDiffusionPipeline.from_pretrained`) or as a single file in the LDM
//! layout (A1111, ComfyUI, `from_single_file`): `personalize merge-lora` and `personalize export`.
//! SDXL bases are written as `StableDiffusionXLPipeline` folders (with `text_encoder_2` and
//! `tokenizer_2`) or as SDXL single files (`conditioner.embedders.{0,1}`).
//!
//! The single file is written through the same key maps the loader reads
//! ([`sd_unet::ldm::key_map`], [`sd_vae::ldm::key_map`], [`clip_text::ldm`]), so the two
//! directions cannot disagree. Weights are written as f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use model_io::tensor_file::write_f32_streamed_with_metadata;
use model_io::Checkpoint;
use serde_json::Value;

use crate::{Base, Concept, Error, LoraSpec, Result, UnetChange};

/// Where an exported folder's tokenizer comes from.
enum Tokenizer {
    /// The base folder's (or `--config`'s) `tokenizer/`.
    Folder(PathBuf),
    /// The bundled CLIP vocabulary, padding with this token when given (SD 2.x: `!`).
    Bundled(Option<String>),
}

/// SDXL's second text encoder (`CLIPTextModelWithProjection`): its weights, config, depth and
/// tokenizer.
struct SecondText {
    checkpoint: Checkpoint,
    config_json: Value,
    layers: usize,
    tokenizer: Tokenizer,
}

/// The models' weights (LoRAs merged) and their configs, ready to write.
pub struct MergedModel {
    pub unet: Checkpoint,
    pub vae: Checkpoint,
    pub text_encoder: Checkpoint,
    /// SDXL's second text encoder; `None` for SD 1.x/2.x.
    text_2: Option<SecondText>,
    unet_config: sd_unet::UNetConfig,
    unet_config_json: Value,
    vae_config: sd_vae::AutoencoderKlConfig,
    vae_config_json: Value,
    text_config_json: Value,
    text_layers: usize,
    /// SD 2.x's OpenCLIP text encoder (written in that layout in a single file).
    open_clip: bool,
    tokenizer: Tokenizer,
    scheduler: Value,
    /// SDXL's `force_zeros_for_empty_prompt` (for a folder made from a single file).
    force_zeros_for_empty_prompt: bool,
    /// A folder base, whose other files (VAE, tokenizer, scheduler, `model_index.json`, ...)
    /// an exported folder copies.
    folder: Option<PathBuf>,
}

impl MergedModel {
    /// Opens `base` and merges its LoRAs and, when given, a concept's UNet change (its LoRA at
    /// the concept's alpha, or its fine-tuned UNet). A concept trained on another base is an
    /// error unless `allow_mismatch`.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let base = personalize::Base::new("sd-v1-5").with_loras(vec!["ink.safetensors:0.8".parse()?]);
    /// let m = personalize::MergedModel::open::<Flex>(&base, None, false, &FlexDevice)?;
    /// m.write_diffusers("sd-v1-5-ink".as_ref(), false)?;
    /// # Ok::<(), personalize::Error>(())
    /// ```
    pub fn open<B: Backend>(
        base: &Base,
        concept: Option<&Path>,
        allow_mismatch: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let mut m = if base.is_split() { Self::from_single_file(base)? } else { Self::from_folder(base)? };
        let (fingerprint, legacy) = (m.unet.fingerprint(), m.unet.legacy_fingerprint());
        let mut loras: Vec<(LoraSpec, Option<f64>)> = base.loras.iter().map(|l| (l.clone(), None)).collect();
        if let Some(dir) = concept {
            let c = Concept::<B>::load(dir, device)?;
            let trained_on = &c.info.base_unet_fingerprint;
            if trained_on != &fingerprint && (m.folder.is_none() || trained_on != &legacy) && !allow_mismatch {
                return Err(Error::BaseMismatch {
                    concept: dir.to_path_buf(),
                    base: base.path.clone(),
                    trained_on: c.info.base_unet_fingerprint.clone(),
                    here: fingerprint,
                    named: c.info.base_model.clone(),
                });
            }
            match c.info.unet {
                UnetChange::Lora => {
                    loras.push((LoraSpec { path: dir.join("unet_lora.safetensors"), scale: 1.0 }, c.info.lora_alpha))
                }
                UnetChange::Full => {
                    let unet_dir = dir.join("unet");
                    m.unet = Checkpoint::open_dir(&unet_dir, &["diffusion_pytorch_model"])?;
                    m.unet_config_json = model_io::read_config(&unet_dir, "config.json")?;
                    m.unet_config = sd_unet::UNetConfig::load(&unet_dir)?;
                }
                UnetChange::Frozen => {}
            }
            tracing::warn!(
                "{}: the export holds the concept's UNet change only; its visual-prompt tokens (aligner and \
                 BLIP-2 queries) need `personalize generate --concept`",
                dir.display()
            );
        }
        let text_2 = m.text_2.as_mut().map(|t| &mut t.checkpoint);
        crate::lora::merge_with_alphas::<B>(&loras, &mut m.unet, &m.unet_config, &mut m.text_encoder, text_2, device)?;
        Ok(m)
    }

    fn from_folder(base: &Base) -> Result<Self> {
        let dir = &base.path;
        base.check_folder()?;
        let text_config_json: Value = model_io::read_config(&dir.join("text_encoder"), "config.json")?;
        let text_config =
            clip_text::ClipTextConfig::from_json(text_config_json.clone(), &dir.join("text_encoder/config.json"))?;
        let vae_config_json: Value = model_io::read_config(&dir.join("vae"), "config.json")?;
        let text_2 = if base.is_sdxl() {
            let sub = dir.join("text_encoder_2");
            let config_json: Value = model_io::read_config(&sub, "config.json")?;
            let config = clip_text::ClipTextConfig::from_json(config_json.clone(), &sub.join("config.json"))?;
            Some(SecondText {
                checkpoint: Checkpoint::open_dir(&sub, &["model"])?,
                config_json,
                layers: config.num_hidden_layers,
                tokenizer: Tokenizer::Folder(dir.join("tokenizer_2")),
            })
        } else {
            None
        };
        Ok(Self {
            unet: Checkpoint::open_dir(&dir.join("unet"), &["diffusion_pytorch_model"])?,
            vae: Checkpoint::open_dir(&dir.join("vae"), &["diffusion_pytorch_model"])?,
            text_encoder: Checkpoint::open_dir(&dir.join("text_encoder"), &["model"])?,
            text_2,
            unet_config: sd_unet::UNetConfig::load(&dir.join("unet"))?,
            unet_config_json: model_io::read_config(&dir.join("unet"), "config.json")?,
            vae_config: sd_vae::AutoencoderKlConfig::from_json(vae_config_json.clone(), &dir.join("vae/config.json"))?,
            vae_config_json,
            open_clip: text_config_json.get("hidden_act").and_then(Value::as_str) == Some("gelu"),
            text_layers: text_config.num_hidden_layers,
            text_config_json,
            tokenizer: Tokenizer::Folder(dir.join("tokenizer")),
            scheduler: model_io::read_config(&dir.join("scheduler"), "scheduler_config.json")?,
            force_zeros_for_empty_prompt: false,
            folder: Some(dir.clone()),
        })
    }

    fn from_single_file(base: &Base) -> Result<Self> {
        let f = crate::SingleFile::open(base)?;
        if f.unet_config.addition_embed_type.is_some() != f.text_encoder_2.is_some() {
            // An SDXL UNet without the second encoder (an SDXL ONNX folder, whose
            // text_encoder_2 is not read) or the reverse: refused, not written half.
            return Err(Error::Config {
                path: f.path.clone(),
                message: if f.text_encoder_2.is_some() {
                    "has SDXL's two text encoders, but the UNet config has no addition_embed_type (SD 1.x/2.x's); \
                     pass --config with an SDXL folder"
                        .into()
                } else {
                    "the UNet is SDXL's (addition_embed_type), but no second text encoder was read: SDXL is \
                     exported from a diffusers folder or an SDXL single file (conditioner.embedders.*), not from \
                     an ONNX folder"
                        .into()
                },
            });
        }
        let open_clip = f.text_layout == crate::TextLayout::OpenClip;
        let folder_tokenizer = |name: &str| match &base.config {
            // An ONNX pipeline folder's own.
            _ if f.path.join(name).is_dir() => Some(Tokenizer::Folder(f.path.join(name))),
            Some(d) => Some(Tokenizer::Folder(d.join(name))),
            None => None,
        };
        let text_2 = f.text_encoder_2.map(|t| SecondText {
            layers: t.config.num_hidden_layers,
            checkpoint: t.checkpoint,
            config_json: t.config_json,
            tokenizer: folder_tokenizer("tokenizer_2").unwrap_or(Tokenizer::Bundled(Some("!".into()))),
        });
        Ok(Self {
            tokenizer: folder_tokenizer("tokenizer").unwrap_or(Tokenizer::Bundled(open_clip.then(|| "!".to_string()))),
            unet: f.unet,
            vae: f.vae,
            text_encoder: f.text_encoder,
            text_2,
            unet_config: f.unet_config,
            unet_config_json: f.unet_config_json,
            vae_config: f.vae_config,
            vae_config_json: f.vae_config_json,
            text_layers: f.text_config.num_hidden_layers,
            text_config_json: f.text_config_json,
            open_clip,
            scheduler: f.scheduler_config.to_json(),
            force_zeros_for_empty_prompt: f.force_zeros_for_empty_prompt,
            folder: None,
        })
    }

    /// Writes a diffusers `StableDiffusionPipeline` (or `StableDiffusionXLPipeline`) folder at `out` (f32 weights): built in a
    /// temporary folder beside it and renamed into place, so an interrupted export leaves no
    /// half folder. An existing `out` is an error unless `overwrite`.
    pub fn write_diffusers(&self, out: &Path, overwrite: bool) -> Result<()> {
        refuse_existing(out, overwrite)?;
        let tmp = sibling(out, "partial");
        let _ = std::fs::remove_dir_all(&tmp);
        let result = (|| -> Result<()> {
            mkdir(&tmp)?;
            if let Some(folder) = &self.folder {
                // The index and the other components as they are (tokenizer, scheduler, safety
                // checker, feature extractor); not the three models, written below under their
                // plain names (a base with only `.fp16` files would otherwise leave a VAE that
                // `from_pretrained` without `variant` does not find), nor files at the top
                // (whole-model checkpoints beside a snapshot), nor the export itself.
                let out_abs = std::path::absolute(out).ok();
                let skip = |rel: &Path| {
                    let top = rel.components().count() == 1;
                    ["unet", "text_encoder", "text_encoder_2", "vae"].iter().any(|c| rel.starts_with(c))
                        || (top && folder.join(rel).is_file() && rel != Path::new("model_index.json"))
                        || out_abs
                            .as_deref()
                            .is_some_and(|o| std::path::absolute(folder.join(rel)).ok().as_deref() == Some(o))
                };
                copy_tree(folder, &tmp, &skip)?;
            } else {
                write_json(&tmp.join("model_index.json"), &self.model_index())?;
                mkdir(&tmp.join("scheduler"))?;
                write_json(&tmp.join("scheduler/scheduler_config.json"), &self.scheduler)?;
                write_tokenizer(&self.tokenizer, &tmp.join("tokenizer"))?;
                if let Some(t) = &self.text_2 {
                    write_tokenizer(&t.tokenizer, &tmp.join("tokenizer_2"))?;
                }
            }
            mkdir(&tmp.join("vae"))?;
            write_json(&tmp.join("vae/config.json"), &f32_config(&self.vae_config_json))?;
            write_checkpoint(&self.vae, &tmp.join("vae/diffusion_pytorch_model.safetensors"))?;
            mkdir(&tmp.join("unet"))?;
            write_json(&tmp.join("unet/config.json"), &f32_config(&self.unet_config_json))?;
            write_checkpoint(&self.unet, &tmp.join("unet/diffusion_pytorch_model.safetensors"))?;
            mkdir(&tmp.join("text_encoder"))?;
            write_json(&tmp.join("text_encoder/config.json"), &f32_config(&self.text_config_json))?;
            write_checkpoint(&self.text_encoder, &tmp.join("text_encoder/model.safetensors"))?;
            if let Some(t) = &self.text_2 {
                mkdir(&tmp.join("text_encoder_2"))?;
                write_json(&tmp.join("text_encoder_2/config.json"), &f32_config(&t.config_json))?;
                write_checkpoint(&t.checkpoint, &tmp.join("text_encoder_2/model.safetensors"))?;
            }
            replace(&tmp, out)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// `model_index.json` for a folder made from a single file.
    fn model_index(&self) -> Value {
        let scheduler = self.scheduler.get("_class_name").and_then(Value::as_str).unwrap_or("PNDMScheduler");
        let mut index = serde_json::json!({
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "scheduler": ["diffusers", scheduler],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        });
        let extra = if self.text_2.is_some() {
            serde_json::json!({
                "_class_name": "StableDiffusionXLPipeline",
                "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                "image_encoder": [null, null],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
            })
        } else {
            serde_json::json!({
                "_class_name": "StableDiffusionPipeline",
                "requires_safety_checker": false,
                "safety_checker": [null, null],
            })
        };
        if let (Some(o), Value::Object(e)) = (index.as_object_mut(), extra) {
            o.extend(e);
        }
        index
    }

    /// Every tensor of the single file: its key, shape and how it is made from the models'.
    fn single_file_entries(&self) -> Result<Entries> {
        let mut out = BTreeMap::new();
        let shape = |c: &Checkpoint, k: &str| c.info(k).map(|i| i.shape.clone()).unwrap_or_default();
        let unet_map = sd_unet::ldm::key_map(&self.unet_config);
        for k in self.unet.names() {
            let file = unet_map.to_file(k).ok_or_else(|| no_place("UNet", k))?;
            out.insert(format!("{}{file}", sd_unet::ldm::PREFIX), Entry::same(shape(&self.unet, k), Part::Unet, k));
        }
        let vae_map = sd_vae::ldm::key_map(&self.vae_config);
        for k in self.vae.names() {
            let file = vae_map.to_file(k).ok_or_else(|| no_place("VAE", k))?;
            let s = sd_vae::ldm::file_shape(k, &shape(&self.vae, k));
            out.insert(format!("{}{file}", sd_vae::ldm::PREFIXES[0]), Entry::same(s, Part::Vae, k));
        }
        let sdxl = self.text_2.is_some();
        if self.open_clip {
            open_clip_entries(
                &mut out,
                &self.text_encoder,
                Part::Text,
                clip_text::ldm::OPEN_CLIP_PREFIX,
                self.text_layers,
            )?;
        } else {
            let prefix = clip_text::key_prefix(&self.text_encoder);
            let file_prefix = if sdxl { clip_text::ldm::SDXL_CLIP_PREFIX } else { clip_text::ldm::CLIP_PREFIX };
            for k in self.text_encoder.names().filter(|k| !k.ends_with("embeddings.position_ids")) {
                // The model's key as `text_model.…`, whichever transformers release saved it.
                let model = format!("text_model.{}", k.strip_prefix(prefix).unwrap_or(k));
                out.insert(format!("{file_prefix}{model}"), Entry::same(shape(&self.text_encoder, k), Part::Text, k));
            }
        }
        if let Some(t) = &self.text_2 {
            open_clip_entries(&mut out, &t.checkpoint, Part::Text2, clip_text::ldm::SDXL_OPEN_CLIP_PREFIX, t.layers)?;
        }
        Ok(out)
    }

    /// Writes one `.safetensors` file in the LDM layout (f32; the prediction type in
    /// `modelspec.prediction_type`), atomically. An existing `out` is an error unless `overwrite`.
    pub fn write_single_file(&self, out: &Path, overwrite: bool) -> Result<()> {
        refuse_existing(out, overwrite)?;
        let entries = self.single_file_entries()?;
        let mut meta = BTreeMap::new();
        if let Some(p) = self.scheduler.get("prediction_type").and_then(Value::as_str) {
            meta.insert("modelspec.prediction_type".to_string(), if p == "v_prediction" { "v" } else { p }.to_string());
        }
        if self.text_2.is_some() {
            // What A1111 and ComfyUI read to tell an SDXL base from the refiner.
            meta.insert("modelspec.architecture".to_string(), "stable-diffusion-xl-v1-base".to_string());
        }
        let shapes: BTreeMap<String, Vec<usize>> = entries.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
        write_f32_streamed_with_metadata(out, &shapes, &meta, &mut |key| {
            let Some(e) = entries.get(key) else { return Ok(Vec::new()) };
            let mut values = Vec::new();
            for (part, k) in &e.rows {
                let ckpt = match part {
                    Part::Unet => &self.unet,
                    Part::Vae => &self.vae,
                    Part::Text => &self.text_encoder,
                    Part::Text2 => self.text_2.as_ref().map_or(&self.text_encoder, |t| &t.checkpoint),
                };
                values.extend(ckpt.read_f32(k)?.0);
            }
            if e.transpose {
                // The file's `[rows, cols]` from the model's `[cols, rows]`.
                let (rows, cols) = (e.shape[0], e.shape[1]);
                values = (0..rows * cols).map(|i| values[(i % cols) * rows + i / cols]).collect();
            }
            Ok(values)
        })?;
        Ok(())
    }
}

/// Each single-file tensor, by its key.
type Entries = BTreeMap<String, Entry>;

/// A single-file tensor: its shape and the model tensors whose rows, in order, make it,
/// transposed (a 2-D `[cols, rows]` model tensor) when `transpose`.
struct Entry {
    shape: Vec<usize>,
    rows: Vec<(Part, String)>,
    transpose: bool,
}

impl Entry {
    fn same(shape: Vec<usize>, part: Part, key: &str) -> Self {
        Self { shape, rows: vec![(part, key.to_string())], transpose: false }
    }
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Unet,
    Vae,
    Text,
    Text2,
}

fn no_place(what: &str, k: &str) -> Error {
    Error::invalid(format!("`{k}` of the {what} has no place in a single file"))
}

/// An OpenCLIP text encoder's tensors under `file_prefix` (SD 2.x's, SDXL's second): q/k/v
/// fused into `in_proj_*`, a `CLIPTextModelWithProjection`'s `text_projection.weight` stored
/// transposed as OpenCLIP's `text_projection` (applied as `x @ P`).
fn open_clip_entries(out: &mut Entries, ckpt: &Checkpoint, part: Part, file_prefix: &str, layers: usize) -> Result<()> {
    let shape = |k: &str| ckpt.info(k).map(|i| i.shape.clone()).unwrap_or_default();
    let prefix = clip_text::key_prefix(ckpt);
    let map = clip_text::ldm::open_clip_key_map(layers);
    let mut fused: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for k in ckpt.names() {
        if k.ends_with("embeddings.position_ids") {
            continue;
        }
        if k == "text_projection.weight" {
            let s: Vec<usize> = shape(k).into_iter().rev().collect();
            if s.len() != 2 {
                return Err(Error::invalid(format!("`{k}` has shape {:?}, expected 2-D", shape(k))));
            }
            let rows = vec![(part, k.to_string())];
            out.insert(format!("{file_prefix}text_projection"), Entry { shape: s, rows, transpose: true });
            continue;
        }
        let model = format!("text_model.{}", k.strip_prefix(prefix).unwrap_or(k));
        let qkv = ["q_proj", "k_proj", "v_proj"].iter().enumerate().find_map(|(j, p)| {
            ["weight", "bias"].iter().find_map(|kind| {
                let stem = model.strip_suffix(&format!(".self_attn.{p}.{kind}"))?;
                Some((j, format!("{stem}|{kind}")))
            })
        });
        match qkv {
            Some((j, slot)) => fused.entry(slot).or_default()[j] = Some(k.to_string()),
            None => {
                let file = map.to_file(&model).ok_or_else(|| no_place("text encoder", k))?;
                out.insert(format!("{file_prefix}{file}"), Entry::same(shape(k), part, k));
            }
        }
    }
    for (slot, parts) in fused {
        let (stem, kind) = slot.split_once('|').unwrap_or((&slot, "weight"));
        let file = map.to_file(stem).ok_or_else(|| no_place("text encoder", stem))?;
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(Error::invalid(format!("{stem}: q/k/v projections are not all present to fuse")));
        };
        let mut s = shape(&q);
        if let Some(rows) = s.first_mut() {
            *rows *= 3;
        }
        let rows = vec![(part, q), (part, k), (part, v)];
        out.insert(format!("{file_prefix}{file}.attn.in_proj_{kind}"), Entry { shape: s, rows, transpose: false });
    }
    Ok(())
}

fn write_tokenizer(t: &Tokenizer, dir: &Path) -> Result<()> {
    mkdir(dir)?;
    match t {
        Tokenizer::Folder(d) => copy_tree(d, dir, &|_| false),
        Tokenizer::Bundled(pad) => {
            for (name, text) in clip_text::ClipTokenizer::bundled_files(pad.as_deref()) {
                model_io::write_atomic(&dir.join(name), text.as_bytes())?;
            }
            Ok(())
        }
    }
}

fn refuse_existing(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !overwrite {
        return Err(Error::invalid(format!("{} exists; pass --overwrite to replace it", out.display())));
    }
    Ok(())
}

/// `out`'s sibling `.<name>.<what>-<pid>`, on the same file system for the rename.
fn sibling(out: &Path, what: &str) -> PathBuf {
    let name = out.file_name().map_or_else(|| "export".into(), |n| n.to_string_lossy().to_string());
    out.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

/// Moves the finished `tmp` to `out`, the old `out` (with `--overwrite`) only removed after.
fn replace(tmp: &Path, out: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::Io { path: p, cause: e }
    };
    if out.exists() {
        let old = sibling(out, "old");
        std::fs::rename(out, &old).map_err(io(out))?;
        if let Err(e) = std::fs::rename(tmp, out) {
            // Put the old one back: a failed export leaves what was there.
            let _ = std::fs::rename(&old, out);
            return Err(io(out)(e));
        }
        let _ = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
        return Ok(());
    }
    std::fs::rename(tmp, out).map_err(io(out))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), cause: e })
}

/// A model's `config.json` for f32 weights: transformers loads in the `dtype` (or older
/// `torch_dtype`) a config names, which would make f16 of the f32 weights written.
fn f32_config(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["dtype", "torch_dtype"] {
            if o.contains_key(k) {
                o.insert(k.to_string(), Value::String("float32".into()));
            }
        }
    }
    v
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    Ok(model_io::write_atomic(path, text.as_bytes())?)
}

/// Copies `src` into `dst` (following links, as the Hugging Face cache's snapshots are), but
/// the entries whose path relative to `src` `skip` names.
fn copy_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    fn walk(root: &Path, dir: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
        let io = |p: &Path, e| Error::Io { path: p.to_path_buf(), cause: e };
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            if skip(rel) || rel.to_string_lossy().starts_with('.') {
                continue;
            }
            let to = dst.join(rel);
            if path.is_dir() {
                mkdir(&to)?;
                walk(root, &path, dst, skip)?;
            } else {
                std::fs::copy(&path, &to).map_err(|e| io(&path, e))?;
            }
        }
        Ok(())
    }
    walk(src, src, dst, skip)
}

/// A checkpoint's tensors (as f32, LoRAs merged) as one safetensors file, in key order. The
/// text encoder's integer `position_ids` buffer (older transformers saved it) is left out, as
/// transformers 5 saves it: it is rebuilt on load.
fn write_checkpoint(ckpt: &Checkpoint, path: &Path) -> Result<()> {
    let shapes: BTreeMap<String, Vec<usize>> = ckpt
        .names()
        .filter(|k| !k.ends_with("position_ids"))
        .filter_map(|k| Some((k.to_string(), ckpt.info(k)?.shape.clone())))
        .collect();
    write_f32_streamed_with_metadata(path, &shapes, &BTreeMap::new(), &mut |k| Ok(ckpt.read_f32(k)?.0))?;
    Ok(())
}
