//! `AutoencoderKL`: encoder to a diagonal Gaussian over latents, decoder back to pixels.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Checkpoint, Error, Result, Weights};
use model_layers::nn::{Conv2d, GroupNorm};

use crate::attention::SpatialSelfAttention;
use crate::AutoencoderKlConfig;
use model_layers::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

const EPS: f64 = 1e-6;

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Module, Debug)]
struct MidBlock<B: Backend> {
    resnet0: ResnetBlock2D<B>,
    attention: Option<SpatialSelfAttention<B>>,
    resnet1: ResnetBlock2D<B>,
}

impl<B: Backend> MidBlock<B> {
    fn load(w: &Weights<B>, c: usize, groups: usize, attn: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock2D::load(&w.pp("resnets.0"), c, c, None, groups, EPS)?,
            attention: if attn {
                Some(SpatialSelfAttention::load(&w.pp("attentions.0"), c, c, groups, EPS)?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::load(&w.pp("resnets.1"), c, c, None, groups, EPS)?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnet0.forward(x, None);
        let x = match &self.attention {
            Some(a) => a.forward(x),
            None => x,
        };
        self.resnet1.forward(x, None)
    }
}

#[derive(Module, Debug)]
struct CoderBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    down: Option<Downsample2D<B>>,
    up: Option<Upsample2D<B>>,
}

impl<B: Backend> CoderBlock<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        if let Some(d) = &self.down {
            x = d.forward(x);
        }
        if let Some(u) = &self.up {
            x = u.forward(x, None);
        }
        x
    }
}

/// The VAE encoder (with `quant_conv`).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    conv_in: Conv2d<B>,
    down_blocks: Vec<CoderBlock<B>>,
    mid_block: MidBlock<B>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    quant_conv: Option<Conv2d<B>>,
}

/// The VAE decoder (with `post_quant_conv`).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    post_quant_conv: Option<Conv2d<B>>,
    conv_in: Conv2d<B>,
    mid_block: MidBlock<B>,
    up_blocks: Vec<CoderBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

/// diffusers' `AutoencoderKL`, as Stable Diffusion uses it.
///
/// ```no_run
/// use burn_flex::{Flex, FlexDevice};
/// use burn::tensor::Tensor;
/// let vae = sd_vae::AutoencoderKl::<Flex>::load("sd/vae".as_ref(), &FlexDevice)?;
/// let image = Tensor::<Flex, 4>::zeros([1, 3, 512, 512], &FlexDevice); // in [-1, 1]
/// let (mean, _logvar) = vae.encode(image)?;
/// let pixels = vae.decode(mean)?; // unscaled latents in, [-1, 1] pixels out
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct AutoencoderKl<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    in_channels: usize,
    latent_channels: usize,
    factor: usize,
}

impl<B: Backend> AutoencoderKl<B> {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model(.fp16).safetensors`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg = AutoencoderKlConfig::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir, &["diffusion_pytorch_model"])?;
        let w = Weights::new(&ckpt, device);
        let vae = Self::from_weights(&cfg, &w)?;
        w.finish(&[])?;
        Ok(vae)
    }

    /// Builds the model from weights at the root of `w`.
    pub fn from_weights(cfg: &AutoencoderKlConfig, w: &Weights<B>) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let lat = cfg.latent_channels;
        let e = w.pp("encoder");
        let mut down_blocks = Vec::new();
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            let bw = e.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(&bw.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, None, g, EPS)
                })
                .collect::<Result<Vec<_>>>()?;
            let down =
                if i + 1 < n { Some(Downsample2D::load(&bw.pp("downsamplers.0"), c_out, c_out, 0)?) } else { None };
            down_blocks.push(CoderBlock { resnets, down, up: None });
        }
        let last = ch[n - 1];
        let encoder = Encoder {
            conv_in: Conv2d::load(&e.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::load(&e.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&e.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::load(&e.pp("conv_out"), last, 2 * lat, 3, 1, 1)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::load(&w.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?)
            } else {
                None
            },
        };
        let d = w.pp("decoder");
        let mut up_blocks = Vec::new();
        let mut c_out = last;
        for (i, &c) in ch.iter().rev().enumerate() {
            let c_prev = c_out;
            c_out = c;
            let bw = d.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::load(
                        &bw.pp("resnets").pp(j),
                        if j == 0 { c_prev } else { c_out },
                        c_out,
                        None,
                        g,
                        EPS,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n { Some(Upsample2D::load(&bw.pp("upsamplers.0"), c_out, c_out)?) } else { None };
            up_blocks.push(CoderBlock { resnets, down: None, up });
        }
        let decoder = Decoder {
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::load(&w.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
            } else {
                None
            },
            conv_in: Conv2d::load(&d.pp("conv_in"), lat, last, 3, 1, 1)?,
            mid_block: MidBlock::load(&d.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&d.pp("conv_norm_out"), g, ch[0], EPS)?,
            conv_out: Conv2d::load(&d.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        };
        Ok(Self {
            encoder,
            decoder,
            in_channels: cfg.in_channels,
            latent_channels: lat,
            factor: cfg.downscale_factor(),
        })
    }

    /// Pixels per latent along each side (8 for Stable Diffusion).
    pub fn downscale_factor(&self) -> usize {
        self.factor
    }

    /// Latent channels (4 for Stable Diffusion).
    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    /// Images `[N, C, H, W]` in `[-1, 1]` to the latent distribution `(mean, logvar)`, each
    /// `[N, 4, H/8, W/8]`; `logvar` is clamped to `[-30, 20]` as diffusers does.
    pub fn encode(&self, x: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let [_, c, h, w] = x.dims();
        if c != self.in_channels || h % self.factor != 0 || w % self.factor != 0 || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "vae-encode input `sample` has shape {:?}; expected [N, {}, H, W] with H and W positive multiples of {}",
                x.dims(),
                self.in_channels,
                self.factor
            )));
        }
        let e = &self.encoder;
        let mut x = e.conv_in.forward(x);
        for b in &e.down_blocks {
            x = b.forward(x);
        }
        let x = e.mid_block.forward(x);
        let x = e.conv_out.forward(e.conv_norm_out.forward_silu(x));
        let x = match &e.quant_conv {
            Some(q) => q.forward(x),
            None => x,
        };
        let mut parts = x.chunk(2, 1);
        let logvar = parts.pop().expect("two chunks").clamp(-30.0, 20.0);
        let mean = parts.pop().expect("two chunks");
        Ok((mean, logvar))
    }

    /// Unscaled latents `[N, 4, h, w]` to images `[N, C, 8h, 8w]` (about `[-1, 1]`).
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let [_, c, h, w] = z.dims();
        if c != self.latent_channels || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "vae-decode input `latent` has shape {:?}; expected [N, {}, h, w]",
                z.dims(),
                self.latent_channels
            )));
        }
        let d = &self.decoder;
        let z = match &d.post_quant_conv {
            Some(p) => p.forward(z),
            None => z,
        };
        let mut x = d.mid_block.forward(d.conv_in.forward(z));
        for b in &d.up_blocks {
            x = b.forward(x);
        }
        Ok(d.conv_out.forward(d.conv_norm_out.forward_silu(x)))
    }
}
