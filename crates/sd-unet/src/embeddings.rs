//! Sinusoidal timestep embedding and the `TimestepEmbedding` MLP.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use model_io::{Result, Weights};
use model_layers::nn::Linear;

/// diffusers' `get_timestep_embedding`: `[N]` timesteps to `[N, dim]` sinusoids.
/// Frequencies are computed in f32 as torch does, so the result matches bit for bit up to the
/// sin/cos implementations.
pub fn timestep_embedding<B: Backend>(t: Tensor<B, 1>, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Tensor<B, 2> {
    let half = dim / 2;
    let log_max = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_max * i as f32) / denom).exp()).collect();
    let n = t.dims()[0];
    let f = Tensor::<B, 2>::from_data(TensorData::new(freqs, [1, half]), &t.device());
    let args = t.reshape([n, 1]) * f;
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(vec![cos, sin], 1) } else { Tensor::cat(vec![sin, cos], 1) };
    if dim % 2 == 1 {
        let z = Tensor::zeros([n, 1], &emb.device());
        Tensor::cat(vec![emb, z], 1)
    } else {
        emb
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    linear_1: Linear<B>,
    linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// Reads `time_embedding`.
    pub fn load(w: &Weights<B>, c_in: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&w.pp("linear_1"), c_in, dim, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), dim, dim, true)?,
        })
    }

    /// `[N, c_in]` to `[N, dim]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
