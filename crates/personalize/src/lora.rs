//! LoRA files merged into a base model's weights (`generate --lora FILE:SCALE`, `merge-lora`):
//! diffusers/PEFT and kohya/A1111 layouts, LoCon on convolutions, UNet and text encoders (SDXL's
//! two as well), several files adding up as diffusers' `set_adapters([...], adapter_weights=[...])` combines them.
//!
//! The updates are merged (`W += scale · up · down`), as A1111 and ComfyUI apply LoRAs, so
//! sampling costs what it costs without them; diffusers keeps them as side branches, which gives
//! the same outputs up to f32 rounding.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};
use model_io::tensor_file::HostTensor;
use model_io::{Checkpoint, KeyMap};

use crate::{Error, Result};

/// One `--lora FILE[:SCALE]`: a LoRA file and its weight (1.0 when not given).
///
/// ```
/// let l: personalize::LoraSpec = "styles/ink.safetensors:0.7".parse().unwrap();
/// assert_eq!((l.path.to_str().unwrap(), l.scale), ("styles/ink.safetensors", 0.7));
/// let l: personalize::LoraSpec = "ink.safetensors".parse().unwrap();
/// assert_eq!(l.scale, 1.0);
/// assert!("ink.safetensors:1e9".parse::<personalize::LoraSpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

/// Scales beyond this are a typo, not a style (ComfyUI's strength slider stops at ±100).
const MAX_SCALE: f64 = 100.0;

impl std::str::FromStr for LoraSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let split = s.rsplit_once(':').map(|(p, sc)| (p, sc, sc.trim().parse::<f64>()));
        let (path, scale) = match split {
            // `C:\x.safetensors` and `dir:name/x.safetensors` keep their colons: only a number
            // after the last one is a scale.
            Some((p, _, Ok(scale))) if !p.is_empty() => (p, scale),
            Some((p, sc, _)) if Path::new(p).is_file() => {
                return Err(Error::invalid(format!("--lora {s}: the scale `{sc}` is not a number (FILE[:SCALE])")))
            }
            _ => (s, 1.0),
        };
        if !scale.is_finite() || scale.abs() > MAX_SCALE {
            return Err(Error::invalid(format!(
                "--lora {s}: scale {scale} is absurd (a LoRA's weight is usually between -2 and 2; at most ±{MAX_SCALE})"
            )));
        }
        Ok(Self { path: PathBuf::from(path), scale })
    }
}

impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.scale)
    }
}

/// The model a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG, `text_encoder_2`).
    TextEncoder2,
}

impl LoraTarget {
    /// The model's name in diffusers' PEFT keys and adapter metadata.
    fn peft(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Unet => "UNet",
            Self::TextEncoder => "text encoder",
            Self::TextEncoder2 => "second text encoder (text_encoder_2)",
        }
    }
}

/// How many layers of each model one file changed.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    pub spec: LoraSpec,
    /// `"kohya"` or `"peft"`.
    pub layout: &'static str,
    pub unet_layers: usize,
    pub text_encoder_layers: usize,
    /// SDXL's `text_encoder_2`; 0 on SD 1.x/2.x bases.
    pub text_encoder_2_layers: usize,
}

/// The base model's weights LoRAs may patch, by every name the layouts give them.
struct Targets {
    /// LoRA module name (`lora_unet_…`, `unet.…`, `text_encoder.…`, `lora_te_…`, and SDXL's
    /// `text_encoder_2.…`, `lora_te1_…`, `lora_te2_…`) → the weight.
    names: HashMap<String, (LoraTarget, String)>,
}

impl Targets {
    fn new(unet: &Checkpoint, ldm: &KeyMap, texts: &[(LoraTarget, &Checkpoint)]) -> Self {
        let mut names = HashMap::new();
        let kohya = |m: &str| m.replace('.', "_");
        for key in unet.names() {
            let Some(module) = key.strip_suffix(".weight") else { continue };
            if unet.info(key).is_none_or(|i| !matches!(i.shape.len(), 2 | 4)) {
                continue;
            }
            let t = (LoraTarget::Unet, key.to_string());
            names.insert(format!("unet.{module}"), t.clone());
            names.insert(module.to_string(), t.clone());
            names.insert(format!("lora_unet_{}", kohya(module)), t.clone());
            // kohya's SDXL-era trainers name SD 1.x modules in the LDM layout too, and ComfyUI's
            // LoraSave writes them dotted under `diffusion_model.`.
            if let Some(file) = ldm.to_file(key) {
                if let Some(m) = file.strip_suffix(".weight") {
                    names.entry(format!("lora_unet_{}", kohya(m))).or_insert(t.clone());
                    names.entry(format!("diffusion_model.{m}")).or_insert(t.clone());
                }
            }
        }
        let sdxl = texts.iter().any(|(t, _)| *t == LoraTarget::TextEncoder2);
        for &(target, text) in texts {
            // kohya's SDXL trainer names the encoders te1/te2; its SD trainer names the one `te`.
            let kohya_prefixes: &[&str] = match target {
                LoraTarget::TextEncoder2 => &["lora_te2_"],
                _ if sdxl => &["lora_te_", "lora_te1_"],
                _ => &["lora_te_"],
            };
            let prefix = clip_text::key_prefix(text);
            for key in text.names() {
                let Some(module) = key.strip_suffix(".weight").and_then(|m| m.strip_prefix(prefix)) else { continue };
                if text.info(key).is_none_or(|i| i.shape.len() != 2) {
                    continue;
                }
                let t = (target, key.to_string());
                // transformers 4 nests the model under `text_model.`, transformers 5 does not: files
                // from both are in use.
                for m in [module.to_string(), format!("text_model.{module}")] {
                    names.insert(format!("{}.{m}", target.peft()), t.clone());
                    for k in kohya_prefixes {
                        names.insert(format!("{k}{}", kohya(&m)), t.clone());
                    }
                }
            }
        }
        Self { names }
    }
}

/// The part a tensor plays in its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

const ROLES: &[(&str, Role)] = &[
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    // diffusers' attention-processor format (before PEFT): `attn1.processor.to_q_lora.down`.
    ("_lora.down.weight", Role::Down),
    ("_lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// Adapter kinds this release does not merge, by a key fragment that marks them.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("hada_w", "LyCORIS LoHa"),
    ("lokr_w", "LyCORIS LoKr"),
    (".lora_mid.", "LoCon with a Tucker core (lora_mid)"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".diff", "LyCORIS full weight differences"),
    (".diff_b", "LyCORIS full weight differences"),
    (".lora_B.bias", "LoRA with bias (lora_bias)"),
];

/// The module a tensor key belongs to, with diffusers' older spellings
/// (`attn1.processor.to_q_lora`) brought to the module path, and the tensor's role.
fn split_key(key: &str) -> Option<(String, Role)> {
    let (module, role) = ROLES.iter().find_map(|(suffix, role)| Some((key.strip_suffix(suffix)?, *role)))?;
    let mut m = module.replace(".processor.", ".");
    // The processor format names the projections as diffusers' attention does; the text
    // encoder's are CLIP's (`q_proj`, ..., `out_proj`), as diffusers' own converter maps them.
    let renames: &[(&str, &str)] = if m.starts_with("text_encoder.") {
        &[(".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out", ".out_proj")]
    } else {
        &[(".to_out", ".to_out.0")]
    };
    if key.ends_with("_lora.down.weight") || key.ends_with("_lora.up.weight") {
        for (old, new) in renames {
            if let Some(stem) = m.strip_suffix(old) {
                m = format!("{stem}{new}");
                break;
            }
        }
    }
    Some((m, role))
}

#[derive(Default)]
struct Module {
    down: Option<(String, HostTensor)>,
    up: Option<(String, HostTensor)>,
    alpha: Option<f64>,
}

/// Merges `loras` into the UNet's and the text encoders' weights (checkpoints under diffusers'
/// keys; `unet_config` gives the UNet's LDM key map, for kohya files named in that layout;
/// `text_2` is SDXL's second text encoder, `None` on SD 1.x/2.x). Each module adds
/// `scale · s · up · down` to its base weight, `s` being `alpha / rank` (the file's `alpha`,
/// its diffusers adapter metadata, or 1 without either, as diffusers reads them). Errors name
/// the file and the tensor: a key that matches no layer, a shape that does not fit, a half pair.
///
/// ```no_run
/// use burn_flex::{Flex, FlexDevice};
/// let mut unet = model_io::Checkpoint::open_dir("sd/unet".as_ref(), &["diffusion_pytorch_model"])?;
/// let mut text = model_io::Checkpoint::open_dir("sd/text_encoder".as_ref(), &["model"])?;
/// let loras = vec!["ink.safetensors:0.8".parse()?];
/// let cfg = sd_unet::UNetConfig::load("sd/unet".as_ref())?;
/// personalize::merge_loras::<Flex>(&loras, &mut unet, &cfg, &mut text, None, &FlexDevice)?;
/// # Ok::<(), personalize::Error>(())
/// ```
pub fn merge_loras<B: Backend>(
    loras: &[LoraSpec],
    unet: &mut Checkpoint,
    unet_config: &sd_unet::UNetConfig,
    text: &mut Checkpoint,
    text_2: Option<&mut Checkpoint>,
    device: &B::Device,
) -> Result<Vec<LoraSummary>> {
    let loras: Vec<(LoraSpec, Option<f64>)> = loras.iter().map(|l| (l.clone(), None)).collect();
    merge_with_alphas::<B>(&loras, unet, unet_config, text, text_2, device)
}

/// [`merge_loras`], each file with the `lora_alpha` its modules have when neither the file's
/// tensors nor its metadata give one (a concept's `concept.json` records it); `None`: the rank.
pub(crate) fn merge_with_alphas<B: Backend>(
    loras: &[(LoraSpec, Option<f64>)],
    unet: &mut Checkpoint,
    unet_config: &sd_unet::UNetConfig,
    text: &mut Checkpoint,
    text_2: Option<&mut Checkpoint>,
    device: &B::Device,
) -> Result<Vec<LoraSummary>> {
    if loras.is_empty() {
        return Ok(Vec::new());
    }
    let mut texts = vec![(LoraTarget::TextEncoder, text)];
    texts.extend(text_2.map(|t| (LoraTarget::TextEncoder2, t)));
    let sdxl = texts.len() == 2;
    let targets = {
        let shared: Vec<(LoraTarget, &Checkpoint)> = texts.iter().map(|(t, c)| (*t, &**c)).collect();
        Targets::new(unet, &sd_unet::ldm::key_map(unet_config), &shared)
    };
    let mut deltas: BTreeMap<(LoraTarget, String), Tensor<B, 2>> = BTreeMap::new();
    let mut summaries = Vec::new();
    for (spec, default_alpha) in loras {
        let file = spec.path.display().to_string();
        let bad = |m: String| Error::invalid(format!("LoRA {file}: {m}"));
        let (tensors, meta) = model_io::tensor_file::read_tensors_with_metadata(&spec.path)?;
        if tensors.is_empty() {
            return Err(bad("holds no tensors".into()));
        }
        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        for (key, t) in tensors {
            let marks = |frag: &str| if frag.starts_with(".diff") { key.ends_with(frag) } else { key.contains(frag) };
            if let Some((_, kind)) = UNSUPPORTED.iter().find(|(frag, _)| marks(frag)) {
                return Err(bad(format!(
                    "`{key}` is a {kind} tensor; this release merges LoRA and LoCon (lora_down/lora_up, lora_A/lora_B)"
                )));
            }
            let Some((module, role)) = split_key(&key) else {
                return Err(bad(format!(
                    "`{key}` is not part of a LoRA (expected lora_A/lora_B, lora_down/lora_up or alpha tensors)"
                )));
            };
            // Some tools save an integer alpha (`torch.tensor(8)`); A1111 and ComfyUI read it as a number.
            let values: Vec<f64> = match &t.data {
                model_io::tensor_file::HostData::F32(v) => v.iter().map(|&x| x as f64).collect(),
                model_io::tensor_file::HostData::I64(v) if role == Role::Alpha => v.iter().map(|&x| x as f64).collect(),
                model_io::tensor_file::HostData::I64(_) => {
                    return Err(bad(format!("`{key}` holds integers; LoRA weights are floating point")))
                }
            };
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("`{key}` holds {} at element {i}; the file is damaged", values[i])));
            }
            let m = modules.entry(module).or_default();
            match role {
                Role::Down => m.down = Some((key, t)),
                Role::Up => m.up = Some((key, t)),
                Role::Alpha => {
                    if values.len() != 1 {
                        return Err(bad(format!("`{key}` has shape {:?}; an alpha is one number", t.shape)));
                    }
                    m.alpha = Some(values[0]);
                }
            }
        }
        let kohya = modules.keys().any(|m| m.starts_with("lora_"));
        let mut configs_ok = HashMap::new();
        for t in [LoraTarget::Unet, LoraTarget::TextEncoder, LoraTarget::TextEncoder2] {
            if let Some(c) =
                sd_unet::lora::PeftLoraConfig::from_metadata(&meta, t.peft()).map_err(|e| bad(e.to_string()))?
            {
                configs_ok.insert(t, c);
            }
        }
        let mut summary = LoraSummary {
            spec: spec.clone(),
            layout: if kohya { "kohya" } else { "peft" },
            unet_layers: 0,
            text_encoder_layers: 0,
            text_encoder_2_layers: 0,
        };
        for (name, m) in &modules {
            let (Some((down_key, down)), Some((up_key, up))) = (&m.down, &m.up) else {
                let (have, missing) = match (&m.down, &m.up) {
                    (Some((k, _)), None) => (k.clone(), "up (lora_B / lora_up)"),
                    (None, Some((k, _))) => (k.clone(), "down (lora_A / lora_down)"),
                    _ => (format!("{name}.alpha"), "down and up weights"),
                };
                return Err(bad(format!("`{have}` comes without its {missing}")));
            };
            let Some((target, weight)) = targets.names.get(name.as_str()) else {
                return Err(bad(unknown_module(name, down_key, sdxl)));
            };
            let base_shape = match target {
                LoraTarget::Unet => unet.info(weight),
                t => texts.iter().find(|(tt, _)| tt == t).and_then(|(_, c)| c.info(weight)),
            }
            .map(|i| i.shape.clone())
            .unwrap_or_default();
            let rank = down.shape.first().copied().unwrap_or(0);
            let out = up.shape.first().copied().unwrap_or(0);
            let fan: usize = down.shape.iter().skip(1).product();
            let up_ok = up.shape.len() >= 2 && up.shape[1] == rank && up.shape[2..].iter().all(|&d| d == 1);
            let kernel_ok = match (down.shape.len(), base_shape.len()) {
                (4, 4) => down.shape[2..] == base_shape[2..],
                (2, 4) => base_shape[2..].iter().all(|&d| d == 1),
                (4, 2) => down.shape[2..].iter().all(|&d| d == 1),
                (2, 2) => true,
                _ => false,
            };
            let fits = rank > 0
                && up_ok
                && kernel_ok
                && base_shape.first() == Some(&out)
                && base_shape.iter().product::<usize>() == out * fan;
            if !fits {
                return Err(bad(format!(
                    "`{down_key}` {:?} and `{up_key}` {:?} do not fit `{weight}` {:?} of the {}: a LoRA for another model?",
                    down.shape,
                    up.shape,
                    base_shape,
                    target.describe()
                )));
            }
            let module_path = weight.strip_suffix(".weight").unwrap_or(weight);
            let s = match (m.alpha, configs_ok.get(target)) {
                (Some(a), _) => a / rank as f64,
                (None, Some(cfg)) => cfg.scale(module_path, rank),
                (None, None) => default_alpha.map_or(1.0, |a| a / rank as f64),
            };
            let host = |t: &HostTensor, k: &str, dims: [usize; 2]| -> Result<Tensor<B, 2>> {
                let v = t.as_f32(k).map_err(|e| bad(e.to_string()))?;
                Ok(Tensor::from_data(TensorData::new(v.to_vec(), dims), device))
            };
            let delta = host(up, up_key, [out, rank])?.matmul(host(down, down_key, [rank, fan])?) * (s * spec.scale);
            let slot = (*target, weight.clone());
            let sum = match deltas.remove(&slot) {
                Some(d) => d + delta,
                None => delta,
            };
            deltas.insert(slot, sum);
            match target {
                LoraTarget::Unet => summary.unet_layers += 1,
                LoraTarget::TextEncoder => summary.text_encoder_layers += 1,
                LoraTarget::TextEncoder2 => summary.text_encoder_2_layers += 1,
            }
        }
        let second = if sdxl { format!(", {} text_encoder_2", summary.text_encoder_2_layers) } else { String::new() };
        tracing::info!(
            "LoRA {file} ({}, scale {}): {} UNet and {} text-encoder{second} layers",
            summary.layout,
            spec.scale,
            summary.unet_layers,
            summary.text_encoder_layers
        );
        summaries.push(summary);
    }
    for ((target, key), delta) in deltas {
        let ckpt: &mut Checkpoint = match target {
            LoraTarget::Unet => &mut *unet,
            t => match texts.iter_mut().find(|(tt, _)| *tt == t) {
                Some((_, c)) => c,
                // Targets names only the models given.
                None => continue,
            },
        };
        let (base, _) = ckpt.read_f32(&key)?;
        let [o, f] = delta.dims();
        let merged = Tensor::<B, 2>::from_data(TensorData::new(base, [o, f]), device) + delta;
        let values = merged
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| Error::invalid(format!("`{key}`: {e:?}")))?;
        let source = PathBuf::from(format!("{} + LoRA", ckpt.name()));
        ckpt.set_f32(&key, values, &source)?;
    }
    Ok(summaries)
}

/// Why a LoRA module matched no layer: SDXL's encoders on an SD 1.x/2.x base, or another
/// architecture.
fn unknown_module(name: &str, key: &str, sdxl: bool) -> String {
    let for_sdxl = ["lora_te1_", "lora_te2_", "text_encoder_2."].iter().any(|p| name.starts_with(p));
    if for_sdxl && !sdxl {
        return format!("`{key}` is for SDXL's two text encoders, and this base is SD 1.x/2.x: an SDXL LoRA?");
    }
    let models = if sdxl { "UNet or text encoders" } else { "UNet or text encoder" };
    format!("`{key}` matches no layer of this model's {models}: a LoRA for another architecture?")
}
