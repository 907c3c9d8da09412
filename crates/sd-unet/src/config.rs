use std::path::Path;

use model_io::{Error, Result};
use serde::Deserialize;

/// A number or a per-block list in `config.json` (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }

    fn len_ok(&self, n: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
}

/// `config.json` of a diffusers `UNet2DConditionModel` (the fields Stable Diffusion 1.x/2.x use).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default, deserialize_with = "null_is_false")]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    #[serde(default, deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default, deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `text_time` (SDXL): the added conditioning of [`crate::AddedConditioning`].
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoids of each of the 6 time ids (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: the pooled text width plus 6 × `addition_time_embed_dim`
    /// (SDXL: 1280 + 1536 = 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// An explicit per-up-block depth (diffusers otherwise reverses
    /// `transformer_layers_per_block`); not supported.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: serde_json::Value,
    /// A projection of the context before cross-attention; not supported.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
}

/// diffusers writes `null` for some flags it leaves unset (SDXL base 1.0's `upcast_attention`):
/// false, as its default.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}
fn thirty_two() -> usize {
    32
}
fn one_f() -> f64 {
    1.0
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

impl UNetConfig {
    /// Reads and checks `dir/config.json`; anything outside SD 1.x/2.x is an error naming it.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg: Self = model_io::read_config(dir, "config.json")?;
        cfg.validate().map_err(|message| Error::Config { path: dir.join("config.json"), message })?;
        Ok(cfg)
    }

    /// Checks the config describes a UNet this crate implements.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.class_name.as_deref() {
            None | Some("UNet2DConditionModel") => {}
            Some(o) => return Err(format!("_class_name is `{o}`, expected UNet2DConditionModel")),
        }
        if self.sample_size == Some(0) {
            return Err("sample_size 0 must be at least 1 (64 for SD 1.x: 512-pixel images)".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("norm_eps {} must be a small positive number (1e-5)", self.norm_eps));
        }
        if !(self.norm_num_groups > 0 && self.block_out_channels.iter().all(|c| c % self.norm_num_groups == 0)) {
            return Err(format!(
                "norm_num_groups {} must divide every block_out_channels {:?}",
                self.norm_num_groups, self.block_out_channels
            ));
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err("down_block_types, up_block_types and block_out_channels must have the same length".into());
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("unsupported down block type `{t}` (CrossAttnDownBlock2D, DownBlock2D)"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!("unsupported up block type `{t}` (CrossAttnUpBlock2D, UpBlock2D)"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return Err(format!(
                    "unsupported mid block type `{}` (UNetMidBlock2DCrossAttn)",
                    other.unwrap_or("null")
                ))
            }
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", !matches!(self.addition_embed_type.as_deref(), None | Some("text_time"))),
            ("reverse_transformer_layers_per_block", !self.reverse_transformer_layers_per_block.is_null()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "only_cross_attention",
                !matches!(self.only_cross_attention, serde_json::Value::Null | serde_json::Value::Bool(false)),
            ),
            ("resnet_time_scale_shift", self.resnet_time_scale_shift != "default"),
            ("act_fn", self.act_fn != "silu"),
            ("time_embedding_type", !matches!(self.time_embedding_type.as_deref(), None | Some("positional"))),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return Err(format!(
                "`{name}` as set here is not supported (Stable Diffusion 1.x/2.x and SDXL UNets only)"
            ));
        }
        if let Some((time_dim, input_dim)) = self.text_time()? {
            if time_dim == 0 || time_dim % 2 == 1 || input_dim <= 6 * time_dim {
                return Err(format!(
                    "`addition_time_embed_dim` {time_dim} must be even and positive, and \
                     `projection_class_embeddings_input_dim` {input_dim} larger than 6 × it (the pooled \
                     text width plus the 6 time ids' sinusoids)"
                ));
            }
        }
        for (name, v) in [
            ("attention_head_dim", &self.attention_head_dim),
            ("transformer_layers_per_block", &self.transformer_layers_per_block),
        ] {
            if !v.len_ok(n) {
                return Err(format!("`{name}` must be a number or a list of {n}"));
            }
        }
        if let Some(h) = &self.num_attention_heads {
            if !h.len_ok(n) {
                return Err(format!("`num_attention_heads` must be a number or a list of {n}"));
            }
        }
        for i in 0..n {
            let (c, h) = (self.block_out_channels[i], self.heads(i));
            if h == 0 || c % h != 0 {
                return Err(format!("block {i}: {c} channels are not divisible into {h} heads"));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        Ok(())
    }

    /// SDXL's `text_time` conditioning: `(addition_time_embed_dim,
    /// projection_class_embeddings_input_dim)`, or `None` for a UNet without it; an error when
    /// either is missing.
    pub fn text_time(&self) -> std::result::Result<Option<(usize, usize)>, String> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(None);
        }
        match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
            (Some(t), Some(p)) => Ok(Some((t, p))),
            _ => Err("`addition_embed_type` \"text_time\" needs `addition_time_embed_dim` and \
                      `projection_class_embeddings_input_dim`"
                .into()),
        }
    }

    /// Width of the pooled text embedding (`text_embeds`) an SDXL UNet takes; `None` without
    /// `text_time` conditioning.
    pub fn pooled_text_dim(&self) -> Option<usize> {
        self.text_time().ok().flatten().map(|(t, p)| p - 6 * t)
    }

    /// Attention heads of block `i`. diffusers' (historically misnamed) `attention_head_dim` is
    /// the number of heads when `num_attention_heads` is absent, as in every SD config.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }
}
