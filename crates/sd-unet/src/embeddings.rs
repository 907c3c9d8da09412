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

/// SDXL's added conditioning (`added_cond_kwargs` in diffusers), for a UNet whose config has
/// `addition_embed_type: "text_time"`.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_flex::{Flex, FlexDevice};
/// let added = sd_unet::AddedConditioning::<Flex> {
///     text_embeds: Tensor::zeros([1, 1280], &FlexDevice),
///     // original size (h, w), crop top-left (y, x), target size (h, w)
///     time_ids: Tensor::from_floats([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], &FlexDevice),
/// };
/// assert_eq!(added.time_ids.dims(), [1, 6]);
/// ```
#[derive(Debug, Clone)]
pub struct AddedConditioning<B: Backend> {
    /// The pooled, projected output of the second text encoder: `[B, P]` (P = 1280 in SDXL).
    pub text_embeds: Tensor<B, 2>,
    /// `[B, 6]`: original size, crop top-left and target size, each as (height, width).
    pub time_ids: Tensor<B, 2>,
}

/// The input of a `text_time` UNet's `add_embedding`: the pooled text embedding joined to the
/// sinusoids (`add_time_proj`, `time_dim` wide, with the UNet's `flip_sin_to_cos` and
/// `freq_shift`) of each of the 6 time ids: `[batch, pooled_dim + 6 · time_dim]`.
pub(crate) fn text_time_input<B: Backend>(
    added: &AddedConditioning<B>,
    batch: usize,
    pooled_dim: usize,
    time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor<B, 2>> {
    let (te, ti) = (added.text_embeds.dims(), added.time_ids.dims());
    if te != [batch, pooled_dim] {
        return Err(model_io::Error::invalid(format!(
            "`text_embeds` has shape {te:?}; expected [{batch}, {pooled_dim}] (the pooled text embedding)"
        )));
    }
    if ti != [batch, 6] {
        return Err(model_io::Error::invalid(format!(
            "`time_ids` has shape {ti:?}; expected [{batch}, 6] (original size, crop top-left, target size)"
        )));
    }
    let ids = added.time_ids.clone().reshape([batch * 6]);
    let time = timestep_embedding(ids, time_dim, flip_sin_to_cos, freq_shift).reshape([batch, 6 * time_dim]);
    Ok(Tensor::cat(vec![added.text_embeds.clone(), time], 1))
}
