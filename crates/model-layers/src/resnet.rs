//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.

use crate::nn::{Conv2d, GroupNorm, Linear};
use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Result, Weights};

/// `ResnetBlock2D` with the default time-embedding mode (added after `conv1`).
///
/// ```no_run
/// # fn f(w: &model_io::Weights<burn_flex::Flex>) -> model_io::Result<()> {
/// // A VAE block: no time embedding, 32 groups, eps 1e-6.
/// let block = model_layers::resnet::ResnetBlock2D::load(&w.pp("resnets.0"), 128, 256, None, 32, 1e-6)?;
/// # Ok(()) }
/// ```
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Option<Linear<B>>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// Reads the block under `w`; `temb` is the time-embedding width when the block takes one.
    pub fn load(
        w: &Weights<B>,
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, c_in, eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: temb.map(|t| Linear::load(&w.pp("time_emb_proj"), t, c_out, true)).transpose()?,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, c_out, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out || w.contains("conv_shortcut.weight") {
                Some(Conv2d::load(&w.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `x` `[N, C_in, H, W]`, `temb` `[N, T]` when the block takes a time embedding.
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let h = match (&self.time_emb_proj, temb) {
            (Some(p), Some(t)) => {
                let t = p.forward(silu(t.clone()));
                let [n, c] = t.dims();
                h + t.reshape([n, c, 1, 1])
            }
            _ => h,
        };
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        skip + h
    }
}

/// `Downsample2D` with a convolution. With `padding = 0` (the VAE) the input is first padded
/// on the right and bottom, as diffusers does.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    conv: Conv2d<B>,
    pad_right_bottom: bool,
}

impl<B: Backend> Downsample2D<B> {
    /// Reads `conv` under `w` (the `downsamplers.0` prefix).
    pub fn load(w: &Weights<B>, channels: usize, c_out: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(&w.pp("conv"), channels, c_out, 3, 2, padding)?, pad_right_bottom: padding == 0 })
    }

    /// Halves the spatial size.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.pad_right_bottom { x.pad((0, 1, 0, 1), burn::tensor::ops::PadMode::Constant(0.0)) } else { x };
        self.conv.forward(x)
    }
}

/// `Upsample2D`: nearest-neighbour resize, then a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    /// Reads `conv` under `w` (the `upsamplers.0` prefix).
    pub fn load(w: &Weights<B>, channels: usize, c_out: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(&w.pp("conv"), channels, c_out, 3, 1, 1)? })
    }

    /// Resizes to `size` (twice the input when `None`), then convolves.
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        let x = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        self.conv.forward(x)
    }
}
