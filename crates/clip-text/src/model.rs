//! The CLIP text transformer, as transformers' `CLIPTextModel`.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};
use model_io::{Checkpoint, Error, Result, Weights};
use model_layers::nn::{Embedding, LayerNorm, Linear};
use serde::Deserialize;

/// `config.json` of a transformers `CLIPTextModel` (or the `text_config` of a `CLIPModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// The end-of-text id the pooled output is read at. 2 means the legacy rule of configs
    /// written before transformers PR #24773 (SDXL's among them): the position of the largest
    /// id, which is the end-of-text token of CLIP's vocabulary.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_eos() -> i64 {
    49407
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Reads `dir/config.json`, accepting a top-level text config or a nested `text_config`.
    pub fn load(dir: &Path) -> Result<Self> {
        let v: serde_json::Value = model_io::read_config(dir, "config.json")?;
        Self::from_json(v, &dir.join("config.json"))
    }

    /// The config from its JSON (`path` names it in errors), checked as [`ClipTextConfig::load`]
    /// checks it.
    ///
    /// ```
    /// let v = serde_json::json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
    ///     "num_hidden_layers": 1, "num_attention_heads": 3, "max_position_embeddings": 4});
    /// let e = clip_text::ClipTextConfig::from_json(v, "c.json".as_ref()).unwrap_err();
    /// assert!(e.to_string().contains("c.json"));
    /// ```
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let body = match (mt, v.get("text_config")) {
            ("clip", Some(t)) => t.clone(),
            ("clip_text_model", _) | ("clip_text_with_projection", _) | ("", _) => v,
            (other, _) => {
                return Err(Error::Config {
                    path,
                    message: format!("model_type `{other}` is not a CLIP text model (expected clip_text_model)"),
                })
            }
        };
        let cfg: Self = serde_json::from_value(body).map_err(|e| Error::Json { path: path.clone(), cause: e })?;
        if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Config {
                path,
                message: format!("hidden_act `{}` unsupported (quick_gelu or gelu)", cfg.hidden_act),
            });
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::Config { path, message: "hidden_size is not a multiple of num_attention_heads".into() });
        }
        Ok(cfg)
    }
}

/// Where a checkpoint keeps the encoder's tensors: `"text_model."` in the layout of the
/// published SD repositories (transformers 4 and `CLIPTextModelWithProjection` in 5), `""`
/// for a `CLIPTextModel` saved by transformers 5, which writes its keys without the prefix.
///
/// ```no_run
/// let ckpt = model_io::Checkpoint::open_dir("sd/text_encoder".as_ref(), &["model"])?;
/// assert!(matches!(clip_text::key_prefix(&ckpt), "text_model." | ""));
/// # Ok::<(), model_io::Error>(())
/// ```
pub fn key_prefix(ckpt: &Checkpoint) -> &'static str {
    if ckpt.info("final_layer_norm.weight").is_some() && ckpt.info("text_model.final_layer_norm.weight").is_none() {
        ""
    } else {
        "text_model."
    }
}

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    heads: usize,
}

impl<B: Backend> Attention<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // Projections in their [B, L, heads·d] layout; the kernel splits the heads itself.
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.out_proj.forward(cpu_kernels::causal_attention(q, k, v, self.heads))
    }
}

#[derive(Module, Debug)]
struct EncoderLayer<B: Backend> {
    layer_norm1: LayerNorm<B>,
    self_attn: Attention<B>,
    layer_norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    quick_gelu: bool,
}

impl<B: Backend> EncoderLayer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = self.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = if self.quick_gelu { cpu_kernels::quick_gelu(h) } else { cpu_kernels::gelu(h) };
        x + self.fc2.forward(h)
    }
}

/// The CLIP text encoder: token and position embeddings, pre-norm transformer layers with a
/// causal mask, final layer norm. Its output is `last_hidden_state`, what Stable Diffusion
/// conditions on.
///
/// ```no_run
/// use burn_flex::{Flex, FlexDevice};
/// let enc = clip_text::ClipTextModel::<Flex>::load("sd/text_encoder".as_ref(), &FlexDevice)?;
/// let tok = clip_text::ClipTokenizer::from_dir("sd/tokenizer".as_ref())?;
/// let ids = enc.ids_tensor(&[tok.encode("a photo of a cat")?]);
/// let hidden = enc.forward(ids)?; // [1, 77, 768]
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    token_embedding: Embedding<B>,
    position_embedding: Embedding<B>,
    layers: Vec<EncoderLayer<B>>,
    final_layer_norm: LayerNorm<B>,
    max_positions: usize,
    vocab_size: usize,
}

impl<B: Backend> ClipTextModel<B> {
    /// Loads `dir/config.json` and `dir/model(.fp16).safetensors`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg = ClipTextConfig::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir, &["model"])?;
        Self::from_checkpoint(&cfg, &ckpt, device)
    }

    /// Builds the model from a transformers checkpoint (keys under `text_model.` or at the
    /// root, see [`key_prefix`]), every tensor used but the position ids and a projection head.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let cfg = clip_text::ClipTextConfig::load("sd/text_encoder".as_ref())?;
    /// let ckpt = model_io::Checkpoint::open_dir("sd/text_encoder".as_ref(), &["model"])?;
    /// let te = clip_text::ClipTextModel::<Flex>::from_checkpoint(&cfg, &ckpt, &FlexDevice)?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn from_checkpoint(cfg: &ClipTextConfig, ckpt: &Checkpoint, device: &B::Device) -> Result<Self> {
        let w = Weights::new(ckpt, device);
        let prefix = key_prefix(ckpt);
        let m = Self::from_weights(cfg, &w.pp(prefix.trim_end_matches('.')))?;
        // Buffers and heads the encoder does not use.
        w.finish(&[&format!("{prefix}embeddings.position_ids"), "text_projection"])?;
        Ok(m)
    }

    /// Builds the model from weights under `w` (the checkpoint's `text_model` prefix, or the
    /// root for checkpoints saved by transformers 5; see [`key_prefix`]).
    pub fn from_weights(cfg: &ClipTextConfig, w: &Weights<B>) -> Result<Self> {
        // Never trained: its layers lay their weights out for the backend and release the
        // mapped originals (`Weights::frozen`).
        let w = &w.frozen();
        let d = cfg.hidden_size;
        let emb = w.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lw = w.pp("encoder.layers").pp(i);
            let a = lw.pp("self_attn");
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(&lw.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
                self_attn: Attention {
                    q_proj: Linear::load(&a.pp("q_proj"), d, d, true)?,
                    k_proj: Linear::load(&a.pp("k_proj"), d, d, true)?,
                    v_proj: Linear::load(&a.pp("v_proj"), d, d, true)?,
                    out_proj: Linear::load(&a.pp("out_proj"), d, d, true)?,
                    heads: cfg.num_attention_heads,
                },
                layer_norm2: LayerNorm::load(&lw.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
                fc1: Linear::load(&lw.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
                fc2: Linear::load(&lw.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
                quick_gelu: cfg.hidden_act == "quick_gelu",
            });
        }
        Ok(Self {
            // Borrowed from the map: a prompt reads a few of its rows (copied, 145 MiB resident).
            token_embedding: Embedding::load(&emb.pp("token_embedding"), cfg.vocab_size, d)?,
            position_embedding: Embedding::load(&emb.pp("position_embedding"), cfg.max_position_embeddings, d)?,
            layers,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            max_positions: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
        })
    }

    /// Width of the output embeddings.
    pub fn hidden_size(&self) -> usize {
        self.final_layer_norm.weight.dims()[0]
    }

    /// Stacks rows of ids (each the same length) into a `[B, L]` tensor on the model's device.
    pub fn ids_tensor(&self, rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
        let l = rows.first().map_or(0, Vec::len);
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let device = self.final_layer_norm.weight.device();
        Tensor::from_data(burn::tensor::TensorData::new(flat, [rows.len(), l]), &device)
    }

    /// `[B, L]` ids to `last_hidden_state` `[B, L, D]`. Fails on a sequence longer than the
    /// position table or an id outside the vocabulary.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        let (x, _) = self.run(ids, false)?;
        Ok(self.final_layer_norm.forward(x))
    }

    /// transformers' `output_hidden_states=True`: the embeddings and every layer's output
    /// (`hidden_states`, `num_hidden_layers + 1` of them, `[B, L, D]` each, the last before
    /// the final layer norm), and `last_hidden_state`. SDXL conditions on `hidden_states[-2]`.
    pub fn forward_hidden_states(&self, ids: Tensor<B, 2, Int>) -> Result<TextOutputs<B>> {
        let (x, hidden_states) = self.run(ids, true)?;
        Ok(TextOutputs { last_hidden_state: self.final_layer_norm.forward(x), hidden_states })
    }

    /// The encoder up to the final layer norm, with each layer's input kept when `keep`.
    fn run(&self, ids: Tensor<B, 2, Int>, keep: bool) -> Result<(Tensor<B, 3>, Vec<Tensor<B, 3>>)> {
        let [b, l] = ids.dims();
        if l > self.max_positions {
            return Err(Error::invalid(format!(
                "input_ids has {l} tokens; the text encoder takes at most {}",
                self.max_positions
            )));
        }
        let max = ids.clone().max().into_scalar();
        let min = ids.clone().min().into_scalar();
        let (lo, hi): (i64, i64) =
            (burn::tensor::ElementConversion::elem(min), burn::tensor::ElementConversion::elem(max));
        if lo < 0 || hi >= self.vocab_size as i64 {
            return Err(Error::invalid(format!(
                "input_ids holds id {} outside the vocabulary of {}",
                if lo < 0 { lo } else { hi },
                self.vocab_size
            )));
        }
        let device = ids.device();
        let pos = Tensor::<B, 1, Int>::arange(0..l as i64, &device).reshape([1, l]).repeat_dim(0, b);
        let mut x = self.token_embedding.forward(ids) + self.position_embedding.forward(pos);
        let mut states = Vec::new();
        for layer in &self.layers {
            if keep {
                states.push(x.clone());
            }
            x = layer.forward(x);
        }
        if keep {
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// The outputs of [`ClipTextModel::forward_hidden_states`].
#[derive(Debug, Clone)]
pub struct TextOutputs<B: Backend> {
    /// After the final layer norm, `[B, L, D]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// The embeddings, then each layer's output: `num_hidden_layers + 1` tensors `[B, L, D]`.
    pub hidden_states: Vec<Tensor<B, 3>>,
}

impl<B: Backend> TextOutputs<B> {
    /// `hidden_states[-2]`: the penultimate layer's output, which SDXL conditions on.
    pub fn penultimate(&self) -> Tensor<B, 3> {
        self.hidden_states[self.hidden_states.len().saturating_sub(2)].clone()
    }
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`): the text model plus
/// `text_projection` of the pooled output (the final-layer-normed state at the end-of-text
/// token), the `text_embeds` an SDXL UNet takes.
///
/// ```no_run
/// use burn_flex::{Flex, FlexDevice};
/// let enc = clip_text::ClipTextModelWithProjection::<Flex>::load("sdxl/text_encoder_2".as_ref(), &FlexDevice)?;
/// let tok = clip_text::ClipTokenizer::from_dir("sdxl/tokenizer_2".as_ref())?;
/// let out = enc.forward(enc.text_model.ids_tensor(&[tok.encode("a photo of a cat")?]))?;
/// let (context, pooled) = (out.text.penultimate(), out.text_embeds); // [1, 77, 1280], [1, 1280]
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct ClipTextModelWithProjection<B: Backend> {
    pub text_model: ClipTextModel<B>,
    text_projection: Linear<B>,
    eos_token_id: i64,
}

/// The outputs of [`ClipTextModelWithProjection::forward`].
#[derive(Debug, Clone)]
pub struct ProjectedOutputs<B: Backend> {
    /// The text model's states.
    pub text: TextOutputs<B>,
    /// `text_projection(pooled)`, `[B, projection_dim]`.
    pub text_embeds: Tensor<B, 2>,
}

impl<B: Backend> ClipTextModelWithProjection<B> {
    /// Loads `dir/config.json` and `dir/model(.fp16).safetensors`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg = ClipTextConfig::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir, &["model"])?;
        Self::from_checkpoint(&cfg, &ckpt, device)
    }

    /// Builds the model from a transformers checkpoint: the text model under `text_model.`
    /// (or the root), `text_projection.weight` `[projection_dim, hidden]`.
    pub fn from_checkpoint(cfg: &ClipTextConfig, ckpt: &Checkpoint, device: &B::Device) -> Result<Self> {
        let w = Weights::new(ckpt, device);
        let prefix = key_prefix(ckpt);
        let text_model = ClipTextModel::from_weights(cfg, &w.pp(prefix.trim_end_matches('.')))?;
        let proj = cfg.projection_dim.ok_or_else(|| {
            Error::invalid("config.json has no `projection_dim`; a CLIPTextModelWithProjection needs it")
        })?;
        let text_projection = Linear::load(&w.frozen().pp("text_projection"), cfg.hidden_size, proj, false)?;
        w.finish(&[&format!("{prefix}embeddings.position_ids")])?;
        Ok(Self { text_model, text_projection, eos_token_id: cfg.eos_token_id })
    }

    /// The width of `text_embeds` (`projection_dim`; 1280 in SDXL).
    pub fn projection_dim(&self) -> usize {
        self.text_projection.dims().1
    }

    /// The text model's states and the projected pooled output for `[B, L]` ids.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Result<ProjectedOutputs<B>> {
        let [b, l] = ids.dims();
        let rows: Vec<i64> = ids
            .clone()
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| Error::invalid(format!("input_ids could not be read: {e:?}")))?;
        let text = self.text_model.forward_hidden_states(ids)?;
        // transformers' pooling rule: the first end-of-text id, or (legacy configs) the
        // first largest id.
        let at: Vec<i64> = rows
            .chunks(l.max(1))
            .map(|r| {
                let pos = if self.eos_token_id == 2 {
                    r.iter().enumerate().fold(0, |best, (i, &v)| if v > r[best] { i } else { best })
                } else {
                    r.iter().position(|&v| v == self.eos_token_id).unwrap_or(0)
                };
                pos as i64
            })
            .collect();
        let d = text.last_hidden_state.dims()[2];
        let device = text.last_hidden_state.device();
        let index = Tensor::<B, 1, Int>::from_data(burn::tensor::TensorData::new(at, [b]), &device)
            .reshape([b, 1, 1])
            .repeat_dim(2, d);
        let pooled = text.last_hidden_state.clone().gather(1, index).reshape([b, d]);
        Ok(ProjectedOutputs { text_embeds: self.text_projection.forward(pooled), text })
    }
}
