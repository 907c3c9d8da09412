//! LoRA adapters on the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`).

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use model_layers::nn::Linear;

/// A low-rank update `scale · B(A(x))` with `A` `[in → r]` and `B` `[r → out]`.
///
/// `B` starts at zero, so a freshly attached adapter leaves the model's output unchanged
/// until it is trained (as PEFT and diffusers initialise LoRA).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `lora_A`: `[in, r]` (transposed PyTorch layout, as [`Linear`]).
    pub down: Linear<B>,
    /// `lora_B`: `[r, out]`.
    pub up: Linear<B>,
    /// `alpha / rank`.
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// A new adapter: `A` Kaiming-uniform like PEFT (`a = sqrt(5)`), drawn from `init` in
    /// the `[in, r]` layout; `B` zero.
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        init: &mut dyn seeded::Init,
        device: &B::Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::<B, 2>::from_data(TensorData::new(init.uniform(d_in * rank, bound), [d_in, rank]), device);
        let b = Tensor::<B, 2>::zeros([rank, d_out], device);
        Self { down: Linear::new(a, None), up: Linear::new(b, None), scale: alpha / rank as f64 }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.dims().1
    }

    /// The update for `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.up.forward(self.down.forward(x)) * self.scale
    }
}

/// A linear layer that may carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub base: Linear<B>,
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> LoraLinear<B> {
    /// Wraps a plain layer, without adapter.
    pub fn new(base: Linear<B>) -> Self {
        Self { base, lora: None }
    }

    /// Attaches a fresh zero-initialised adapter of `rank` and `alpha`.
    pub fn attach(&mut self, rank: usize, alpha: f64, init: &mut dyn seeded::Init) {
        let (i, o) = self.base.dims();
        let device = self.base.weight.device();
        self.lora = Some(Lora::new(i, o, rank, alpha, init, &device));
    }

    /// `base(x) + lora(x)`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            Some(l) => self.base.forward(x.clone()) + l.forward(x),
            None => self.base.forward(x),
        }
    }
}

pub use crate::lora_io::{
    attach, kohya_name, load_lora, load_lora_scaled, lora_tensors, peft_to_kohya, peft_to_kohya_for, PeftLoraConfig,
    LORA_ADAPTER_METADATA_KEY,
};
