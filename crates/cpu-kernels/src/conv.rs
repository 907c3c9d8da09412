//! 2-D convolution as GEMM, straight from and into NCHW.

use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::bgemm::BInput;
use crate::flex::{data, from_vec, operand, to_flex, Kernel, SharedMut};
use crate::sgemm::{gemm, BSource, MatRef, NR};

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
    assert!(
        cin == wcin && kh == kw && stride > 0,
        "conv2d: input {:?}, weight {:?}, stride {stride}",
        x.dims(),
        weight.dims()
    );
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

fn conv2d_f32(x: &[f32], wt: &[f32], bias: Option<&[f32]>, s: Shape) -> Vec<f32> {
    let plane = s.out_h() * s.out_w();
    let kk = s.cin * s.k * s.k;
    let mut out = vec![0f32; s.n * s.cout * plane];
    if let Some(b) = bias {
        out.par_chunks_mut(plane).enumerate().for_each(|(i, p)| p.fill(b[i % s.cout]));
    }
    let pointwise = s.k == 1 && s.stride == 1 && s.pad == 0;
    for n in 0..s.n {
        let xn = &x[n * s.cin * s.h * s.w..(n + 1) * s.cin * s.h * s.w];
        let fill =
            |k0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]| im2col_packed(xn, s, k0, kc, j0, nc, dst);
        let b = if pointwise { BSource::Mat(MatRef::new(xn.as_ptr(), plane, 1)) } else { BSource::Fill(&fill) };
        // SAFETY: the weight is [cout, kk] row-major, out[n] is [cout, plane]; a 1×1 input is
        // [cin, plane] and im2col writes only the blocks it is asked for.
        unsafe {
            gemm(
                s.cout,
                plane,
                kk,
                MatRef::new(wt.as_ptr(), kk, 1),
                BInput::F32(b),
                out[n * s.cout * plane..].as_mut_ptr(),
                plane,
                1.0,
                bias.is_some(),
                true,
            );
        }
    }
    out
}

/// Writes rows `k0..k0 + kc` (each an input channel and kernel offset `(ci, ky, kx)`), columns
/// `j0..j0 + nc` (output pixels) of the im2col matrix straight in the GEMM's packed layout:
/// panel `p` holds, row by row, the 16 pixels from `j0 + 16p` (zeros past the end and in the
/// padding).
fn im2col_packed(x: &[f32], s: Shape, k0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
    let ow = s.out_w();
    let panels = nc.div_ceil(NR);
    let dst = SharedMut(dst.as_mut_ptr());
    (0..kc).into_par_iter().for_each(|kk| {
        // Captures the whole Sync wrapper, not its raw pointer field (edition 2021).
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let r = k0 + kk;
        let (ci, ky, kx) = (r / (s.k * s.k), r / s.k % s.k, r % s.k);
        let src = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        let at = |col: usize| -> f32 {
            let (iy, ix) = (
                (col / ow * s.stride + ky) as isize - s.pad as isize,
                (col % ow * s.stride + kx) as isize - s.pad as isize,
            );
            if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                0.0
            } else {
                src[iy as usize * s.w + ix as usize]
            }
        };
        for p in 0..panels {
            // SAFETY: row kk of panel p is 16 floats inside dst (kc · panels · 16 long); rows
            // are written by one task each.
            let seg = unsafe { std::slice::from_raw_parts_mut(dst.0.add((p * kc + kk) * NR), NR) };
            let c0 = j0 + p * NR;
            let cols = NR.min(j0 + nc - c0);
            let (oy, ox) = (c0 / ow, c0 % ow);
            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
            let ix = (ox + kx) as isize - s.pad as isize;
            // Usually all 16 pixels lie in one output row and inside the input: one copy.
            if s.stride == 1 && ox + cols <= ow && iy >= 0 && iy < s.h as isize && ix >= 0 && ix as usize + cols <= s.w
            {
                let start = iy as usize * s.w + ix as usize;
                seg[..cols].copy_from_slice(&src[start..start + cols]);
            } else {
                for (j, v) in seg[..cols].iter_mut().enumerate() {
                    *v = at(c0 + j);
                }
            }
            seg[cols..].fill(0.0);
        }
    });
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    /// Against Burn's convolution: 1×1, 3×3 same, stride 2 with and without padding, even
    /// and odd sizes, no bias, more than one block of depth (600·9 rows) and of columns
    /// (70·70 pixels, with blocks that end mid-row).
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
            (2, 3, 70, 70, 4, 3, 1, 1, true),
            (1, 300, 70, 70, 4, 1, 1, 0, false),
        ] {
            let x = Tensor::<Flex, 4>::random([n, cin, h, w], Distribution::Default, &dev);
            let wt = Tensor::<Flex, 4>::random([cout, cin, k, k], Distribution::Default, &dev);
            let b = bias.then(|| Tensor::<Flex, 1>::random([cout], Distribution::Default, &dev));
            let want =
                burn_conv2d(x.clone(), wt.clone(), b.clone(), ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1));
            let got = conv2d(x, wt, b, stride, pad);
            assert_eq!(got.dims(), want.dims(), "{n} {cin} {h} {w} {cout} {k} {stride} {pad}");
            let scale: f32 = want.clone().abs().max().into_scalar();
            let e: f32 = (got - want).abs().max().into_scalar() / scale;
            assert!(e < 1e-6, "{n} {cin} {h} {w} {cout} {k} {stride} {pad}: max relative diff {e}");
        }
    }
}
