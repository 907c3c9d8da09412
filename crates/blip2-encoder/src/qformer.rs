//! The BLIP-2 Querying Transformer, as transformers' `Blip2QFormerModel` on query embeddings
//! only (no text input).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Result, Weights};
use model_layers::nn::{LayerNorm, Linear};

use crate::config::{Activation, Blip2QFormerConfig};

/// BERT attention block: multi-head attention (`attention.{query,key,value}`), then
/// `output.dense` and a post-norm residual `output.LayerNorm(dense + input)`.
/// As cross-attention its keys and values come from the image embeddings.
#[derive(Module, Debug)]
struct BertAttention<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    dense: Linear<B>,
    layer_norm: LayerNorm<B>,
    heads: usize,
}

impl<B: Backend> BertAttention<B> {
    /// `kv_dim`: width of what the keys and values are computed from.
    fn load(w: &Weights<B>, cfg: &Blip2QFormerConfig, kv_dim: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let a = w.pp("attention");
        let o = w.pp("output");
        Ok(Self {
            query: Linear::load(&a.pp("query"), d, d, true)?,
            key: Linear::load(&a.pp("key"), kv_dim, d, true)?,
            value: Linear::load(&a.pp("value"), kv_dim, d, true)?,
            dense: Linear::load(&o.pp("dense"), d, d, true)?,
            layer_norm: LayerNorm::load(&o.pp("LayerNorm"), d, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x` `[B, Q, D]` attends to `context` (`x` itself when `None`). The Q-Former's masks are
    /// all ones for the queries and the image tokens, so no mask is applied.
    fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let kv = context.unwrap_or_else(|| x.clone());
        let q = self.query.forward(x.clone());
        let k = self.key.forward(kv.clone());
        let v = self.value.forward(kv);
        let o = cpu_kernels::attention(q, k, v, self.heads);
        self.layer_norm.forward(self.dense.forward(o) + x)
    }
}

/// The query branch's feed-forward: `intermediate_query.dense`, activation,
/// `output_query.dense`, post-norm residual.
#[derive(Module, Debug)]
struct FeedForward<B: Backend> {
    intermediate: Linear<B>,
    output: Linear<B>,
    layer_norm: LayerNorm<B>,
    #[module(skip)]
    act: Activation,
}

impl<B: Backend> FeedForward<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.act.apply(self.intermediate.forward(x.clone()));
        self.layer_norm.forward(self.output.forward(h) + x)
    }
}

#[derive(Module, Debug)]
struct QFormerLayer<B: Backend> {
    attention: BertAttention<B>,
    crossattention: Option<BertAttention<B>>,
    ffn: FeedForward<B>,
}

/// `query_tokens`, `qformer.layernorm` applied to them, then the layers: self-attention over
/// the queries, cross-attention into the image every `cross_attention_frequency` layers
/// (layers 0, f, 2f, ...), and the query feed-forward.
#[derive(Module, Debug)]
pub(crate) struct QFormer<B: Backend> {
    /// `[1, Q, D]`.
    query_tokens: Param<Tensor<B, 3>>,
    layernorm: LayerNorm<B>,
    layers: Vec<QFormerLayer<B>>,
}

impl<B: Backend> QFormer<B> {
    /// Reads `query_tokens` from `root` and the Q-Former from `root.qformer`; `image_dim` is
    /// the vision hidden size (the cross-attention key/value input width).
    pub(crate) fn load(root: &Weights<B>, cfg: &Blip2QFormerConfig, queries: usize, image_dim: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let act = Activation::parse(&cfg.hidden_act).map_err(model_io::Error::invalid)?;
        let w = root.pp("qformer");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lw = w.pp("encoder.layer").pp(i);
            let crossattention = if i % cfg.cross_attention_frequency == 0 {
                Some(BertAttention::load(&lw.pp("crossattention"), cfg, image_dim)?)
            } else {
                None
            };
            layers.push(QFormerLayer {
                attention: BertAttention::load(&lw.pp("attention"), cfg, d)?,
                crossattention,
                ffn: FeedForward {
                    intermediate: Linear::load(&lw.pp("intermediate_query.dense"), d, cfg.intermediate_size, true)?,
                    output: Linear::load(&lw.pp("output_query.dense"), cfg.intermediate_size, d, true)?,
                    layer_norm: LayerNorm::load(&lw.pp("output_query.LayerNorm"), d, cfg.layer_norm_eps)?,
                    act,
                },
            });
        }
        Ok(Self {
            query_tokens: Param::from_tensor(root.get::<3>("query_tokens", [1, queries, d])?),
            layernorm: LayerNorm::load(&w.pp("layernorm"), d, cfg.layer_norm_eps)?,
            layers,
        })
    }

    /// Image embeddings `[B, N, Dv]` to the query output `[B, Q, D]` (the last hidden state).
    pub(crate) fn forward(&self, image_embeds: Tensor<B, 3>) -> Tensor<B, 3> {
        let b = image_embeds.dims()[0];
        let mut x = self.layernorm.forward(self.query_tokens.val().repeat_dim(0, b));
        for layer in &self.layers {
            x = layer.attention.forward(x, None);
            if let Some(cross) = &layer.crossattention {
                x = cross.forward(x, Some(image_embeds.clone()));
            }
            x = layer.ffn.forward(x);
        }
        x
    }

    pub(crate) fn num_queries(&self) -> usize {
        self.query_tokens.dims()[1]
    }

    pub(crate) fn hidden_size(&self) -> usize {
        self.query_tokens.dims()[2]
    }

    pub(crate) fn device(&self) -> B::Device {
        self.query_tokens.device()
    }
}
