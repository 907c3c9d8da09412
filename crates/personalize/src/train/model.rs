//! The trainable model and its optimizer: what a training step is, apart from drawing data.
//!
//! ```
//! use burn_autodiff::Autodiff;
//! use burn_flex::Flex;
//! use personalize::train::{Batch, Optimizer, TrainModel, UnetMode};
//! type AD = Autodiff<Flex>;
//!
//! /// One LoRA training step from fresh adapters.
//! fn step(
//!     aligner: q_aligner::Aligner<AD>,
//!     unet: sd_unet::UNet2DConditionModel<Flex>,
//!     batch: Batch<AD>,
//! ) -> personalize::Result<TrainModel<AD>> {
//!     let model = TrainModel::new(aligner, unet, UnetMode::Lora { rank: 4, alpha: 4.0 }, &mut seeded::SplitMix64::new(0));
//!     let mut opt = Optimizer::new(1e-2, Some(1.0));
//!     let grads = model.loss(batch)?.backward();
//!     let norms = opt.norms(&model, &grads);
//!     Ok(opt.step(model, &grads, &norms, 1e-4, 1e-4))
//! }
//! ```

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use q_aligner::Aligner;
use sd_unet::UNet2DConditionModel;

use super::parts::{adamw_step, grad_sq_norm, set_require_grad};
use super::{AdamW, UnetMode};
use crate::Result;

/// What training changes, as one module: the aligner and the UNet. Its parameter paths
/// (`aligner.fc1.weight`, `unet.down_blocks...`) are the keys of a checkpoint's
/// `trainable.safetensors`.
#[derive(Module, Debug)]
pub struct TrainModel<B: Backend> {
    /// The aligner (always trained).
    pub aligner: Aligner<B>,
    /// The UNet: LoRA adapters, all weights, or nothing trainable, per the mode.
    pub unet: UNet2DConditionModel<B>,
    /// Whether any UNet weight is trained.
    train_unet: bool,
}

/// One training batch on the device.
pub struct Batch<B: Backend> {
    /// BLIP-2 queries `[b, Q, Dq]`; `None` for a prior-preservation (class image) batch, whose
    /// context is the text alone.
    pub queries: Option<Tensor<B, 3>>,
    /// The prompt's CLIP embeddings `[b, 77, d]`.
    pub text: Tensor<B, 3>,
    /// Noisy latents `[b, 4, h, w]` at `timesteps`.
    pub noisy: Tensor<B, 4>,
    /// Training timesteps `[b]`.
    pub timesteps: Tensor<B, 1>,
    /// The regression target `[b, 4, h, w]` (the noise, or the velocity).
    pub target: Tensor<B, 4>,
    /// SDXL's pooled text embeddings and time ids (`None` for SD 1.x/2.x).
    pub added: Option<sd_unet::AddedConditioning<B>>,
}

impl<B: AutodiffBackend> TrainModel<B> {
    /// The model for `mode`: the base UNet's weights frozen except in full fine-tuning, and
    /// with LoRA fresh adapters (their `A` drawn from `init`) in LoRA mode.
    pub fn new(
        aligner: Aligner<B>,
        unet: UNet2DConditionModel<B::InnerBackend>,
        mode: UnetMode,
        init: &mut dyn seeded::Init,
    ) -> Self {
        let mut unet = set_require_grad(UNet2DConditionModel::<B>::from_inner(unet), mode == UnetMode::Full);
        if let UnetMode::Lora { rank, alpha } = mode {
            sd_unet::lora::attach(&mut unet, rank, alpha, init);
        }
        TrainModel { aligner, unet, train_unet: mode != UnetMode::Frozen }
    }
}

impl<B: Backend> TrainModel<B> {
    /// The diffusion L2 loss: the mean squared error between the UNet's prediction for the
    /// noisy latents, with the context `[text][aligner(queries)]`, and the target.
    pub fn loss(&self, batch: Batch<B>) -> Result<Tensor<B, 1>> {
        let context = match batch.queries {
            Some(q) => q_aligner::assemble(batch.text, self.aligner.forward(q)?),
            None => batch.text,
        };
        let pred = self.unet.forward_with(batch.noisy, batch.timesteps, context, batch.added.as_ref())?;
        Ok((pred - batch.target).powi_scalar(2).mean())
    }
}

/// The gradient norms of a step, per part.
#[derive(Debug, Clone, Copy)]
pub struct GradNorms {
    /// The aligner's.
    pub aligner: f64,
    /// The trainable UNet parameters' (0 when frozen).
    pub unet: f64,
}

impl GradNorms {
    /// The norm over all trainable parameters.
    pub fn total(&self) -> f64 {
        (self.aligner * self.aligner + self.unet * self.unet).sqrt()
    }
}

/// AdamW for each part (each with its learning rate) and the gradient clip. The clip is over
/// all trainable parameters together, as torch's `clip_grad_norm_` in diffusers' scripts;
/// Burn's `GradientClipping::Norm` clips each tensor by its own norm, so it is done here.
pub struct Optimizer<B: AutodiffBackend> {
    /// The aligner's moments.
    pub aligner: AdamW<B::InnerBackend>,
    /// The UNet's moments.
    pub unet: AdamW<B::InnerBackend>,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl<B: AutodiffBackend> Optimizer<B> {
    /// Fresh moments, torch's AdamW defaults with `weight_decay`.
    pub fn new(weight_decay: f64, max_grad_norm: Option<f64>) -> Self {
        Optimizer { aligner: AdamW::new(weight_decay), unet: AdamW::new(weight_decay), max_grad_norm }
    }

    /// The gradient norms, each summed on the device and read once.
    pub fn norms(&self, model: &TrainModel<B>, grads: &B::Gradients) -> GradNorms {
        GradNorms {
            aligner: grad_sq_norm::<B, _>(&model.aligner, grads).sqrt(),
            unet: grad_sq_norm::<B, _>(&model.unet, grads).sqrt(),
        }
    }

    /// One AdamW step of both parts, the gradients clipped to `max_grad_norm` by `norms`.
    pub fn step(
        &mut self,
        mut model: TrainModel<B>,
        grads: &B::Gradients,
        norms: &GradNorms,
        lr: f64,
        unet_lr: f64,
    ) -> TrainModel<B> {
        let norm = norms.total();
        let scale = match self.max_grad_norm {
            Some(m) if norm > m => m / (norm + 1e-6),
            _ => 1.0,
        };
        self.aligner.t += 1;
        self.unet.t += 1;
        model.aligner = adamw_step::<B, _>(model.aligner, &mut self.aligner, grads, lr, scale);
        if model.train_unet {
            model.unet = adamw_step::<B, _>(model.unet, &mut self.unet, grads, unet_lr, scale);
        }
        model
    }
}
