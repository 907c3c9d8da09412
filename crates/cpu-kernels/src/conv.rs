//! 2-D convolution as GEMM, straight from and into NCHW.

use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::flex::{data, from_vec, operand, to_flex, Kernel, SharedMut};

/// `torch.nn.functional.conv2d` with a square kernel, equal stride and padding on both axes,
/// no dilation and no groups: `x` `[N, C_in, H, W]`, `weight` `[C_out, C_in, k, k]`,
/// `bias` `[C_out]`.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 4>::random([1, 3, 8, 8], Distribution::Default, &FlexDevice);
/// let w = Tensor::<Flex, 4>::random([5, 3, 3, 3], Distribution::Default, &FlexDevice);
/// assert_eq!(cpu_kernels::conv2d(x, w, None, 2, 1).dims(), [1, 5, 4, 4]);
/// ```
///
/// # Panics
/// If `weight`'s input channels differ from `x`'s, the kernel is not square, the stride is 0
/// or the kernel does not fit the padded input (programming errors: loaders check shapes).
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    let [n, cin, h, w] = x.dims();
    let [cout, wcin, kh, kw] = weight.dims();
    assert!(cin == wcin && kh == kw && stride > 0, "conv2d: input {:?}, weight {:?}, stride {stride}", x.dims(), weight.dims());
    assert!(h + 2 * padding >= kh && w + 2 * padding >= kw, "conv2d: kernel {kh} larger than padded input {h}×{w}");
    let others: Vec<DType> = std::iter::once(weight.dtype()).chain(bias.as_ref().map(|b| b.dtype())).collect();
    let x = match to_flex(x, Kernel::Conv, &others) {
        Ok(x) => x,
        Err(x) => return burn_conv2d(x, weight, bias, ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1)),
    };
    let wt = operand(weight);
    let b = bias.map(operand);
    let s = Shape { n, cin, h, w, cout, k: kh, stride, pad: padding };
    let out = conv2d_f32(data(&x), data(&wt), b.as_ref().map(data), s);
    from_vec(out, [n, cout, s.out_h(), s.out_w()])
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Shape {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// The im2col buffer holds at most this many floats (16 MiB): big enough for GEMMs that run
/// at full speed, small enough to stay out of the peak-memory budget.
const COL_BUDGET: usize = 4 << 20;

fn conv2d_f32(x: &[f32], wt: &[f32], bias: Option<&[f32]>, s: Shape) -> Vec<f32> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let plane = oh * ow;
    let kk = s.cin * s.k * s.k;
    let mut out = vec![0f32; s.n * s.cout * plane];
    if let Some(b) = bias {
        out.par_chunks_mut(plane).enumerate().for_each(|(i, p)| p.fill(b[i % s.cout]));
    }
    let dst = SharedMut(out.as_mut_ptr());
    let gemm_into = |n: usize, col0: usize, cols: usize, rhs: *const f32, rhs_rs: usize| unsafe {
        // SAFETY: out[n] is [cout, plane]; columns col0..col0+cols exist; rhs is [kk, cols]
        // with row stride rhs_rs.
        gemm::gemm(
            s.cout, cols, kk,
            dst.0.add(n * s.cout * plane + col0), 1, plane as isize, bias.is_some(),
            wt.as_ptr(), 1, kk as isize,
            rhs, 1, rhs_rs as isize,
            1.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0),
        );
    };
    if s.k == 1 && s.stride == 1 && s.pad == 0 {
        for n in 0..s.n {
            gemm_into(n, 0, plane, x[n * s.cin * plane..].as_ptr(), plane);
        }
        return out;
    }
    // Whole output rows per tile.
    let rows_per_tile = (COL_BUDGET / (kk * ow)).clamp(1, oh);
    let mut col = vec![0f32; kk * rows_per_tile * ow];
    for n in 0..s.n {
        let xn = &x[n * s.cin * s.h * s.w..(n + 1) * s.cin * s.h * s.w];
        for r0 in (0..oh).step_by(rows_per_tile) {
            let rows = rows_per_tile.min(oh - r0);
            let cols = rows * ow;
            col[..kk * cols].par_chunks_mut(cols).enumerate().for_each(|(r, dst)| im2col_row(xn, dst, r, r0, rows, ow, s));
            gemm_into(n, r0 * ow, cols, col.as_ptr(), cols);
        }
    }
    out
}

/// Row `r` = (input channel, ky, kx) of the im2col matrix for output rows r0..r0+rows.
fn im2col_row(x: &[f32], dst: &mut [f32], r: usize, r0: usize, rows: usize, ow: usize, s: Shape) {
    let (ci, ky, kx) = (r / (s.k * s.k), r / s.k % s.k, r % s.k);
    let src = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
    for (oy, seg) in (r0..r0 + rows).zip(dst.chunks_exact_mut(ow)) {
        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
        if iy < 0 || iy >= s.h as isize {
            seg.fill(0.0);
            continue;
        }
        let line = &src[iy as usize * s.w..(iy as usize + 1) * s.w];
        // Output columns whose input column ox·stride + kx − pad lies inside the row.
        let lo = s.pad.saturating_sub(kx).div_ceil(s.stride).min(ow);
        let hi = ((s.w + s.pad - kx).div_ceil(s.stride)).clamp(lo, ow);
        seg[..lo].fill(0.0);
        seg[hi..].fill(0.0);
        if s.stride == 1 {
            let start = lo + kx - s.pad;
            seg[lo..hi].copy_from_slice(&line[start..start + hi - lo]);
        } else {
            for (ox, v) in (lo..hi).zip(&mut seg[lo..hi]) {
                *v = line[ox * s.stride + kx - s.pad];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    /// Against Burn's convolution: 1×1, 3×3 same, stride 2 with and without padding, even
    /// and odd sizes, no bias, and a tile budget small enough to split the rows.
    #[test]
    fn matches_burn_conv() {
        let dev = FlexDevice;
        for &(n, cin, h, w, cout, k, stride, pad, bias) in &[
            (2, 3, 8, 8, 4, 1, 1, 0, true),
            (1, 5, 9, 7, 6, 3, 1, 1, true),
            (2, 4, 10, 10, 3, 3, 2, 1, false),
            (1, 4, 9, 9, 3, 3, 2, 0, true),
            (1, 2, 5, 6, 2, 5, 1, 2, true),
            (1, 3, 7, 7, 2, 3, 3, 1, true),
            (1, 600, 40, 30, 8, 3, 1, 1, true),
        ] {
            let x = Tensor::<Flex, 4>::random([n, cin, h, w], Distribution::Default, &dev);
            let wt = Tensor::<Flex, 4>::random([cout, cin, k, k], Distribution::Default, &dev);
            let b = bias.then(|| Tensor::<Flex, 1>::random([cout], Distribution::Default, &dev));
            let want = burn_conv2d(x.clone(), wt.clone(), b.clone(), ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1));
            let got = conv2d(x, wt, b, stride, pad);
            assert_eq!(got.dims(), want.dims(), "{n} {cin} {h} {w} {cout} {k} {stride} {pad}");
            let scale: f32 = want.clone().abs().max().into_scalar();
            let e: f32 = (got - want).abs().max().into_scalar() / scale;
            assert!(e < 1e-6, "{n} {cin} {h} {w} {cout} {k} {stride} {pad}: max relative diff {e}");
        }
    }
}
