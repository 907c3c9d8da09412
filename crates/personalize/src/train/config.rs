//! What a run trains and how: `TrainConfig`, checked before any work.

#[allow(unused_imports)]
use super::*;

/// Which UNet weights train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnetMode {
    /// Every UNet weight (the concept folder gets `unet/`).
    Full,
    /// LoRA adapters on `to_q`, `to_k`, `to_v`, `to_out.0` of every attention layer; the base
    /// weights stay frozen (the concept folder gets `unet_lora.safetensors`).
    Lora { rank: usize, alpha: f64 },
    /// The UNet is frozen: only the aligner trains.
    Frozen,
}

impl UnetMode {
    /// `full`, `lora` or `frozen` (the `unet` field of `concept.json`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Lora { .. } => "lora",
            Self::Frozen => "frozen",
        }
    }
}

/// Prior preservation (DreamBooth): a second loss on images of the class, conditioned on the
/// class prompt alone (77 text tokens, no visual tokens), so the UNet keeps what it knows of
/// the class.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorConfig {
    pub class_prompt: String,
    /// Weight of the prior loss (DreamBooth's `prior_loss_weight`, 1.0).
    pub weight: f64,
}

/// Training settings. [`Default`] gives settings a user can run as is (LoRA rank 4).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps in total (a resumed run continues up to this).
    pub steps: usize,
    /// AdamW learning rate of the aligner (constant, after `warmup_steps` of linear warm-up).
    pub lr: f64,
    /// Learning rate of the UNet weights or adapters (default: `lr`).
    pub unet_lr: Option<f64>,
    /// Linear warm-up of the learning rate from 0 over this many steps.
    pub warmup_steps: usize,
    /// Images (views) per step.
    pub batch: usize,
    /// Training image side in pixels (a multiple of the VAE factor, 8).
    pub resolution: usize,
    /// Visual tokens `k` appended to the 77 text tokens.
    pub num_queries: usize,
    pub query_selection: QuerySelection,
    /// Hidden width of the aligner (default: the text-embedding width).
    pub aligner_hidden: Option<usize>,
    /// GELU after the aligner's second layer (the method's default).
    pub aligner_final_gelu: bool,
    pub unet_mode: UnetMode,
    pub seed: u64,
    /// Write a checkpoint, the concept folder and a sample image every this many steps (and at
    /// the end). 0: only at the end.
    pub save_every: usize,
    /// The text part of the conditioning.
    pub prompt: String,
    /// Random crops per image besides the centre crop (their latents are cached).
    pub augment: usize,
    /// Smallest random crop, as a fraction of the shorter side.
    pub min_crop: f64,
    /// Mirror random crops with probability 1/2.
    pub flip: bool,
    /// AdamW decoupled weight decay (DreamBooth: 1e-2).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (DreamBooth: 1.0); `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Denoising steps of the sample images written at each save; 0 disables them.
    pub sample_steps: usize,
    /// Guidance scale of the sample images.
    pub sample_guidance: f64,
    pub prior: Option<PriorConfig>,
    /// Complete checkpoints to keep (older ones are deleted once a newer one is written).
    pub keep_checkpoints: usize,
    /// The run's autodiff backend recomputes memory-bound activations in the backward pass
    /// (Burn's `BalancedCheckpointing`, which the caller picks: `--gradient-checkpointing`).
    /// Only sizes the memory check; the gradients are the same, so it is not a setting a
    /// resumed run must repeat.
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 400,
            lr: 1e-4,
            unet_lr: None,
            warmup_steps: 0,
            batch: 1,
            resolution: 512,
            num_queries: 8,
            query_selection: QuerySelection::First,
            aligner_hidden: None,
            aligner_final_gelu: true,
            unet_mode: UnetMode::Lora { rank: 4, alpha: 4.0 },
            seed: 0,
            save_every: 100,
            prompt: "a photo".into(),
            augment: 3,
            min_crop: 0.8,
            flip: false,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            sample_steps: 25,
            sample_guidance: 7.5,
            prior: None,
            keep_checkpoints: 1,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Checks the settings that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad(format!("--resolution {} must be a positive multiple of 8", self.resolution));
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if self.num_queries == 0 {
            return bad("--queries must be at least 1 (the visual prompt's token count)".into());
        }
        if self.aligner_hidden == Some(0) {
            return bad("--aligner-hidden must be at least 1".into());
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return bad(format!("the gradient-norm clip {g} must be a positive number"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        if let Some(l) = self.unet_lr {
            if !(l.is_finite() && l > 0.0) {
                return bad(format!("--unet-lr {l} must be a positive number"));
            }
        }
        if let UnetMode::Lora { rank, alpha } = self.unet_mode {
            if rank == 0 {
                return bad("--lora-rank must be at least 1".into());
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                return bad(format!("--lora-alpha {alpha} must be a positive number"));
            }
        }
        if !(self.min_crop > 0.0 && self.min_crop <= 1.0) {
            return bad(format!("the smallest crop {} must be in (0, 1]", self.min_crop));
        }
        if let Some(p) = &self.prior {
            if !(p.weight.is_finite() && p.weight >= 0.0) {
                return bad(format!("--prior-weight {} must be a non-negative number", p.weight));
            }
        }
        Ok(())
    }

    /// The settings recorded in `concept.json` (`training`) and checked on `--resume`.
    pub fn to_json(&self) -> serde_json::Value {
        let (rank, alpha) = match self.unet_mode {
            UnetMode::Lora { rank, alpha } => (Some(rank), Some(alpha)),
            _ => (None, None),
        };
        serde_json::json!({
            "steps": self.steps, "lr": self.lr, "unet_lr": self.unet_lr.unwrap_or(self.lr), "warmup_steps": self.warmup_steps, "batch": self.batch,
            "resolution": self.resolution, "num_queries": self.num_queries,
            "query_selection": self.query_selection.as_str(), "aligner_hidden": self.aligner_hidden,
            "aligner_final_gelu": self.aligner_final_gelu, "unet": self.unet_mode.name(),
            "lora_rank": rank, "lora_alpha": alpha, "seed": self.seed, "prompt": self.prompt,
            "augment": self.augment, "min_crop": self.min_crop, "flip": self.flip,
            "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
            "class_prompt": self.prior.as_ref().map(|p| p.class_prompt.clone()),
            "prior_weight": self.prior.as_ref().map(|p| p.weight),
            "optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8)",
            "latents": "sampled from the cached VAE latent distribution each step",
        })
    }
}
