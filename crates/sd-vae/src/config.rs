use std::path::Path;

use model_io::{Error, Result};
use serde::Deserialize;

/// `config.json` of a diffusers `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKlConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Decode in f32 when the rest runs in half precision (SDXL's VAE overflows in fp16);
    /// diffusers' default is true.
    #[serde(default = "yes")]
    pub force_upcast: bool,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn yes() -> bool {
    true
}
fn default_scaling() -> f64 {
    0.18215
}

impl AutoencoderKlConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let v: serde_json::Value = model_io::read_config(dir, "config.json")?;
        Self::from_json(v, &dir.join("config.json"))
    }

    /// The config from its JSON (`path` names it in errors), checked as
    /// [`AutoencoderKlConfig::load`] checks it.
    ///
    /// ```
    /// let v = serde_json::json!({"block_out_channels": [32], "act_fn": "relu"});
    /// let e = sd_vae::AutoencoderKlConfig::from_json(v, "vae.json".as_ref()).unwrap_err();
    /// assert!(e.to_string().contains("vae.json") && e.to_string().contains("relu"));
    /// ```
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(v).map_err(|e| Error::Json { path: path.to_path_buf(), cause: e })?;
        let path = path.to_path_buf();
        let bad = |message: String| Err(Error::Config { path: path.clone(), message });
        match cfg.class_name.as_deref() {
            None | Some("AutoencoderKL") => {}
            Some(other) => return bad(format!("_class_name is `{other}`, expected AutoencoderKL")),
        }
        if cfg.act_fn != "silu" {
            return bad(format!("act_fn `{}` unsupported (silu)", cfg.act_fn));
        }
        if cfg.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        if !(cfg.scaling_factor.is_finite() && cfg.scaling_factor > 0.0 && cfg.scaling_factor < 1e6) {
            return bad(format!(
                "scaling_factor {} must be a positive number (0.18215 for SD 1.x)",
                cfg.scaling_factor
            ));
        }
        if cfg.shift_factor.is_some_and(|s| !s.is_finite()) {
            return bad(format!("shift_factor {:?} must be finite", cfg.shift_factor));
        }
        if !(cfg.norm_num_groups > 0 && cfg.block_out_channels.iter().all(|c| c % cfg.norm_num_groups == 0)) {
            return bad(format!(
                "norm_num_groups {} must divide every block_out_channels {:?}",
                cfg.norm_num_groups, cfg.block_out_channels
            ));
        }
        for t in &cfg.down_block_types {
            if t != "DownEncoderBlock2D" {
                return bad(format!("down block type `{t}` unsupported (DownEncoderBlock2D)"));
            }
        }
        for t in &cfg.up_block_types {
            if t != "UpDecoderBlock2D" {
                return bad(format!("up block type `{t}` unsupported (UpDecoderBlock2D)"));
            }
        }
        Ok(cfg)
    }

    /// The spatial factor between images and latents (`2^(blocks-1)`, 8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
