//! ONNX pipeline folders: diffusers' `OnnxStableDiffusionPipeline` layout (the `onnx` branches
//! of the SD repos, `convert_stable_diffusion_checkpoint_to_onnx.py`) and optimum's exports:
//! `text_encoder/model.onnx`, `unet/model.onnx` (+ `weights.pb` or `model.onnx_data`),
//! `vae_encoder/model.onnx` and `vae_decoder/model.onnx` (one VAE), `tokenizer/`, `scheduler/`.
//! Each model's weights are read under its published keys by model-io's ONNX reader; the
//! configs come from `config.json` beside a `model.onnx` (optimum writes them), else from
//! `--config DIR`, else from the shapes of a standard SD 1.x/2.x model.

use std::collections::BTreeMap;
use std::path::Path;

use clip_text::ClipTokenizer;
use model_io::Checkpoint;
use serde_json::{json, Value};

use crate::single_file::{SingleFile, TextLayout};
use crate::{Base, Error, Result};

/// Whether `dir` is an ONNX pipeline folder: its UNet is a `model.onnx` and no safetensors.
pub(crate) fn is_onnx_folder(dir: &Path) -> bool {
    dir.join("unet/model.onnx").is_file()
        && !["", ".fp16"].iter().any(|v| {
            ["safetensors", "safetensors.index.json"]
                .iter()
                .any(|e| dir.join("unet").join(format!("diffusion_pytorch_model{v}.{e}")).exists())
        })
}

fn config_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Config { path: path.to_path_buf(), message: message.into() }
}

/// The shapes of a checkpoint's tensors, by key.
fn shapes(c: &Checkpoint) -> BTreeMap<String, Vec<usize>> {
    c.names().map(|k| (k.to_string(), c.info(k).map(|i| i.shape.clone()).unwrap_or_default())).collect()
}

/// How many `prefix<N>.` indices the keys hold; more than a standard model's few is an error
/// (a damaged or crafted file), before any key map is built for them.
fn count(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> std::result::Result<usize, String> {
    let n = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |i| i.saturating_add(1));
    if n > 8 {
        return Err(format!("{n} `{prefix}*` blocks, more than a standard SD model has"));
    }
    Ok(n)
}

/// A UNet's config from its diffusers-keyed shapes: the keys are put in the LDM layout (with
/// a key map of the block structure they show) and read by the single-file inference, so both
/// formats infer the same standard configs.
fn infer_unet(s: &BTreeMap<String, Vec<usize>>, v_prediction: bool) -> std::result::Result<Value, String> {
    let n = count(s, "down_blocks.")?;
    let l = count(s, "down_blocks.0.resnets.")?;
    let attn = |side: &str, i: usize| s.keys().any(|k| k.starts_with(&format!("{side}_blocks.{i}.attentions.")));
    let skeleton = json!({
        "down_block_types": (0..n).map(|i| if attn("down", i) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
        "up_block_types": (0..n).map(|i| if attn("up", i) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
        "block_out_channels": vec![320; n],
        "layers_per_block": l,
        // Not read by the key map: the inference below finds the real values.
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    });
    let cfg: sd_unet::UNetConfig = serde_json::from_value(skeleton).map_err(|e| e.to_string())?;
    let map = sd_unet::ldm::key_map(&cfg);
    let mut ldm = BTreeMap::new();
    for (k, shape) in s {
        let f = map.to_file(k).ok_or_else(|| format!("`{k}` is not a tensor of a standard SD UNet"))?;
        ldm.insert(f, shape.clone());
    }
    sd_unet::ldm::infer_config(&ldm, v_prediction)
}

/// A VAE's config from its diffusers-keyed shapes, as [`infer_unet`].
fn infer_vae(s: &BTreeMap<String, Vec<usize>>) -> std::result::Result<Value, String> {
    let n = count(s, "encoder.down_blocks.")?;
    let skeleton = json!({
        "block_out_channels": vec![128; n],
        "layers_per_block": count(s, "encoder.down_blocks.0.resnets.")?,
    });
    let cfg: sd_vae::AutoencoderKlConfig = serde_json::from_value(skeleton).map_err(|e| e.to_string())?;
    let map = sd_vae::ldm::key_map(&cfg);
    let mut ldm = BTreeMap::new();
    for (k, shape) in s {
        let f = map.to_file(k).ok_or_else(|| format!("`{k}` is not a tensor of a standard SD VAE"))?;
        ldm.insert(f, sd_vae::ldm::file_shape(k, shape));
    }
    sd_vae::ldm::infer_config(&ldm)
}

/// A CLIP text encoder's config from its (transformers) shapes. SD 2.x's (OpenCLIP ViT-H as
/// transformers' CLIP, 1024 wide) uses GELU, SD 1.x's QuickGELU.
fn infer_text(s: &BTreeMap<String, Vec<usize>>) -> std::result::Result<Value, String> {
    let mut v = clip_text::ldm::infer_config(s, false)?;
    if v["hidden_size"] == 1024 {
        v["hidden_act"] = json!("gelu");
    }
    Ok(v)
}

impl SingleFile {
    /// Opens an ONNX pipeline folder (see the module docs) split into its models, as a single
    /// file is.
    pub fn open_onnx_folder(base: &Base) -> Result<Self> {
        let dir = base.path.as_path();
        let onnx = |sub: &str| -> Result<Checkpoint> {
            let p = dir.join(sub).join("model.onnx");
            if !p.is_file() {
                return Err(config_error(
                    &p,
                    "missing: an ONNX pipeline folder has text_encoder/, unet/, vae_encoder/ and vae_decoder/ models",
                ));
            }
            Ok(Checkpoint::open_onnx(&p)?)
        };
        let unet = onnx("unet")?;
        let text_encoder = onnx("text_encoder")?;
        // Under `text_model.`, as a single file's: transformers 5's CLIPTextModel exports its
        // weights without the prefix (its state dict has none), 4's with it.
        let text_encoder = if text_encoder.names().all(|k| k.starts_with("text_model.")) {
            text_encoder
        } else {
            let entries: Vec<_> = text_encoder
                .names()
                .map(|k| (format!("text_model.{k}"), k.to_string(), model_io::Derive::Same))
                .collect();
            text_encoder.derive(text_encoder.name(), entries)?
        };
        let vae = onnx("vae_encoder")?.merge(onnx("vae_decoder")?, &format!("{} [vae]", dir.display()))?;
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let mut scheduler_config = if sched_path.is_file() {
            scheduler::SchedulerConfig::from_file(&sched_path)?
        } else if let Some(c) = &base.config {
            scheduler::SchedulerConfig::from_file(&c.join("scheduler/scheduler_config.json"))?
        } else {
            scheduler::SchedulerConfig::from_json_str(scheduler::SD15_SCHEDULER_CONFIG)?
        };
        if let Some(p) = &base.prediction_override()? {
            scheduler_config.set("prediction_type", Value::String(p.clone()));
        }
        let v_prediction =
            scheduler_config.to_json().get("prediction_type").and_then(Value::as_str) == Some("v_prediction");
        // config.json beside the model (optimum), then --config's, then inferred.
        let config = |subs: &[&str],
                      config_sub: &str,
                      infer: &dyn Fn() -> std::result::Result<Value, String>|
         -> Result<(Value, std::path::PathBuf)> {
            for sub in subs {
                let p = dir.join(sub).join("config.json");
                if p.is_file() {
                    return Ok((model_io::read_config(&dir.join(sub), "config.json")?, p));
                }
            }
            if let Some(c) = &base.config {
                return Ok((
                    model_io::read_config(&c.join(config_sub), "config.json")?,
                    c.join(config_sub).join("config.json"),
                ));
            }
            let what = dir.join(subs[0]).join("model.onnx");
            let v = infer().map_err(|m| {
                config_error(&what, format!("no config.json beside it, and its config cannot be inferred: {m}; pass --config DIR with a diffusers folder describing this model"))
            })?;
            Ok((v, what))
        };
        let (unet_json, unet_path) = config(&["unet"], "unet", &|| infer_unet(&shapes(&unet), v_prediction))?;
        let (vae_json, vae_path) = config(&["vae_decoder", "vae_encoder"], "vae", &|| infer_vae(&shapes(&vae)))?;
        let text_shapes = shapes(&text_encoder);
        let (mut text_json, text_path) = config(&["text_encoder"], "text_encoder", &|| infer_text(&text_shapes))?;
        // optimum's text_encoder/config.json is a CLIPTextConfig's full dump; the model reads its fields.
        match text_json.as_object_mut() {
            Some(o) => {
                o.entry("model_type").or_insert(json!("clip_text_model"));
            }
            None => return Err(config_error(&text_path, "is not a JSON object")),
        }
        let unet_config: sd_unet::UNetConfig =
            serde_json::from_value(unet_json.clone()).map_err(|e| Error::Json { path: unet_path.clone(), cause: e })?;
        unet_config.validate().map_err(|m| config_error(&unet_path, m))?;
        let vae_config = sd_vae::AutoencoderKlConfig::from_json(vae_json.clone(), &vae_path)?;
        let text_config = clip_text::ClipTextConfig::from_json(text_json.clone(), &text_path)?;
        let open_clip = text_config.hidden_act == "gelu";
        let tokenizer = if dir.join("tokenizer").is_dir() {
            ClipTokenizer::from_dir(&dir.join("tokenizer"))?
        } else if let Some(c) = &base.config {
            ClipTokenizer::from_dir(&c.join("tokenizer"))?
        } else {
            ClipTokenizer::bundled(open_clip.then_some("!"))?
        };
        Ok(Self {
            path: dir.to_path_buf(),
            unet,
            vae,
            text_encoder,
            text_layout: if open_clip { TextLayout::OpenClip } else { TextLayout::Clip },
            unet_config_json: unet_json,
            unet_config,
            vae_config_json: vae_json,
            text_config_json: text_json,
            vae_config,
            text_config,
            tokenizer,
            scheduler_config,
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn under(all: &Value, prefix: &str) -> BTreeMap<String, Vec<usize>> {
        all.as_object()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| {
                Some((k.strip_prefix(prefix)?.to_string(), serde_json::from_value(v.clone()).unwrap()))
            })
            .collect()
    }

    /// Full-size SD 1.5 and 2.1 shapes under diffusers' keys (from the single-file fixture's
    /// LDM lists, through the published configs' key maps) infer the published configs.
    #[test]
    fn standard_configs_are_inferred_from_diffusers_keyed_shapes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/single_file/shapes.json");
        let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for name in ["sd15", "sd21"] {
            let m = &all[name];
            let check = |what: &str, got: &Value, want: &Value| {
                for (k, v) in want.as_object().unwrap() {
                    assert_eq!(&got[k], v, "{name}: {what} {k}");
                }
            };
            let ucfg: sd_unet::UNetConfig = serde_json::from_value(m["unet"].clone()).unwrap();
            let umap = sd_unet::ldm::key_map(&ucfg);
            let unet: BTreeMap<String, Vec<usize>> = under(&m["shapes"], sd_unet::ldm::PREFIX)
                .into_iter()
                .map(|(k, s)| (umap.to_model(&k).unwrap(), s))
                .collect();
            check("unet", &infer_unet(&unet, name == "sd21").unwrap(), &m["unet"]);
            let vcfg: sd_vae::AutoencoderKlConfig = serde_json::from_value(m["vae"].clone()).unwrap();
            let vmap = sd_vae::ldm::key_map(&vcfg);
            let vae: BTreeMap<String, Vec<usize>> = under(&m["shapes"], "first_stage_model.")
                .into_iter()
                .map(|(k, s)| {
                    let d = vmap.to_model(&k).unwrap();
                    // The attention's 1x1 convolutions are linear layers in diffusers.
                    let s = if d.contains("attentions") && s.len() == 4 { s[..2].to_vec() } else { s };
                    (d, s)
                })
                .collect();
            check("vae", &infer_vae(&vae).unwrap(), &m["vae"]);
            let text: BTreeMap<String, Vec<usize>> = if name == "sd15" {
                under(&m["shapes"], clip_text::ldm::CLIP_PREFIX)
            } else {
                let file = under(&m["shapes"], clip_text::ldm::OPEN_CLIP_PREFIX);
                clip_text::ldm::open_clip_entries(&file, 23)
                    .unwrap()
                    .into_iter()
                    .map(|(k, f, d)| {
                        let f = f.strip_prefix(clip_text::ldm::OPEN_CLIP_PREFIX).unwrap_or(&f).to_string();
                        let s = match d {
                            model_io::Derive::Same => file[&f].clone(),
                            model_io::Derive::Reshape(s) => s,
                            model_io::Derive::Rows(r) => [vec![r.len()], file[&f][1..].to_vec()].concat(),
                            model_io::Derive::Transpose => file[&f].iter().rev().copied().collect(),
                        };
                        (k, s)
                    })
                    .collect()
            };
            check("text encoder", &infer_text(&text).unwrap(), &m["text_encoder"]);
        }
        // Block indices far past a standard model's are refused before any key map is built.
        let e = infer_unet(&BTreeMap::from([("down_blocks.1023.a".to_string(), vec![1])]), false).unwrap_err();
        assert!(e.contains("1024 `down_blocks.*` blocks"), "{e}");
        // A tensor of no standard UNet is named.
        let e = infer_unet(&BTreeMap::from([("lora.up".to_string(), vec![1])]), false).unwrap_err();
        assert!(e.contains("lora.up"), "{e}");
    }
}
