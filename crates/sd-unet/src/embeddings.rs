//! Sinusoidal timestep embedding and the `TimestepEmbedding` MLP.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use model_io::{Result, Weights};
use model_layers::nn::Linear;

/// diffusers' `get_timestep_embedding`: `[N]` timesteps to `[N, dim]` sinusoids.
/// Frequencies are computed in f32 as torch does, so the result matches bit for bit up to the
/// sin/cos implementations. The sinusoids are computed in f32 whatever the device's default
/// float type, then cast to it, as diffusers casts `t_emb` to the sample's dtype: in bf16 or
/// f16 the phases `t · f` of timesteps near 1000 (or SDXL's 1024-pixel time ids) would be off
/// by whole turns. Pass the timesteps in f32 ([`f32_tensor`]): 999 is 1000 in bf16.
pub fn timestep_embedding<B: Backend>(t: Tensor<B, 1>, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Tensor<B, 2> {
    let device = t.device();
    let out = burn::tensor::get_device_settings::<B>(&device).float_dtype;
    let f32_ = burn::tensor::DType::F32;
    let half = dim / 2;
    let log_max = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_max * i as f32) / denom).exp()).collect();
    let n = t.dims()[0];
    let t = if t.dtype() == f32_ { t } else { t.cast(burn::tensor::FloatDType::F32) };
    let f = Tensor::<B, 2>::from_data(TensorData::new(freqs, [1, half]), (&device, f32_));
    let args = t.reshape([n, 1]) * f;
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(vec![cos, sin], 1) } else { Tensor::cat(vec![sin, cos], 1) };
    let emb = if dim % 2 == 1 {
        let z = Tensor::zeros([n, 1], (&device, f32_));
        Tensor::cat(vec![emb, z], 1)
    } else {
        emb
    };
    if out == burn::tensor::FloatDType::F32 {
        emb
    } else {
        emb.cast(out)
    }
}

/// `values` as an f32 tensor of `shape` whatever the device's default float type: timesteps
/// and SDXL's time ids, which [`timestep_embedding`] turns into sinusoids in f32.
///
/// ```
/// use burn_flex::{Flex, FlexDevice};
/// let t = sd_unet::f32_tensor::<Flex, 1>(vec![999.0, 749.0], [2], &FlexDevice);
/// assert_eq!(t.dtype(), burn::tensor::DType::F32);
/// ```
pub fn f32_tensor<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), (device, burn::tensor::DType::F32))
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
