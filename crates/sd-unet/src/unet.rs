//! `UNet2DConditionModel` for Stable Diffusion 1.x and 2.x.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use model_io::{Checkpoint, Error, Result, Weights};
use model_layers::nn::{Conv2d, GroupNorm};

use crate::attention::{Attention, TransformerSpec};
use crate::blocks::{BlockSpec, DownBlock, MidBlock, UpBlock};
use crate::embeddings::{text_time_input, timestep_embedding, AddedConditioning, TimestepEmbedding};
use crate::UNetConfig;

/// The denoising UNet, conditioned on a timestep and a cross-attention context of any length
/// (77 text tokens plus k visual tokens, for this project).
///
/// ```no_run
/// use burn::tensor::Tensor;
/// use burn_flex::{Flex, FlexDevice};
/// let unet = sd_unet::UNet2DConditionModel::<Flex>::load("sd/unet".as_ref(), &FlexDevice)?;
/// let x = Tensor::<Flex, 4>::zeros([2, 4, 64, 64], &FlexDevice);
/// let t = Tensor::<Flex, 1>::from_floats([999.0, 999.0], &FlexDevice);
/// let ctx = Tensor::<Flex, 3>::zeros([2, 85, 768], &FlexDevice); // 77 text + 8 visual tokens
/// let eps = unet.forward(x, t, ctx)?;
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    time_embedding: TimestepEmbedding<B>,
    /// SDXL's `add_embedding` (over the pooled text and the `add_time_proj` sinusoids).
    add_embedding: Option<TimestepEmbedding<B>>,
    /// `addition_time_embed_dim` (0 without `text_time`).
    add_time_dim: usize,
    /// The width of `text_embeds` (0 without `text_time`).
    pooled_dim: usize,
    conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_block: MidBlock<B>,
    pub up_blocks: Vec<UpBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    in_channels: usize,
    time_channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    cross_attention_dim: usize,
    center_input_sample: bool,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model(.fp16).safetensors` (single or
    /// sharded), as the SD repositories publish the `unet/` folder.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg = UNetConfig::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir, &["diffusion_pytorch_model"])?;
        Self::from_checkpoint(&cfg, &ckpt, device)
    }

    /// Builds the model from a checkpoint under diffusers' keys, every tensor used.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let cfg = sd_unet::UNetConfig::load("sd/unet".as_ref())?;
    /// let ckpt = model_io::Checkpoint::open_dir("sd/unet".as_ref(), &["diffusion_pytorch_model"])?;
    /// let unet = sd_unet::UNet2DConditionModel::<Flex>::from_checkpoint(&cfg, &ckpt, &FlexDevice)?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn from_checkpoint(cfg: &UNetConfig, ckpt: &Checkpoint, device: &B::Device) -> Result<Self> {
        let w = Weights::new(ckpt, device);
        let unet = Self::from_weights(cfg, &w)?;
        w.finish(&[])?;
        Ok(unet)
    }

    /// Builds the model from weights at the root of `w`.
    pub fn from_weights(cfg: &UNetConfig, w: &Weights<B>) -> Result<Self> {
        cfg.validate().map_err(Error::invalid)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let spec = |i: usize, cross: bool| BlockSpec {
            temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            transformer: cross.then(|| TransformerSpec {
                channels: ch[i],
                heads: cfg.heads(i),
                layers: cfg.transformer_layers_per_block.get(i),
                context_dim: cfg.cross_attention_dim,
                groups: cfg.norm_num_groups,
                linear_projection: cfg.use_linear_projection,
            }),
        };
        let mut down_blocks = Vec::new();
        let mut c_out = ch[0];
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = ch[i];
            let down = (i + 1 < n).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::load(
                &w.pp("down_blocks").pp(i),
                c_in,
                c_out,
                cfg.layers_per_block,
                down,
                spec(i, t == "CrossAttnDownBlock2D"),
            )?);
        }
        let mid_block = MidBlock::load(&w.pp("mid_block"), ch[n - 1], spec(n - 1, true))?;
        let mut up_blocks = Vec::new();
        let mut c_out = ch[n - 1];
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            let r = n - 1 - i; // the matching down level
            let c_prev = c_out;
            c_out = ch[r];
            let skip_in = ch[r.saturating_sub(1)];
            let s = spec(r, t == "CrossAttnUpBlock2D");
            up_blocks.push(UpBlock::load(
                &w.pp("up_blocks").pp(i),
                c_prev,
                c_out,
                skip_in,
                cfg.layers_per_block + 1,
                i + 1 < n,
                s,
            )?);
        }
        let (add_embedding, add_time_dim, pooled_dim) = match cfg.text_time().map_err(Error::invalid)? {
            Some((time_dim, input_dim)) => (
                Some(TimestepEmbedding::load(&w.pp("add_embedding"), input_dim, temb)?),
                time_dim,
                input_dim - 6 * time_dim,
            ),
            None => (None, 0, 0),
        };
        Ok(Self {
            time_embedding: TimestepEmbedding::load(&w.pp("time_embedding"), ch[0], temb)?,
            add_embedding,
            add_time_dim,
            pooled_dim,
            conv_in: Conv2d::load(
                &w.pp("conv_in"),
                cfg.in_channels,
                ch[0],
                cfg.conv_in_kernel,
                1,
                cfg.conv_in_kernel / 2,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[0], cfg.norm_eps)?,
            conv_out: Conv2d::load(
                &w.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
                1,
                cfg.conv_out_kernel / 2,
            )?,
            in_channels: cfg.in_channels,
            time_channels: ch[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            cross_attention_dim: cfg.cross_attention_dim,
            center_input_sample: cfg.center_input_sample,
        })
    }

    /// Width the cross-attention context must have.
    pub fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Predicts noise (or v, or the sample, per the model) for `sample` `[B, C, H, W]` at
    /// `timestep` `[B]` (or `[1]`, broadcast) given `context` `[B, S, D]` for any `S`.
    pub fn forward(&self, sample: Tensor<B, 4>, timestep: Tensor<B, 1>, context: Tensor<B, 3>) -> Result<Tensor<B, 4>> {
        self.forward_with(sample, timestep, context, None)
    }

    /// [`UNet2DConditionModel::forward`] with SDXL's added conditioning, which a UNet with
    /// `addition_embed_type: "text_time"` needs and any other refuses.
    pub fn forward_with(
        &self,
        sample: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        context: Tensor<B, 3>,
        added: Option<&AddedConditioning<B>>,
    ) -> Result<Tensor<B, 4>> {
        let [b, ..] = sample.dims();
        let nt = timestep.dims()[0];
        if nt != b && nt != 1 {
            return Err(Error::invalid(format!("timestep has {nt} values; expected 1 or the batch size {b}")));
        }
        self.forward_features_with(sample, self.timestep_features(timestep), context, added)
    }

    /// Whether this UNet takes [`AddedConditioning`] (SDXL's `text_time`).
    pub fn needs_added_conditioning(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The width of the pooled `text_embeds` an SDXL UNet takes; `None` for SD 1.x/2.x.
    pub fn pooled_text_dim(&self) -> Option<usize> {
        self.add_embedding.is_some().then_some(self.pooled_dim)
    }

    /// diffusers' sinusoidal timestep features (`get_timestep_embedding` with this model's
    /// `flip_sin_to_cos` and `freq_shift`) of `timesteps` `[N]`: `[N, time_channels]`.
    ///
    /// A sampler computes every step's features at once before its loop and hands row `i` to
    /// [`UNet2DConditionModel::forward_features`], so that the loop sends nothing from the host
    /// to the device.
    pub fn timestep_features(&self, timesteps: Tensor<B, 1>) -> Tensor<B, 2> {
        timestep_embedding(timesteps, self.time_channels, self.flip_sin_to_cos, self.freq_shift)
    }

    /// [`UNet2DConditionModel::forward`] with the timestep given as its features from
    /// [`UNet2DConditionModel::timestep_features`], `[B, time_channels]` or `[1, time_channels]`
    /// (broadcast).
    pub fn forward_features(
        &self,
        sample: Tensor<B, 4>,
        t_features: Tensor<B, 2>,
        context: Tensor<B, 3>,
    ) -> Result<Tensor<B, 4>> {
        self.forward_features_with(sample, t_features, context, None)
    }

    /// [`UNet2DConditionModel::forward_features`] with SDXL's added conditioning (see
    /// [`UNet2DConditionModel::forward_with`]).
    pub fn forward_features_with(
        &self,
        sample: Tensor<B, 4>,
        t_features: Tensor<B, 2>,
        context: Tensor<B, 3>,
        added: Option<&AddedConditioning<B>>,
    ) -> Result<Tensor<B, 4>> {
        let [b, c, h, w] = sample.dims();
        if c != self.in_channels || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "unet input `sample` has shape {:?}; expected [B, {}, H, W]",
                sample.dims(),
                self.in_channels
            )));
        }
        let [cb, s, d] = context.dims();
        if d != self.cross_attention_dim {
            return Err(Error::invalid(format!(
                "encoder_hidden_states has width {d}, but the UNet's cross_attention_dim is {}",
                self.cross_attention_dim
            )));
        }
        if cb != b || s == 0 {
            return Err(Error::invalid(format!(
                "encoder_hidden_states has shape {:?}; expected [{b}, S, {d}] with S > 0",
                context.dims()
            )));
        }
        let t_features = match t_features.dims() {
            [n, f] if f == self.time_channels && n == b => t_features,
            [1, f] if f == self.time_channels => t_features.repeat_dim(0, b),
            dims => {
                return Err(Error::invalid(format!(
                    "timestep features have shape {dims:?}; expected [1 or {b}, {}]",
                    self.time_channels
                )))
            }
        };
        let temb = self.time_embedding.forward(t_features);
        let temb = match (&self.add_embedding, added) {
            (Some(e), Some(a)) => {
                let input =
                    text_time_input(a, b, self.pooled_dim, self.add_time_dim, self.flip_sin_to_cos, self.freq_shift)?;
                temb + e.forward(input)
            }
            (None, None) => temb,
            (Some(_), None) => {
                return Err(Error::invalid(
                    "this UNet (addition_embed_type \"text_time\", SDXL) needs the added conditioning \
                     `text_embeds` and `time_ids`",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "`text_embeds` and `time_ids` were given, but this UNet takes no added conditioning \
                     (only SDXL's, addition_embed_type \"text_time\", does)",
                ))
            }
        };
        let sample = if self.center_input_sample { sample * 2.0 - 1.0 } else { sample };

        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for blk in &self.down_blocks {
            x = blk.forward(x, &temb, &context, &mut skips);
        }
        x = self.mid_block.forward(x, &temb, &context);
        // With sizes not divisible by 2^(levels-1), upsample to the skip's size, as diffusers'
        // `forward_upsample_size` does.
        let factor = 1usize << (self.up_blocks.len() - 1);
        let odd = h % factor != 0 || w % factor != 0;
        let last = self.up_blocks.len() - 1;
        for (i, blk) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len() - blk.num_skips();
            let size = (odd && i < last).then(|| {
                let [_, _, sh, sw] = skips[remaining - 1].dims();
                [sh, sw]
            });
            x = blk.forward(x, &temb, &context, &mut skips, size);
        }
        Ok(self.conv_out.forward(self.conv_norm_out.forward_silu(x)))
    }

    /// Every attention layer with its module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`).
    pub fn attentions(&self) -> Vec<(String, &Attention<B>)> {
        let mut layers = Vec::new();
        let blocks = self
            .down_blocks
            .iter()
            .map(|d| &d.attentions)
            .chain(std::iter::once(&self.mid_block.attentions))
            .chain(self.up_blocks.iter().map(|u| &u.attentions));
        for ts in blocks {
            for t in ts {
                for b in &t.transformer_blocks {
                    layers.push(&b.attn1);
                    layers.push(&b.attn2);
                }
            }
        }
        // The paths come from the key map, in the visit's order, which is the field order
        // walked above.
        let paths = crate::keys::attention_paths(self);
        assert_eq!(paths.len(), layers.len(), "one key-map path per attention layer");
        paths.into_iter().zip(layers).collect()
    }

    /// Mutable access to every attention layer, in the order of [`Self::attentions`].
    pub fn attentions_mut(&mut self) -> Vec<&mut Attention<B>> {
        let mut out = Vec::new();
        let blocks = self
            .down_blocks
            .iter_mut()
            .map(|d| &mut d.attentions)
            .chain(std::iter::once(&mut self.mid_block.attentions))
            .chain(self.up_blocks.iter_mut().map(|u| &mut u.attentions));
        for ts in blocks {
            for t in ts.iter_mut() {
                for b in t.transformer_blocks.iter_mut() {
                    out.push(&mut b.attn1);
                    out.push(&mut b.attn2);
                }
            }
        }
        out
    }
}
