//! Fast f32 CPU kernels for the layers that dominate Stable Diffusion and BLIP-2 on the CPU.
//!
//! Each public function takes and returns Burn tensors and works on every backend. When the
//! backend is burn-flex (Burn's CPU backend) and the tensors are f32, it runs a kernel of its
//! own; otherwise (CUDA, autodiff for training, half precision) it runs the same maths with
//! Burn's ops, so callers never branch on the backend.
//!
//! Why kernels of our own: burn-flex 0.21 converts every convolution input to NHWC and its
//! weights to a GEMM layout on every call (single-threaded), runs many small single-threaded
//! GEMMs per convolution, and its attention needs `[B, H, L, D]` inputs (a strided copy each
//! way) and takes its exponentials one scalar libm call at a time. Here:
//!
//! * one GEMM for all of them (`sgemm`, BLIS-style: both operands packed, a 6×16 AVX2+FMA
//!   microkernel and, on AVX-512 CPUs, a 12×16 one ([`gemm_path`] says which runs), blocks
//!   sized for L1/L2/L3, threads over row blocks × column chunks), which
//!   replaced the `gemm` crate's: about 1.3× its speed on 1024³ here, 1.2× on the UNet's
//!   linear shapes.
//! * [`conv2d`]: im2col straight from NCHW into the GEMM's packed layout, one block at a time
//!   (no im2col buffer), against the published `[C_out, C_in, k, k]` weight as it is, writing
//!   NCHW output in place; 1×1 convolutions are a plain GEMM.
//! * [`linear`]: the weight read through its strides (the transposed view of PyTorch's
//!   `[out, in]`), bias added by the GEMM. [`linear_packed`] takes a [`PackedLinear`]: a
//!   frozen layer's weight packed once at load in the GEMM's order (1.15–1.45× on BLIP-2's
//!   layers, which otherwise copy or transpose the whole weight on every call).
//! * bf16 (`bgemm`): where the CPU has AMX-BF16 or AVX512-BF16 ([`bf16_path`]),
//!   [`use_bf16_gemm`] makes the convolutions, linear layers and non-causal attention round
//!   their operands to bf16 while packing and sum in f32 (PyTorch's bf16 matmuls on the CPU);
//!   weights packed ahead of time by [`PackedLinear`] are then kept in bf16, at half the
//!   memory.
//! * [`attention`]: reads queries, keys and values in the `[B, L, heads·D]` layout the
//!   projections produce and writes the output in the same layout (no transposes); keys and
//!   values packed once per (batch, head), then per block of queries one GEMM for the
//!   scores, a vectorised softmax, one GEMM for the values.
//! * [`transpose`] and [`geglu`]: the feature-map ↔ token-sequence transpose and the GEGLU
//!   gate, which Burn expresses as strided views that burn-flex then walks element by element.
//! * [`group_norm`] (and the SiLU after it) and [`layer_norm`]: two passes instead of about
//!   eight; [`gelu`] on a vectorised erf, [`quick_gelu`] on the vectorised exp.
//!
//! The kernels need the `flex` feature (on by default; the model crates' `cpu` features turn it
//! on). Without it the crate depends on no burn-flex and every function runs Burn's ops, for
//! GPU-only builds.
//!
//! `PERSONALIZE_CPU_KERNELS` picks kernels for measuring and checking: `off`, or a comma list
//! of those to use (`conv`, `attention`, `linear`, `layout`, `norm`; `all`, the default).
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use burn_flex::{Flex, FlexDevice};
//! let dev = FlexDevice;
//! let x = Tensor::<Flex, 3>::random([1, 16, 8], Distribution::Default, &dev);
//! let y = cpu_kernels::attention(x.clone(), x.clone(), x, 2);
//! assert_eq!(y.dims(), [1, 16, 8]);
//! ```

// Without burn-flex the kernels' own code is unreachable by construction (see `flex`).
#![cfg_attr(not(feature = "flex"), allow(unreachable_code, unused_variables, dead_code))]

mod attention;
mod bgemm;
mod conv;
mod flex;
mod layout;
mod linear;
mod norm;
mod rows;
mod sgemm;

pub use attention::{attention, causal_attention};
pub use bgemm::{bf16_gemm_on, bf16_path, use_bf16_gemm};
pub use conv::conv2d;
pub use layout::{geglu, gelu, quick_gelu, transpose};
pub use linear::{linear, linear_packed, PackedLinear};
pub use norm::{group_norm, layer_norm};
pub use sgemm::gemm_path;
