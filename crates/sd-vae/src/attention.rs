//! The spatial self-attention of the VAE's middle block (diffusers `Attention` with a group
//! norm and a residual connection).

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Result, Weights};
use model_layers::nn::{GroupNorm, Linear};

/// Single-block spatial attention: `x + to_out(attn(norm(x)))` over the `H·W` positions.
#[derive(Module, Debug)]
pub struct SpatialSelfAttention<B: Backend> {
    group_norm: GroupNorm<B>,
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    heads: usize,
}

impl<B: Backend> SpatialSelfAttention<B> {
    /// Reads the block under `w`. Checkpoints saved before diffusers 0.14 name the projections
    /// `query`/`key`/`value`/`proj_attn`; both layouts load.
    pub fn load(w: &Weights<B>, channels: usize, head_dim: usize, groups: usize, eps: f64) -> Result<Self> {
        let legacy = w.contains("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, channels, eps)?,
            to_q: Linear::load(&w.pp(name("to_q", "query")), channels, channels, true)?,
            to_k: Linear::load(&w.pp(name("to_k", "key")), channels, channels, true)?,
            to_v: Linear::load(&w.pp(name("to_v", "value")), channels, channels, true)?,
            to_out: Linear::load(&w.pp(name("to_out.0", "proj_attn")), channels, channels, true)?,
            heads: (channels / head_dim.max(1)).max(1),
        })
    }

    /// `[N, C, H, W]` to the same shape.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let l = h * w;
        let y = cpu_kernels::transpose(self.group_norm.forward(x.clone()).reshape([n, c, l]));
        let q = self.to_q.forward(y.clone());
        let k = self.to_k.forward(y.clone());
        let v = self.to_v.forward(y);
        let o = self.to_out.forward(cpu_kernels::attention(q, k, v, self.heads));
        x + cpu_kernels::transpose(o).reshape([n, c, h, w])
    }
}
