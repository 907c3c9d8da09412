//! Fully connected layers: one GEMM with the weight read through its strides.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;
use std::sync::Arc;

use crate::bgemm::{self, BInput, PackedB16};
use crate::flex::{data, from_vec, operand, operand_view, strided_2d, to_flex, to_flex_view, FlexTensor, Kernel};
use crate::sgemm::{gemm, untranspose_rows, BSource, MatRef, PackedB};

/// `x · weight + bias` with `x` `[rows, in]`, `weight` `[in, out]` and `bias` `[out]`.
///
/// `weight` may be a strided view, as the transpose of PyTorch's `[out, in]` is: the GEMM
/// packs it from where it lies, so nothing is copied beforehand.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 2>::random([4, 3], Distribution::Default, &FlexDevice);
/// let w = Tensor::<Flex, 2>::random([5, 3], Distribution::Default, &FlexDevice); // [out, in]
/// let b = Tensor::<Flex, 1>::zeros([5], &FlexDevice);
/// assert_eq!(cpu_kernels::linear(x, w.transpose(), Some(b)).dims(), [4, 5]);
/// ```
///
/// # Panics
/// If `weight`'s first dimension differs from `x`'s second or `bias` from its second
/// (programming errors: loaders check shapes).
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let [rows, d_in] = x.dims();
    let [w_in, d_out] = weight.dims();
    assert!(w_in == d_in, "linear: input {:?}, weight {:?}", x.dims(), weight.dims());
    if let Some(b) = &bias {
        assert_eq!(b.dims(), [d_out], "linear: bias for {d_out} outputs");
    }
    let others: Vec<DType> = std::iter::once(weight.dtype()).chain(bias.as_ref().map(|b| b.dtype())).collect();
    let xf = match to_flex(x, Kernel::Linear, &others) {
        Ok(x) => x,
        Err(x) => {
            let y = x.matmul(weight);
            return match bias {
                Some(b) => y + b.unsqueeze::<2>(),
                None => y,
            };
        }
    };
    let wf = strided(operand_view(weight));
    let (w, w_rs, w_cs) = strided_2d(&wf).expect("strided() made it readable");
    let bias = bias.map(operand);
    let out = if w_rs == 1 && rows < SWAP_ROWS.min(d_out) {
        swapped(data(&xf), w, w_cs, bias.as_ref().map(data), rows, d_in, d_out)
    } else {
        product(
            data(&xf),
            BInput::F32(BSource::Mat(MatRef::new(w.as_ptr(), w_rs, w_cs))),
            bias.as_ref().map(data),
            rows,
            d_in,
            d_out,
        )
    };
    from_vec(out, [rows, d_out])
}

/// A linear layer's weight laid out once in the order the CPU GEMM reads it, for layers that
/// are not trained (a frozen encoder): [`linear_packed`] then neither copies the weight into
/// that order nor transposes anything on each call (1.15–1.45× the speed of [`linear`] on
/// BLIP-2's shapes). It holds as many floats as the weight (rounded up to 16 outputs), so
/// keep it instead of the weight, not beside it. Packed while [`crate::use_bf16_gemm`] is on,
/// it holds the weight rounded to bf16 (half the memory), and every product with it, the
/// Burn-op fallback for other dtypes and backends included, uses those rounded values.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 2>::random([4, 3], Distribution::Default, &FlexDevice);
/// let w = Tensor::<Flex, 2>::random([5, 3], Distribution::Default, &FlexDevice).transpose(); // [in, out]
/// // `None` without the `flex` feature, or for another backend or dtype.
/// if let Some(packed) = cpu_kernels::PackedLinear::new(&w) {
///     let y = cpu_kernels::linear_packed(x.clone(), &packed, None);
///     let want = cpu_kernels::linear(x, w, None);
///     assert!(y.sub(want).abs().max().into_scalar() < 1e-5);
/// }
/// ```
#[derive(Clone)]
pub struct PackedLinear {
    /// The weight `[in, out]` as the GEMM's `B`, all of it packed.
    b: Packed,
}

/// f32, or bf16 when [`crate::use_bf16_gemm`] was on at packing (half the memory).
#[derive(Clone)]
enum Packed {
    F32(Arc<PackedB>),
    Bf16(Arc<PackedB16>),
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, n) = self.dims();
        let t = if matches!(self.b, Packed::Bf16(_)) { "bf16" } else { "f32" };
        write!(f, "PackedLinear {{ in: {k}, out: {n}, {t} }}")
    }
}

impl PackedLinear {
    /// Packs `weight` `[in, out]` (as [`linear`] takes it, in any layout), rounded to bf16 when
    /// [`crate::use_bf16_gemm`] is on. `None` unless the backend is burn-flex, the weight f32
    /// and the linear kernel switched on (`PERSONALIZE_CPU_KERNELS`): keep the weight as it is
    /// then.
    pub fn new<B: Backend>(weight: &Tensor<B, 2>) -> Option<Self> {
        let [d_in, d_out] = weight.dims();
        let wf = strided(to_flex_view(weight.clone(), Kernel::Linear, &[]).ok()?);
        let (w, w_rs, w_cs) = strided_2d(&wf).expect("strided() made it readable");
        let w = MatRef::new(w.as_ptr(), w_rs, w_cs);
        let b = if bgemm::active().is_some() {
            // SAFETY: strided_2d checked that w covers [d_in, d_out]; active() that the CPU
            // has a bf16 kernel.
            Packed::Bf16(Arc::new(unsafe { PackedB16::new(d_in, d_out, w, true) }))
        } else {
            Packed::F32(Arc::new(PackedB::new(d_in, d_out, w, true)))
        };
        Some(Self { b })
    }

    /// `(in, out)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.b {
            Packed::F32(b) => (b.k, b.n),
            Packed::Bf16(b) => (b.k, b.n),
        }
    }

    /// The weight back as `[in, out]` on `device`, for inputs the kernel does not take (any
    /// backend: a module derived from a packed one may carry it elsewhere).
    fn unpack<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let w = match &self.b {
            Packed::F32(b) => b.unpack(),
            Packed::Bf16(b) => b.unpack(),
        };
        let (k, n) = self.dims();
        Tensor::from_data(TensorData::new(w, [k, n]), device)
    }
}

/// [`linear`] against a [`PackedLinear`]: `x` `[rows, in]` times the weight, plus `bias` `[out]`.
///
/// # Panics
/// If `x`'s second dimension differs from the weight's input width or `bias` from its output
/// width (programming errors: loaders check shapes).
pub fn linear_packed<B: Backend>(x: Tensor<B, 2>, weight: &PackedLinear, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let [rows, d_in] = x.dims();
    let (w_in, d_out) = weight.dims();
    assert!(w_in == d_in, "linear: input {:?}, packed weight [{w_in}, {d_out}]", x.dims());
    if let Some(b) = &bias {
        assert_eq!(b.dims(), [d_out], "linear: bias for {d_out} outputs");
    }
    let bias_dtype = bias.as_ref().map(|b| b.dtype());
    let xf = match to_flex(x, Kernel::Linear, bias_dtype.as_slice()) {
        Ok(x) => x,
        Err(x) => {
            let w = weight.unpack::<B>(&x.device()).cast(x.dtype());
            return linear(x, w, bias);
        }
    };
    let bias = bias.map(operand);
    let b = match &weight.b {
        Packed::F32(b) => BInput::F32(BSource::Packed(b)),
        Packed::Bf16(b) => BInput::Bf16(b),
    };
    let out = product(data(&xf), b, bias.as_ref().map(data), rows, d_in, d_out);
    from_vec(out, [rows, d_out])
}

/// A 2-D weight as [`strided_2d`] reads it: as it is, or made contiguous (a flipped view).
fn strided(f: FlexTensor) -> FlexTensor {
    if strided_2d(&f).is_some() {
        f
    } else {
        f.to_contiguous()
    }
}

/// `x · B + bias` with `x` `[rows, d_in]` and `B` `[d_in, d_out]`.
fn product(x: &[f32], b: BInput<'_>, bias: Option<&[f32]>, rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * d_out];
    if let Some(b) = bias {
        out.par_chunks_mut(d_out.max(1)).for_each(|r| r.copy_from_slice(b));
    }
    // SAFETY: x is [rows, d_in] contiguous, b covers [d_in, d_out] (callers' contract), out is
    // [rows, d_out].
    unsafe {
        gemm(rows, d_out, d_in, MatRef::new(x.as_ptr(), d_in, 1), b, out.as_mut_ptr(), d_out, 1.0, bias.is_some(), true)
    };
    out
}

/// Below this many rows the product runs transposed (see [`swapped`]).
const SWAP_ROWS: usize = 1024;

/// `out = x·Wᵀ + bias` computed as `outᵀ = W·xᵀ`, with `W` (PyTorch's `[out, in]`, rows
/// contiguous: `w` with row stride `w_rs`) read in place by the GEMM.
///
/// With few rows each weight is used only a few hundred times, and packing it (a copy of the
/// whole weight on every call) cost about 15 % of a BLIP-2 encode; packing `x` and
/// transposing the small output instead costs a fraction of that.
#[allow(clippy::too_many_arguments)]
fn swapped(
    x: &[f32],
    w: &[f32],
    w_rs: usize,
    bias: Option<&[f32]>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * d_out];
    let mut yt = vec![0f32; d_out * rows];
    // SAFETY: w holds d_out rows of d_in contiguous floats at stride w_rs (strided_2d checked
    // the span); x is [rows, d_in]; yt is [d_out, rows].
    unsafe {
        gemm(
            d_out,
            rows,
            d_in,
            MatRef::in_place(w.as_ptr(), w_rs),
            BInput::F32(BSource::Mat(MatRef::new(x.as_ptr(), 1, d_in))),
            yt.as_mut_ptr(),
            rows,
            1.0,
            false,
            true,
        );
    }
    // Eight output rows at a time, through 8×8 transposes.
    out.par_chunks_mut(8 * d_out).enumerate().for_each(|(blk, o)| {
        untranspose_rows(&yt, rows, d_out, blk * 8, o.len() / d_out, o);
        if let Some(b) = bias {
            for row in o.chunks_exact_mut(d_out) {
                for (v, &b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    /// Against the exact product, [`linear`] and [`linear_packed`] (whose weight must also unpack
    /// to what went in): a transposed view (as model-io holds PyTorch weights), a flipped view
    /// (negative strides: made contiguous first), a contiguous weight, with and without bias,
    /// few rows (the transposed product) and many, shapes off every block size, more outputs
    /// than one column block of the GEMM (4096) and deeper than one depth block (256).
    #[test]
    fn matches_burn_matmul() {
        let dev = FlexDevice;
        for &(rows, d_in, d_out, bias) in &[
            (1, 1, 1, true),
            (5, 7, 3, false),
            (170, 768, 320, true),
            (300, 33, 1000, true),
            (257, 300, 600, false),
            (8, 64, 77, true),
            (1100, 40, 50, true),
            (32, 40, 4200, true),
            (1100, 520, 50, false),
        ] {
            let x = Tensor::<Flex, 2>::random([rows, d_in], Distribution::Default, &dev);
            let w_torch = Tensor::<Flex, 2>::random([d_out, d_in + 2], Distribution::Default, &dev);
            let b = bias.then(|| Tensor::<Flex, 1>::random([d_out], Distribution::Default, &dev));
            let views = [
                w_torch.clone().slice([0..d_out, 1..d_in + 1]).transpose(),
                w_torch.slice([0..d_out, 0..d_in]).transpose().flip([1]),
                Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Default, &dev),
            ];
            let xs: Vec<f32> = x.clone().into_data().to_vec().expect("f32");
            let bs: Option<Vec<f32>> = b.clone().map(|b| b.into_data().to_vec().expect("f32"));
            for w in views {
                // The exact product (f64) and, per output, the sum of |terms|: a rounding-error
                // bound that holds for any summation order (Higham's gamma_n, n = d_in + 1 with
                // the bias), so the check does not depend on the order Burn's matmul uses on
                // this CPU. A wrong index or block gives errors of the size of the output.
                let ws: Vec<f32> = w.clone().into_data().to_vec().expect("f32");
                let (mut exact, mut mag) = (vec![0f64; rows * d_out], vec![0f64; rows * d_out]);
                for r in 0..rows {
                    for o in 0..d_out {
                        let (mut s, mut m) = bs.as_ref().map_or((0.0, 0.0), |b| (b[o] as f64, (b[o] as f64).abs()));
                        for k in 0..d_in {
                            let t = xs[r * d_in + k] as f64 * ws[k * d_out + o] as f64;
                            s += t;
                            m += t.abs();
                        }
                        exact[r * d_out + o] = s;
                        mag[r * d_out + o] = m;
                    }
                }
                let n = (d_in + 1) as f64;
                let u = f32::EPSILON as f64 / 2.0;
                let gamma = n * u / (1.0 - n * u);
                let mut results = vec![("linear", linear(x.clone(), w.clone(), b.clone()))];
                // Packing is the burn-flex kernel's; without the feature every weight stays as is.
                match PackedLinear::new(&w) {
                    Some(packed) => {
                        assert_eq!(packed.dims(), (d_in, d_out));
                        let back: Tensor<Flex, 2> = packed.unpack(&dev);
                        assert_eq!(back.into_data(), w.clone().into_data(), "{d_in}×{d_out} unpacked");
                        results.push(("packed", linear_packed(x.clone(), &packed, b.clone())));
                    }
                    None if cfg!(feature = "flex") => panic!("burn-flex f32 weights pack"),
                    None => {}
                }
                for (how, got) in results {
                    assert_eq!(got.dims(), [rows, d_out]);
                    let got: Vec<f32> = got.into_data().to_vec().expect("f32");
                    let worst = got
                        .iter()
                        .zip(exact.iter().zip(&mag))
                        .map(|(&g, (&e, &m))| (g as f64 - e).abs() / (gamma * m).max(f64::MIN_POSITIVE))
                        .fold(0.0, f64::max);
                    assert!(worst <= 1.0, "{how} {rows}×{d_in}→{d_out}: error {worst:.2}× the rounding bound");
                }
            }
        }
    }

    /// Inputs the kernel does not take (f64; another backend, as a module derived from a
    /// packed one would carry it) go through the unpacked weight.
    #[test]
    #[cfg(feature = "flex")]
    fn packed_takes_other_dtypes_and_backends() {
        let dev = FlexDevice;
        let x = Tensor::<Flex, 2>::random([3, 20], Distribution::Default, &dev);
        let w = Tensor::<Flex, 2>::random([20, 18], Distribution::Default, &dev);
        let packed = PackedLinear::new(&w).expect("burn-flex, f32");
        let want = x.clone().matmul(w);
        let got = linear_packed(x.clone().cast(DType::F64), &packed, None);
        assert_eq!(got.dtype(), DType::F64);
        let e: f32 = (got.cast(DType::F32) - want.clone()).abs().max().into_scalar();
        assert!(e < 1e-5, "max diff {e}");
        type Ad = burn_autodiff::Autodiff<Flex>;
        let xa = Tensor::<Ad, 2>::from_data(x.into_data(), &dev);
        let got = linear_packed(xa, &packed, None);
        let e: f32 = (Tensor::<Flex, 2>::from_data(got.into_data(), &dev) - want).abs().max().into_scalar();
        assert!(e < 1e-5, "autodiff: max diff {e}");
    }
}
