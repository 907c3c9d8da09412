//! The BLIP-2 vision transformer (EVA ViT-g), as transformers' `Blip2VisionModel`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Result, Weights};
use model_layers::nn::{Conv2d, LayerNorm, Linear};

use crate::config::{Activation, Blip2VisionConfig};

/// Self-attention with one fused `qkv` projection (no bias in the layer itself; EVA's
/// `q_bias`/`v_bias` form its bias with zeros for the keys) and an output `projection`.
#[derive(Module, Debug)]
struct Attention<B: Backend> {
    qkv: Linear<B>,
    projection: Linear<B>,
    heads: usize,
}

impl<B: Backend> Attention<B> {
    fn load(w: &Weights<B>, cfg: &Blip2VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        // transformers stores the fused bias `qkv.bias` = cat(q_bias, 0, v_bias); checkpoints
        // converted by other tools may keep EVA's separate `q_bias`/`v_bias`. Random weights
        // (benchmarks) report no optional tensors and take the first branch.
        let bias = || {
            Ok(if !cfg.qkv_bias {
                None
            } else if !w.contains("qkv.bias") && w.contains("q_bias") && w.contains("v_bias") {
                let q = w.get::<1>("q_bias", [d])?;
                let v = w.get::<1>("v_bias", [d])?;
                Some(Tensor::cat(vec![q, Tensor::zeros([d], w.device()), v], 0))
            } else {
                Some(w.get::<1>("qkv.bias", [3 * d])?)
            })
        };
        Ok(Self {
            qkv: Linear::load_with_bias(&w.pp("qkv"), d, 3 * d, bias)?,
            projection: Linear::load(&w.pp("projection"), d, d, true)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        // The fused output is laid out [3, heads, head_dim] along its last dimension.
        let qkv = self.qkv.forward(x);
        let part = |i: usize| qkv.clone().narrow(2, i * d, d);
        self.projection.forward(cpu_kernels::attention(part(0), part(1), part(2), self.heads))
    }
}

/// A pre-norm encoder layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
struct EncoderLayer<B: Backend> {
    layer_norm1: LayerNorm<B>,
    self_attn: Attention<B>,
    layer_norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    #[module(skip)]
    act: Activation,
}

impl<B: Backend> EncoderLayer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = self.act.apply(self.fc1.forward(self.layer_norm2.forward(x.clone())));
        x + self.fc2.forward(h)
    }
}

/// `Blip2VisionModel`: patch embedding (a conv with kernel = stride = patch), a class token,
/// learned position embeddings, pre-norm layers and a final `post_layernorm`.
#[derive(Module, Debug)]
pub(crate) struct VisionModel<B: Backend> {
    /// `[1, 1, D]`.
    class_embedding: Param<Tensor<B, 3>>,
    patch_embedding: Conv2d<B>,
    /// `[1, patches + 1, D]`.
    position_embedding: Param<Tensor<B, 3>>,
    layers: Vec<EncoderLayer<B>>,
    post_layernorm: LayerNorm<B>,
}

impl<B: Backend> VisionModel<B> {
    /// Reads the weights under `w` (the `vision_model` prefix).
    pub(crate) fn load(w: &Weights<B>, cfg: &Blip2VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let act = Activation::parse(&cfg.hidden_act).map_err(model_io::Error::invalid)?;
        let emb = w.pp("embeddings");
        let grid = cfg.image_size / cfg.patch_size;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lw = w.pp("encoder.layers").pp(i);
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(&lw.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
                self_attn: Attention::load(&lw.pp("self_attn"), cfg)?,
                layer_norm2: LayerNorm::load(&lw.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
                fc1: Linear::load(&lw.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
                fc2: Linear::load(&lw.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
                act,
            });
        }
        Ok(Self {
            class_embedding: Param::from_tensor(emb.get::<3>("class_embedding", [1, 1, d])?),
            patch_embedding: Conv2d::load(&emb.pp("patch_embedding"), 3, d, cfg.patch_size, cfg.patch_size, 0)?,
            position_embedding: Param::from_tensor(emb.get::<3>("position_embedding", [1, grid * grid + 1, d])?),
            layers,
            post_layernorm: LayerNorm::load(&w.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
        })
    }

    /// `[B, 3, S, S]` (already checked) to `last_hidden_state` `[B, patches + 1, D]`, after
    /// `post_layernorm`, which is what the Q-Former attends to.
    pub(crate) fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let b = pixel_values.dims()[0];
        let p = self.patch_embedding.forward(pixel_values);
        let [_, d, gh, gw] = p.dims();
        let patches = p.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let cls = self.class_embedding.val().repeat_dim(0, b);
        let mut x = Tensor::cat(vec![cls, patches], 1) + self.position_embedding.val();
        for layer in &self.layers {
            x = layer.forward(x);
        }
        self.post_layernorm.forward(x)
    }
}
