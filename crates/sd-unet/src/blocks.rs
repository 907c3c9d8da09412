//! The UNet's down, middle and up blocks (`CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`).

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Result, Weights};
use model_layers::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

use crate::attention::{Transformer2D, TransformerSpec};

/// A down block: resnets, each optionally followed by a transformer, then a downsampler.
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2D<B>>,
    downsampler: Option<Downsample2D<B>>,
}

/// Shared block parameters.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    /// `Some` for the cross-attention variants.
    pub transformer: Option<TransformerSpec>,
}

impl<B: Backend> DownBlock<B> {
    /// Reads `down_blocks.i`.
    pub fn load(
        w: &Weights<B>,
        c_in: usize,
        c_out: usize,
        layers: usize,
        downsample: Option<usize>,
        s: BlockSpec,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..layers {
            let ci = if j == 0 { c_in } else { c_out };
            resnets.push(ResnetBlock2D::load(&w.pp("resnets").pp(j), ci, c_out, Some(s.temb), s.groups, s.eps)?);
            if let Some(t) = s.transformer {
                attentions
                    .push(Transformer2D::load(&w.pp("attentions").pp(j), TransformerSpec { channels: c_out, ..t })?);
            }
        }
        let downsampler =
            downsample.map(|pad| Downsample2D::load(&w.pp(crate::keys::DOWNSAMPLER), c_out, c_out, pad)).transpose()?;
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and appends each intermediate state to `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        ctx: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (j, r) in self.resnets.iter().enumerate() {
            x = r.forward(x, Some(temb));
            if let Some(a) = self.attentions.get(j) {
                x = a.forward(x, ctx);
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2D<B>>,
}

impl<B: Backend> MidBlock<B> {
    /// Reads `mid_block`.
    pub fn load(w: &Weights<B>, c: usize, s: BlockSpec) -> Result<Self> {
        let t = s.transformer.expect("the SD mid block has cross-attention");
        Ok(Self {
            resnets: (0..2)
                .map(|j| ResnetBlock2D::load(&w.pp("resnets").pp(j), c, c, Some(s.temb), s.groups, s.eps))
                .collect::<Result<_>>()?,
            attentions: vec![Transformer2D::load(&w.pp("attentions.0"), TransformerSpec { channels: c, ..t })?],
        })
    }

    /// Runs the block.
    pub fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>, ctx: &Tensor<B, 3>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = r.forward(a.forward(x, ctx), Some(temb));
        }
        x
    }
}

/// An up block: resnets over the concatenated skip connections, optional transformers, then
/// an upsampler.
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2D<B>>,
    upsampler: Option<Upsample2D<B>>,
}

impl<B: Backend> UpBlock<B> {
    /// Reads `up_blocks.i`. `skip_in` is the channel count of the skip consumed last.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights<B>,
        c_prev: usize,
        c_out: usize,
        skip_in: usize,
        layers: usize,
        upsample: bool,
        s: BlockSpec,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j == layers - 1 { skip_in } else { c_out };
            let ci = if j == 0 { c_prev } else { c_out };
            resnets.push(ResnetBlock2D::load(&w.pp("resnets").pp(j), ci + skip, c_out, Some(s.temb), s.groups, s.eps)?);
            if let Some(t) = s.transformer {
                attentions
                    .push(Transformer2D::load(&w.pp("attentions").pp(j), TransformerSpec { channels: c_out, ..t })?);
            }
        }
        let upsampler =
            if upsample { Some(Upsample2D::load(&w.pp(crate::keys::UPSAMPLER), c_out, c_out)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Number of skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skips from the end of `skips`; `size` is the upsampled size when it is not
    /// simply twice the input (odd latent sizes).
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        ctx: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
        size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        for (j, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the down path leaves one skip per up resnet");
            x = r.forward(Tensor::cat(vec![x, skip], 1), Some(temb));
            if let Some(a) = self.attentions.get(j) {
                x = a.forward(x, ctx);
            }
        }
        match &self.upsampler {
            Some(u) => u.forward(x, size),
            None => x,
        }
    }
}
