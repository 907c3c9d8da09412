//! Cross-attention blocks: diffusers' `Attention`, `BasicTransformerBlock`, `FeedForward`
//! (GEGLU) and `Transformer2DModel` as SD 1.x/2.x configure them.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Result, Weights};
use model_layers::nn::{Conv2d, GroupNorm, LayerNorm, Linear};

use crate::lora::LoraLinear;

/// Multi-head attention with bias-free q/k/v projections and a biased output projection.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub to_q: LoraLinear<B>,
    pub to_k: LoraLinear<B>,
    pub to_v: LoraLinear<B>,
    pub to_out: LoraLinear<B>,
    heads: usize,
}

impl<B: Backend> Attention<B> {
    fn load(w: &Weights<B>, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: LoraLinear::new(Linear::load(&w.pp("to_q"), dim, dim, false)?),
            to_k: LoraLinear::new(Linear::load(&w.pp("to_k"), context_dim, dim, false)?),
            to_v: LoraLinear::new(Linear::load(&w.pp("to_v"), context_dim, dim, false)?),
            to_out: LoraLinear::new(Linear::load(&w.pp(crate::keys::TO_OUT), dim, dim, true)?),
            heads,
        })
    }

    /// `x` `[B, L, dim]` attends to `context` `[B, S, context_dim]` (itself when `None`).
    /// On the CPU in f32 this is a fused kernel that reads the projections in place
    /// ([`cpu_kernels::attention`]); elsewhere Burn's attention op.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let ctx = context.cloned().unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(ctx.clone());
        let v = self.to_v.forward(ctx);
        self.to_out.forward(cpu_kernels::attention(q, k, v, self.heads))
    }

    /// The key suffixes of the four projections, the modules LoRA adapters attach to (peft's
    /// `target_modules`).
    pub const PROJECTIONS: [&'static str; 4] = ["to_q", "to_k", "to_v", crate::keys::TO_OUT];

    /// The four projections, for attaching adapters.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut LoraLinear<B>); 4] {
        let [q, k, v, o] = Self::PROJECTIONS;
        [(q, &mut self.to_q), (k, &mut self.to_k), (v, &mut self.to_v), (o, &mut self.to_out)]
    }

    /// The four projections with their key suffixes.
    pub fn projections(&self) -> [(&'static str, &LoraLinear<B>); 4] {
        let [q, k, v, o] = Self::PROJECTIONS;
        [(q, &self.to_q), (k, &self.to_k), (v, &self.to_v), (o, &self.to_out)]
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` to twice the inner width, gated, then `net.2`.
#[derive(Module, Debug)]
struct FeedForward<B: Backend> {
    proj: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.out.forward(cpu_kernels::geglu(self.proj.forward(x)))
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-norm
/// with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    norm3: LayerNorm<B>,
    ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    fn load(w: &Weights<B>, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward {
                proj: Linear::load(&w.pp(crate::keys::FF_PROJ), dim, 2 * inner, true)?,
                out: Linear::load(&w.pp(crate::keys::FF_OUT), inner, dim, true)?,
            },
        })
    }

    fn forward(&self, x: Tensor<B, 3>, context: &Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context)) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// Projection in/out of the transformer: a 1×1 convolution (SD 1) or a linear layer (SD 2,
/// `use_linear_projection`).
#[derive(Module, Debug)]
enum Proj<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

/// `Transformer2DModel` over a feature map, with a residual connection.
#[derive(Module, Debug)]
pub struct Transformer2D<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Proj<B>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    proj_out: Proj<B>,
}

/// What a [`Transformer2D`] needs from the UNet config.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl<B: Backend> Transformer2D<B> {
    /// Reads the block under `w` (`...attentions.N`).
    pub fn load(w: &Weights<B>, s: TransformerSpec) -> Result<Self> {
        let c = s.channels;
        let proj = |name: &str| -> Result<Proj<B>> {
            Ok(if s.linear_projection {
                Proj::Linear(Linear::load(&w.pp(name), c, c, true)?)
            } else {
                Proj::Conv(Conv2d::load(&w.pp(name), c, c, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(&w.pp("norm"), s.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            transformer_blocks: (0..s.layers)
                .map(|i| BasicTransformerBlock::load(&w.pp("transformer_blocks").pp(i), c, s.context_dim, s.heads))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    /// `x` `[N, C, H, W]` conditioned on `context` `[N, S, D]`.
    pub fn forward(&self, x: Tensor<B, 4>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let y = self.norm.forward(x.clone());
        // Contiguous token sequences: the norms and residual adds below then run on plain rows.
        let to_seq = |t: Tensor<B, 4>| cpu_kernels::transpose(t.reshape([n, c, h * w]));
        let mut y = match &self.proj_in {
            Proj::Conv(p) => to_seq(p.forward(y)),
            Proj::Linear(p) => p.forward(to_seq(y)),
        };
        for b in &self.transformer_blocks {
            y = b.forward(y, context);
        }
        let to_map = |t: Tensor<B, 3>| cpu_kernels::transpose(t).reshape([n, c, h, w]);
        let y = match &self.proj_out {
            Proj::Conv(p) => p.forward(to_map(y)),
            Proj::Linear(p) => to_map(p.forward(y)),
        };
        y + x
    }
}
