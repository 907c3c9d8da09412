//! Fully connected layers: one GEMM with the weight read through its strides.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::flex::{data, from_vec, operand, operand_view, strided_2d, to_flex, Kernel};
use crate::sgemm::{sgemm, untranspose_rows, BSource, MatRef};

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
    let mut wf = operand_view(weight);
    if strided_2d(&wf).is_none() {
        wf = wf.to_contiguous();
    }
    let (w, w_rs, w_cs) = strided_2d(&wf).expect("a contiguous 2-D tensor has a strided form");
    let bias = bias.map(operand);
    let mut out = vec![0f32; rows * d_out];
    if w_rs == 1 && rows < SWAP_ROWS.min(d_out) {
        swapped(data(&xf), w, w_cs, bias.as_ref().map(data), &mut out, rows, d_in, d_out);
        return from_vec(out, [rows, d_out]);
    }
    if let Some(b) = &bias {
        out.par_chunks_mut(d_out.max(1)).for_each(|r| r.copy_from_slice(data(b)));
    }
    // SAFETY: x is [rows, d_in] contiguous, w covers [d_in, d_out] through its strides
    // (strided_2d checked the span), out is [rows, d_out].
    unsafe {
        sgemm(
            rows,
            d_out,
            d_in,
            MatRef::new(data(&xf).as_ptr(), d_in, 1),
            BSource::Mat(MatRef::new(w.as_ptr(), w_rs, w_cs)),
            out.as_mut_ptr(),
            d_out,
            1.0,
            bias.is_some(),
            true,
        );
    }
    from_vec(out, [rows, d_out])
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
fn swapped(x: &[f32], w: &[f32], w_rs: usize, bias: Option<&[f32]>, out: &mut [f32], rows: usize, d_in: usize, d_out: usize) {
    let mut yt = vec![0f32; d_out * rows];
    // SAFETY: w holds d_out rows of d_in contiguous floats at stride w_rs (strided_2d checked
    // the span); x is [rows, d_in]; yt is [d_out, rows].
    unsafe {
        sgemm(
            d_out,
            rows,
            d_in,
            MatRef::in_place(w.as_ptr(), w_rs),
            BSource::Mat(MatRef::new(x.as_ptr(), 1, d_in)),
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
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    /// Against Burn's matmul: a transposed view (as model-io holds PyTorch weights), a
    /// flipped view (negative strides: made contiguous first), a contiguous weight, with and
    /// without bias, shapes off every block size.
    #[test]
    fn matches_burn_matmul() {
        let dev = FlexDevice;
        // Few rows (the transposed product) and many, with and without bias.
        for &(rows, d_in, d_out, bias) in
            &[(1, 1, 1, true), (5, 7, 3, false), (170, 768, 320, true), (300, 33, 1000, true), (257, 300, 600, false), (8, 64, 77, true), (1100, 40, 50, true)]
        {
            let x = Tensor::<Flex, 2>::random([rows, d_in], Distribution::Default, &dev);
            let w_torch = Tensor::<Flex, 2>::random([d_out, d_in + 2], Distribution::Default, &dev);
            let b = bias.then(|| Tensor::<Flex, 1>::random([d_out], Distribution::Default, &dev));
            let views = [
                w_torch.clone().slice([0..d_out, 1..d_in + 1]).transpose(),
                w_torch.slice([0..d_out, 0..d_in]).transpose().flip([1]),
                Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Default, &dev),
            ];
            for w in views {
                let want = x.clone().matmul(w.clone());
                let want = match &b {
                    Some(b) => want + b.clone().unsqueeze::<2>(),
                    None => want,
                };
                let got = linear(x.clone(), w, b.clone());
                assert_eq!(got.dims(), [rows, d_out]);
                // Relative to the largest output: f32 sums of d_in terms in another order.
                let scale: f32 = want.clone().abs().max().into_scalar();
                let e: f32 = (got - want).abs().max().into_scalar() / scale.max(1e-30);
                assert!(e < 2e-6, "{rows}×{d_in}→{d_out}: max relative diff {e}");
            }
        }
    }
}
