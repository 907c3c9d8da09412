//! Small layers built directly from checkpoint tensors, in PyTorch's conventions.
//!
//! They derive Burn's [`Module`], so they can be trained, mapped to other devices and saved
//! (all but a linear layer after [`Linear::pack`], which is for frozen models);
//! weights are kept in the layout the forward pass wants (a linear weight is stored
//! transposed, `[in, out]`, once at load time).

use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{backend::Backend, Int, Tensor};

use model_io::{Result, Weights};

/// `torch.nn.Linear`: `y = x Wᵀ + b`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[in, out]` (the transpose of PyTorch's `[out, in]`); empty (`[in, 0]`) once
    /// [`Linear::pack`] has moved it into the CPU GEMM's order.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The weight in the CPU GEMM's order, for a layer that is never trained.
    #[module(skip)]
    packed: Option<cpu_kernels::PackedLinear>,
}

impl<B: Backend> Linear<B> {
    /// A layer from a weight `[in, out]` and a bias `[out]`.
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use burn_flex::{Flex, FlexDevice};
    /// let l = model_layers::nn::Linear::<Flex>::new(Tensor::ones([3, 2], &FlexDevice), None);
    /// assert_eq!(l.dims(), (3, 2));
    /// ```
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self { weight: Param::from_tensor(weight), bias: bias.map(Param::from_tensor), packed: None }
    }

    /// Reads `weight` `[out, in]` (and `bias` `[out]` if `bias`) under `w`.
    ///
    /// ```no_run
    /// # fn f(w: &model_io::Weights<burn_flex::Flex>) -> model_io::Result<()> {
    /// let to_q = model_layers::nn::Linear::load(&w.pp("to_q"), 320, 320, false)?;
    /// # Ok(()) }
    /// ```
    ///
    /// Under [`Weights::frozen`] (a model that is never trained), the weight is packed at once
    /// ([`Linear::pack`]) and its pages in the checkpoint's memory map released, so the process
    /// holds one copy of it. It is read through the map even though a frozen view copies
    /// (packing copies it anyway: a copy first would cost a pass and the page faults of a
    /// second buffer).
    pub fn load(w: &Weights<B>, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        Self::load_with_bias(w, d_in, d_out, || if bias { Ok(Some(w.get::<1>("bias", [d_out])?)) } else { Ok(None) })
    }

    /// [`Linear::load`] with the bias made by `bias` (read after the weight) rather than read
    /// as `bias`: a fused projection's bias put together from parts, as EVA's
    /// `q_bias`/`v_bias`.
    pub fn load_with_bias(
        w: &Weights<B>,
        d_in: usize,
        d_out: usize,
        bias: impl FnOnce() -> Result<Option<Tensor<B, 1>>>,
    ) -> Result<Self> {
        let source = if w.is_frozen() { w.mapped() } else { w.clone() };
        let weight = source.get::<2>("weight", [d_out, d_in])?.transpose();
        let mut layer = Self::new(weight, bias()?);
        if w.is_frozen() && layer.pack() {
            w.release("weight");
        }
        Ok(layer)
    }

    /// Builds a layer from a PyTorch-layout weight `[out, in]`.
    pub fn from_torch(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::new(weight.transpose(), bias)
    }

    /// Lays the weight out once in the order the CPU GEMM reads it ([`cpu_kernels::PackedLinear`]:
    /// 1.15–1.45× faster on BLIP-2's layers, which otherwise copy or transpose every weight on
    /// every call) and empties `weight`. Returns whether it packed: only on burn-flex in f32
    /// (with the linear kernel on); elsewhere the layer stays as it is.
    ///
    /// Only for layers that are never trained, saved or moved afterwards: the packed weight is
    /// not a parameter, so it gets no gradients, is not in the record (`weight` saves as
    /// `[in, 0]`, and a loaded record or a new `weight` does not replace the packed one), is
    /// not counted by `num_params`, and stays on the CPU.
    pub fn pack(&mut self) -> bool {
        if self.packed.is_some() {
            return true;
        }
        let Some(packed) = cpu_kernels::PackedLinear::new(&self.weight.val()) else { return false };
        let (d_in, _) = packed.dims();
        self.weight = Param::from_tensor(Tensor::zeros([d_in, 0], &self.weight.device()));
        self.packed = Some(packed);
        true
    }

    /// Applies the layer on the last dimension.
    ///
    /// The leading dimensions are folded into rows for one GEMM ([`cpu_kernels::linear`] on
    /// the CPU, a 2-D matmul elsewhere): the weight stays the transposed view of the published
    /// `[out, in]` tensor, read through its strides. (Burn's `linear` unsqueezes the weight to
    /// the input's rank, and on burn-flex reshaping a strided view copies it: every linear
    /// weight was copied on every call.)
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let (d_in, d_out) = self.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let (x, bias) = (x.reshape([rows, d_in]), self.bias.as_ref().map(|b| b.val()));
        let y = match &self.packed {
            Some(p) => cpu_kernels::linear_packed(x, p, bias),
            None => cpu_kernels::linear(x, self.weight.val(), bias),
        };
        dims[D - 1] = d_out;
        y.reshape(dims)
    }

    /// `(in, out)`.
    pub fn dims(&self) -> (usize, usize) {
        if let Some(p) = &self.packed {
            return p.dims();
        }
        let [i, o] = self.weight.dims();
        (i, o)
    }
}

/// `torch.nn.Conv2d` with square kernels, symmetric padding, no dilation or groups.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    /// Reads `weight` `[out, in, k, k]` and `bias` `[out]` under `w`.
    pub fn load(w: &Weights<B>, c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        let weight = Param::from_tensor(w.get::<4>("weight", [c_out, c_in, k, k])?);
        let bias = Some(Param::from_tensor(w.get::<1>("bias", [c_out])?));
        Ok(Self { weight, bias, stride, padding })
    }

    /// Applies the convolution to `[N, C, H, W]` (on the CPU in f32 as im2col + GEMM, see
    /// [`cpu_kernels::conv2d`]).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        cpu_kernels::conv2d(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()), self.stride, self.padding)
    }
}

/// `torch.nn.GroupNorm` (affine) over `[N, C, ...]`.
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub groups: usize,
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// Reads `weight` and `bias` `[channels]` under `w`.
    pub fn load(w: &Weights<B>, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(model_io::Error::invalid(format!(
                "{}: {channels} channels cannot be split into {groups} norm groups",
                w.key("weight")
            )));
        }
        Ok(Self {
            weight: Param::from_tensor(w.get::<1>("weight", [channels])?),
            bias: Param::from_tensor(w.get::<1>("bias", [channels])?),
            groups,
            eps,
        })
    }

    /// Normalises `[N, C, H, W]` ([`cpu_kernels::group_norm`]: two passes on the CPU).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.apply(x, false)
    }

    /// `silu(self.forward(x))`, fused on the CPU (the resnet blocks' pre-activation).
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.apply(x, true)
    }

    fn apply(&self, x: Tensor<B, 4>, silu: bool) -> Tensor<B, 4> {
        let [n, c, h, wd] = x.dims();
        let y = cpu_kernels::group_norm(
            x.reshape([n, c, h * wd]),
            self.weight.val(),
            self.bias.val(),
            self.groups,
            self.eps,
            silu,
        );
        y.reshape([n, c, h, wd])
    }

    /// Normalises `[N, C, L]` (channels first, as in a 1-D sequence).
    pub fn forward3(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, c, l] = x.dims();
        self.forward(x.reshape([n, c, l, 1])).reshape([n, c, l])
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Reads `weight` and `bias` `[dim]` under `w`.
    pub fn load(w: &Weights<B>, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(w.get::<1>("weight", [dim])?),
            bias: Some(Param::from_tensor(w.get::<1>("bias", [dim])?)),
            eps,
        })
    }

    /// Normalises the last dimension ([`cpu_kernels::layer_norm`]: two passes on the CPU).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        cpu_kernels::layer_norm(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()), self.eps)
    }
}

/// `torch.nn.Embedding`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[num, dim]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    /// Reads `weight` `[num, dim]` under `w`. A large table (1 MiB or more, as the token
    /// embedding) is read through the memory map even from a copying view: a lookup touches a
    /// few rows of it. A small one (positions) is read as the view reads.
    pub fn load(w: &Weights<B>, num: usize, dim: usize) -> Result<Self> {
        let source = if num * dim * 4 >= 1 << 20 { w.mapped() } else { w.clone() };
        Ok(Self { weight: Param::from_tensor(source.get::<2>("weight", [num, dim])?) })
    }

    /// Looks up `[B, L]` ids, giving `[B, L, dim]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embedding(self.weight.val(), ids)
    }
}
