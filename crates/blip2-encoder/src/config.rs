use std::path::Path;

use burn::tensor::activation::{gelu_approximate, relu, silu};
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Error, Result};
use serde::Deserialize;

/// `config.json` of a transformers BLIP-2 checkpoint (`model_type` `blip-2`: `Blip2Model`,
/// `Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval`). Only the parts the image
/// encoder needs are read; `text_config` (the language model) is ignored.
///
/// Missing fields take transformers' defaults, so [`Blip2Config::default`] is the published
/// ViT-g + Q-Former of `Salesforce/blip2-opt-2.7b` (what the benchmark builds with random
/// weights).
///
/// ```no_run
/// let cfg = blip2_encoder::Blip2Config::load("blip2-opt-2.7b".as_ref())?;
/// println!("{} queries of width {}", cfg.num_query_tokens, cfg.qformer_config.hidden_size);
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Blip2Config {
    pub model_type: Option<String>,
    pub vision_config: Blip2VisionConfig,
    pub qformer_config: Blip2QFormerConfig,
    pub num_query_tokens: usize,
}

impl Default for Blip2Config {
    fn default() -> Self {
        Self {
            model_type: Some("blip-2".into()),
            vision_config: Blip2VisionConfig::default(),
            qformer_config: Blip2QFormerConfig::default(),
            num_query_tokens: 32,
        }
    }
}

/// `vision_config`: the EVA ViT-g image encoder (transformers `Blip2VisionConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Blip2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Bias on the query and value parts of the fused qkv projection (EVA's `q_bias`/`v_bias`).
    pub qkv_bias: bool,
}

impl Default for Blip2VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

/// `qformer_config`: the BERT-style Querying Transformer (transformers `Blip2QFormerConfig`).
/// Its cross-attention width is always the vision hidden size (transformers overwrites
/// `encoder_hidden_size` with it, so the field in the file is not read).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Blip2QFormerConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub position_embedding_type: String,
    /// Layer `i` has cross-attention into the image when `i % cross_attention_frequency == 0`.
    pub cross_attention_frequency: usize,
    /// Whether the Q-Former also has a text branch (blip2-itm-vit-g). The queries never use
    /// it; its weights are skipped.
    pub use_qformer_text_input: bool,
}

impl Default for Blip2QFormerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
            cross_attention_frequency: 2,
            use_qformer_text_input: false,
        }
    }
}

impl Blip2Config {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let v: serde_json::Value = model_io::read_config(dir, "config.json")?;
        match v.get("model_type").and_then(|m| m.as_str()) {
            Some("blip-2") => {}
            Some(other) => {
                return Err(Error::Config {
                    path,
                    message: format!("model_type `{other}` is not a BLIP-2 checkpoint (expected blip-2)"),
                })
            }
            // A config without model_type must at least have the two sub-configs we read.
            None if v.get("vision_config").is_none() || v.get("qformer_config").is_none() => {
                return Err(Error::Config {
                    path,
                    message: "no model_type and no vision_config/qformer_config: not a BLIP-2 config".into(),
                })
            }
            None => {}
        }
        let cfg: Self = serde_json::from_value(v).map_err(|e| Error::Json { path: path.clone(), cause: e })?;
        cfg.check().map_err(|message| Error::Config { path, message })?;
        Ok(cfg)
    }

    /// Checks the values the encoder relies on; the message names the offending field.
    pub fn check(&self) -> std::result::Result<(), String> {
        let v = &self.vision_config;
        let q = &self.qformer_config;
        let nonzero = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
            ("qformer_config.hidden_size", q.hidden_size),
            ("qformer_config.num_attention_heads", q.num_attention_heads),
            ("qformer_config.cross_attention_frequency", q.cross_attention_frequency),
            ("num_query_tokens", self.num_query_tokens),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, n)| *n == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if !q.hidden_size.is_multiple_of(q.num_attention_heads) {
            return Err(format!(
                "qformer_config.hidden_size {} is not a multiple of num_attention_heads {}",
                q.hidden_size, q.num_attention_heads
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if q.position_embedding_type != "absolute" {
            return Err(format!(
                "qformer_config.position_embedding_type `{}` unsupported (absolute)",
                q.position_embedding_type
            ));
        }
        Activation::parse(&v.hidden_act).map_err(|e| format!("vision_config.hidden_act {e}"))?;
        Activation::parse(&q.hidden_act).map_err(|e| format!("qformer_config.hidden_act {e}"))?;
        Ok(())
    }

    /// Number of image tokens the vision model outputs: patches plus the class token.
    pub fn num_image_tokens(&self) -> usize {
        let g = self.vision_config.image_size / self.vision_config.patch_size;
        g * g + 1
    }
}

/// The activations transformers' `ACT2FN` maps BLIP-2's `hidden_act` names to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu`: the exact (erf) form.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => return Err(format!("`{other}` unsupported (gelu, gelu_new, quick_gelu, relu, silu)")),
        })
    }

    pub(crate) fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Gelu => cpu_kernels::gelu(x),
            Self::GeluTanh => gelu_approximate(x),
            Self::QuickGelu => cpu_kernels::quick_gelu(x),
            Self::Relu => relu(x),
            Self::Silu => silu(x),
        }
    }
}
