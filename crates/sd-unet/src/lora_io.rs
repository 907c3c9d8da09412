//! Attaching LoRA adapters to a UNet and converting them to and from the diffusers/PEFT
//! layout (`unet.<module path>.lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`).

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Tensor};
use model_io::tensor_file::HostTensor;
use model_io::{Error, Result};
use model_layers::nn::Linear;

use crate::lora::Lora;
use crate::UNet2DConditionModel;

/// Attaches fresh adapters of `rank` and `alpha` to every attention projection
/// (`to_q`, `to_k`, `to_v`, `to_out.0`), their `A` matrices drawn from `init` block by block.
/// They are zero at first (`B` = 0): the output is unchanged.
pub fn attach<B: Backend>(unet: &mut UNet2DConditionModel<B>, rank: usize, alpha: f64, init: &mut dyn seeded::Init) {
    for a in unet.attentions_mut() {
        for (_, p) in a.projections_mut() {
            p.attach(rank, alpha, init);
        }
    }
}

/// The adapters as host tensors under diffusers' keys, ready for `unet_lora.safetensors`.
pub fn lora_tensors<B: Backend>(unet: &UNet2DConditionModel<B>) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for (path, a) in unet.attentions() {
        for (name, p) in a.projections() {
            if let Some(l) = &p.lora {
                let key = format!("unet.{path}.{name}");
                out.insert(format!("{key}.lora_A.weight"), HostTensor::from_tensor(l.down.weight.val().transpose()));
                out.insert(format!("{key}.lora_B.weight"), HostTensor::from_tensor(l.up.weight.val().transpose()));
            }
        }
    }
    out
}

/// Attaches adapters read from `tensors` (as [`lora_tensors`] writes them; a leading
/// `unet.` is optional) with the given `alpha` (the rank when `None`, as diffusers assumes
/// when a file carries no alpha). Every projection named must exist and every key be used.
pub fn load_lora<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    tensors: &BTreeMap<String, HostTensor>,
    alpha: Option<f64>,
) -> Result<()> {
    load_lora_scaled(unet, tensors, &|_, r| alpha.unwrap_or(r as f64) / r as f64)
}

/// The adapter settings current diffusers (0.34 and later) and peft store in a LoRA file's
/// safetensors metadata, under `lora_adapter_metadata` as JSON with `unet.`-prefixed keys:
/// the rank `r`, `lora_alpha`, per-module `rank_pattern` / `alpha_pattern`, and rsLoRA/DoRA.
/// `load_lora_weights` builds the adapter from them, so a file with `lora_alpha != r` is
/// scaled by `alpha / r` there (and must be here), not by 1 as a file without metadata.
///
/// ```
/// let meta = std::collections::BTreeMap::from([(
///     "lora_adapter_metadata".to_string(),
///     r#"{"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": {"to_k": 6}}"#.to_string(),
/// )]);
/// let cfg = sd_unet::lora::PeftLoraConfig::from_metadata(&meta, "unet").unwrap().unwrap();
/// assert_eq!(cfg.scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4), 0.5);
/// assert_eq!(cfg.scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 2), 3.0);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PeftLoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub use_rslora: bool,
}

/// The metadata key diffusers writes the adapter config under.
pub const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

impl PeftLoraConfig {
    /// Reads the `prefix` (`unet`) adapter's config from a file's metadata; `None` when the
    /// file has none (older diffusers, kohya, our own files before this release).
    pub fn from_metadata(meta: &BTreeMap<String, String>, prefix: &str) -> Result<Option<Self>> {
        let Some(raw) = meta.get(LORA_ADAPTER_METADATA_KEY) else { return Ok(None) };
        let bad = |m: String| Error::invalid(format!("LoRA metadata `{LORA_ADAPTER_METADATA_KEY}`: {m}"));
        let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
        let get = |k: &str| v.get(format!("{prefix}.{k}")).or_else(|| v.get(k));
        let Some(r) = get("r") else { return Ok(None) };
        let r = r
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad(format!("`{prefix}.r` is {r}, expected a positive integer")))? as usize;
        let lora_alpha = match get("lora_alpha") {
            None => 8.0, // peft's LoraConfig default
            Some(a) => a
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad(format!("`{prefix}.lora_alpha` is {a}, expected a number")))?,
        };
        if get("use_dora").and_then(serde_json::Value::as_bool) == Some(true) {
            return Err(bad("DoRA adapters (`use_dora: true`) are not supported".into()));
        }
        let map = |k: &str| -> Result<BTreeMap<String, f64>> {
            let mut out = BTreeMap::new();
            if let Some(o) = get(k).and_then(serde_json::Value::as_object) {
                for (name, x) in o {
                    let x = x
                        .as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| bad(format!("`{prefix}.{k}.{name}` is {x}, expected a positive number")))?;
                    out.insert(name.clone(), x);
                }
            }
            Ok(out)
        };
        Ok(Some(Self {
            r,
            lora_alpha,
            rank_pattern: map("rank_pattern")?.into_iter().map(|(k, v)| (k, v as usize)).collect(),
            alpha_pattern: map("alpha_pattern")?,
            use_rslora: get("use_rslora").and_then(serde_json::Value::as_bool).unwrap_or(false),
        }))
    }

    /// The metadata diffusers writes for an adapter of `rank` and `alpha` on `target_modules`.
    pub fn metadata(prefix: &str, rank: usize, alpha: f64, target_modules: &[&str]) -> BTreeMap<String, String> {
        let cfg = serde_json::json!({
            format!("{prefix}.r"): rank,
            format!("{prefix}.lora_alpha"): alpha,
            format!("{prefix}.target_modules"): target_modules,
            format!("{prefix}.rank_pattern"): {},
            format!("{prefix}.alpha_pattern"): {},
            format!("{prefix}.use_rslora"): false,
            format!("{prefix}.use_dora"): false,
            format!("{prefix}.peft_type"): "LORA",
        });
        BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            (LORA_ADAPTER_METADATA_KEY.to_string(), cfg.to_string()),
        ])
    }

    /// The scale of the adapter on `module` (its diffusers path) of rank `r`: `alpha / r`, or
    /// `alpha / sqrt(r)` with rsLoRA; a pattern matches as peft's does, on a whole trailing
    /// run of path components (`(.*\.)?<pattern>$`).
    pub fn scale(&self, module: &str, r: usize) -> f64 {
        let matches = |pat: &str| module == pat || module.ends_with(&format!(".{pat}"));
        let alpha = self.alpha_pattern.iter().find(|(p, _)| matches(p)).map_or(self.lora_alpha, |(_, a)| *a);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// Attaches adapters as [`load_lora`] does, the scale of each given by `scale(module, rank)`.
pub fn load_lora_scaled<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    tensors: &BTreeMap<String, HostTensor>,
    scale: &dyn Fn(&str, usize) -> f64,
) -> Result<()> {
    let paths: Vec<String> = unet.attentions().into_iter().map(|(p, _)| p).collect();
    let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let device = unet.attentions().first().map(|(_, a)| a.to_q.base.weight.device());
    let Some(device) = device else { return Ok(()) };
    for (path, a) in paths.iter().zip(unet.attentions_mut()) {
        for (name, p) in a.projections_mut() {
            let key = format!("{path}.{name}");
            let find = |suffix: &str| {
                tensors
                    .get_key_value(&format!("unet.{key}.{suffix}"))
                    .or_else(|| tensors.get_key_value(&format!("{key}.{suffix}")))
            };
            let (Some((ka, la)), Some((kb, lb))) = (find("lora_A.weight"), find("lora_B.weight")) else { continue };
            let (d_in, d_out) = p.base.dims();
            let r = la.shape.first().copied().unwrap_or(0);
            if la.shape != [r, d_in] || lb.shape != [d_out, r] || r == 0 {
                return Err(Error::invalid(format!(
                    "LoRA for `{key}`: lora_A {:?} and lora_B {:?} do not fit a [{d_out}, {d_in}] projection",
                    la.shape, lb.shape
                )));
            }
            let down: Tensor<B, 2> = la.to_float(&format!("{key}.lora_A.weight"), &device)?;
            let up: Tensor<B, 2> = lb.to_float(&format!("{key}.lora_B.weight"), &device)?;
            p.lora = Some(Lora {
                down: Linear::new(down.transpose(), None),
                up: Linear::new(up.transpose(), None),
                scale: scale(&key, r),
            });
            used.extend([ka.as_str(), kb.as_str()]);
        }
    }
    // Every tensor must be used: name the first that was not (a stray key, or half of a pair
    // whose other half is missing).
    let unused: Vec<&String> = tensors.keys().filter(|k| !used.contains(k.as_str())).collect();
    if let Some(first) = unused.first() {
        return Err(Error::invalid(format!(
            "LoRA file has {} tensors that match no UNet attention projection (or lack their lora_A/lora_B \
             partner), e.g. `{first}`",
            unused.len()
        )));
    }
    Ok(())
}

/// The kohya/A1111 name of the adapter on UNet module `module` (its diffusers path):
/// `lora_unet_` and the path with `_` for `.`, as diffusers' `convert_state_dict_to_kohya`
/// names it and ComfyUI's SD 1.x key map reads it.
///
/// ```
/// assert_eq!(
///     sd_unet::lora::kohya_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
///     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
/// );
/// ```
pub fn kohya_name(module: &str) -> String {
    format!("lora_unet_{}", module.replace('.', "_"))
}

/// A UNet LoRA in the diffusers/PEFT layout (`unet.<module>.lora_A.weight`, `lora_B.weight`;
/// the `unet.` prefix optional) in kohya's layout, which A1111, ComfyUI, Forge, InvokeAI and
/// kohya's scripts read: `<kohya_name>.lora_down.weight` (A), `.lora_up.weight` (B) and
/// `.alpha`, a scalar with `scale(module, rank) · rank`, so each module keeps its scale
/// (diffusers' own converter writes `alpha = rank`, which loses a `lora_alpha` other than `r`).
/// A key that is not half of an A/B pair is an error naming it.
///
/// ```
/// use model_io::tensor_file::HostTensor;
/// let t = std::collections::BTreeMap::from([
///     ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight".to_string(), HostTensor::f32(vec![2, 3], vec![0.0; 6])),
///     ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight".to_string(), HostTensor::f32(vec![3, 2], vec![0.0; 6])),
/// ]);
/// let k = sd_unet::lora::peft_to_kohya(&t, &|_, r| 0.5).unwrap();
/// let alpha = &k["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"];
/// assert_eq!((alpha.shape.len(), alpha.as_f32("alpha").unwrap()), (0, &[1.0f32][..]));
/// ```
pub fn peft_to_kohya(
    tensors: &BTreeMap<String, HostTensor>,
    scale: &dyn Fn(&str, usize) -> f64,
) -> Result<BTreeMap<String, HostTensor>> {
    peft_to_kohya_named(tensors, scale, &|m| Ok(kohya_name(m)))
}

/// [`peft_to_kohya`] with the names kohya's tools give a UNet of `config`: diffusers' paths for
/// SD 1.x/2.x (as [`kohya_name`]), and for SDXL (`addition_embed_type` set) SGM's LDM paths, as
/// sd-scripts' `sdxl_train_network.py` names them (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
/// which A1111, ComfyUI and diffusers' SDXL loader read.
///
/// ```no_run
/// let cfg = sd_unet::UNetConfig::load("sdxl/unet".as_ref())?;
/// let (peft, _) = model_io::tensor_file::read_tensors_with_metadata("my-dog/unet_lora.safetensors".as_ref())?;
/// let kohya = sd_unet::lora::peft_to_kohya_for(&cfg, &peft, &|_, _| 1.0)?;
/// assert!(kohya.keys().all(|k| k.starts_with("lora_unet_")));
/// # Ok::<(), model_io::Error>(())
/// ```
pub fn peft_to_kohya_for(
    config: &crate::UNetConfig,
    tensors: &BTreeMap<String, HostTensor>,
    scale: &dyn Fn(&str, usize) -> f64,
) -> Result<BTreeMap<String, HostTensor>> {
    if config.addition_embed_type.is_none() {
        return peft_to_kohya(tensors, scale);
    }
    let map = crate::ldm::key_map(config);
    peft_to_kohya_named(tensors, scale, &|m| {
        let file = map
            .to_file(&format!("{m}.weight"))
            .ok_or_else(|| Error::invalid(format!("LoRA module `{m}` has no place in the SDXL UNet's LDM layout")))?;
        Ok(kohya_name(file.strip_suffix(".weight").unwrap_or(&file)))
    })
}

fn peft_to_kohya_named(
    tensors: &BTreeMap<String, HostTensor>,
    scale: &dyn Fn(&str, usize) -> f64,
    name: &dyn Fn(&str) -> Result<String>,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for (k, a) in tensors {
        let Some(module) = k.strip_suffix(".lora_A.weight") else {
            if k.ends_with(".lora_B.weight") && tensors.contains_key(&k.replace(".lora_B.", ".lora_A.")) {
                continue;
            }
            return Err(Error::invalid(format!(
                "LoRA tensor `{k}` is not a lora_A/lora_B weight with its partner (diffusers/PEFT layout)"
            )));
        };
        let b_key = format!("{module}.lora_B.weight");
        let b = tensors.get(&b_key).ok_or_else(|| Error::invalid(format!("LoRA tensor `{k}` has no `{b_key}`")))?;
        let module = module.strip_prefix("unet.").unwrap_or(module);
        let rank = a.shape.first().copied().unwrap_or(0);
        if rank == 0 || b.shape.get(1) != Some(&rank) {
            return Err(Error::invalid(format!(
                "LoRA for `{module}`: lora_A {:?} and lora_B {:?} do not share a rank",
                a.shape, b.shape
            )));
        }
        let name = name(module)?;
        out.insert(format!("{name}.lora_down.weight"), a.clone());
        out.insert(format!("{name}.lora_up.weight"), b.clone());
        out.insert(format!("{name}.alpha"), HostTensor::f32(vec![], vec![(scale(module, rank) * rank as f64) as f32]));
    }
    Ok(out)
}
