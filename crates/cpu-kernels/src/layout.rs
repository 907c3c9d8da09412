//! Element-wise and layout kernels around the big GEMMs: the batched transpose between
//! feature maps and token sequences, the GEGLU gate and GELU.

use burn::tensor::activation::{gelu as burn_gelu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::flex::{data, from_vec, to_flex, Kernel};

/// `[N, A, B]` → `[N, B, A]`, laid out contiguously (a feature map `[N, C, H·W]` to tokens
/// `[N, H·W, C]` and back). Burn's `swap_dims` only changes strides; on burn-flex the next
/// reduction or element-wise op then walks the strided view one scalar index at a time.
///
/// ```
/// use burn::tensor::{Tensor, TensorData};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 3>::from_data(TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [1, 2, 3]), &FlexDevice);
/// let y = cpu_kernels::transpose(x);
/// assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![1., 4., 2., 5., 3., 6.]);
/// ```
pub fn transpose<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, a, b] = x.dims();
    let f = match to_flex(x, Kernel::Layout, &[]) {
        Ok(f) => f,
        Err(x) => return x.swap_dims(1, 2),
    };
    let src = data(&f);
    let mut out = vec![0f32; n * a * b];
    // Tiles of 32×32 keep both the reads and the writes within a few cache lines.
    const T: usize = 32;
    out.par_chunks_mut(b * a).zip(src.par_chunks(a * b)).for_each(|(dst, src)| {
        for i0 in (0..a).step_by(T) {
            for j0 in (0..b).step_by(T) {
                for i in i0..(i0 + T).min(a) {
                    for j in j0..(j0 + T).min(b) {
                        dst[j * a + i] = src[i * b + j];
                    }
                }
            }
        }
    });
    from_vec(out, [n, b, a])
}

/// diffusers' GEGLU gate: `h` `[N, L, 2·F]` split in halves `(x, g)` on the last axis gives
/// `x · gelu(g)` `[N, L, F]` (exact, erf-based GELU), in one pass on the CPU.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let h = Tensor::<Flex, 3>::random([2, 5, 8], Distribution::Default, &FlexDevice);
/// assert_eq!(cpu_kernels::geglu(h).dims(), [2, 5, 4]);
/// ```
pub fn geglu<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, l, two_f] = h.dims();
    assert!(two_f % 2 == 0, "geglu: odd last dimension {two_f}");
    let f = two_f / 2;
    let t = match to_flex(h, Kernel::Layout, &[]) {
        Ok(t) => t,
        Err(h) => {
            let mut parts = h.chunk(2, 2);
            let gate = parts.pop().expect("two halves");
            let x = parts.pop().expect("two halves");
            return x * burn_gelu(gate);
        }
    };
    let mut out = vec![0f32; n * l * f];
    let row = crate::rows::geglu_row_fn();
    out.par_chunks_mut(f).zip(data(&t).par_chunks(two_f)).for_each(|(dst, src)| row(src, dst));
    from_vec(out, [n, l, f])
}

/// Exact (erf) GELU, element-wise, for any rank (burn-flex calls libm's scalar `erff`).
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 2>::random([3, 5], Distribution::Default, &FlexDevice);
/// assert_eq!(cpu_kernels::gelu(x).dims(), [3, 5]);
/// ```
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    elementwise(x, crate::rows::gelu_row_fn(), burn_gelu)
}

/// CLIP's "quick GELU", `x · sigmoid(1.702 x)`, element-wise, for any rank (three Burn ops
/// and a scalar libm `expf` per element on burn-flex).
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 2>::random([3, 5], Distribution::Default, &FlexDevice);
/// assert_eq!(cpu_kernels::quick_gelu(x).dims(), [3, 5]);
/// ```
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    elementwise(x, crate::rows::quick_gelu_row_fn(), |x| x.clone() * sigmoid(x * 1.702))
}

/// `row` over the elements of `x` in parallel chunks on burn-flex f32, `fallback` elsewhere.
fn elementwise<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    row: fn(&[f32], &mut [f32]),
    fallback: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let t = match to_flex(x, Kernel::Layout, &[]) {
        Ok(t) => t,
        Err(x) => return fallback(x),
    };
    let mut out = vec![0f32; dims.iter().product()];
    out.par_chunks_mut(1 << 14).zip(data(&t).par_chunks(1 << 14)).for_each(|(dst, src)| row(src, dst));
    from_vec(out, dims)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    #[test]
    fn transpose_matches_swap_dims() {
        for dims in [[2, 70, 33], [1, 1, 5], [3, 64, 64]] {
            let x = Tensor::<Flex, 3>::random(dims, Distribution::Default, &FlexDevice);
            let want = x.clone().swap_dims(1, 2);
            let e: f32 = (transpose(x) - want).abs().max().into_scalar();
            assert_eq!(e, 0.0);
        }
    }

    #[test]
    fn gelu_matches_burn() {
        let x = Tensor::<Flex, 2>::random([3, 20_000], Distribution::Normal(0.0, 4.0), &FlexDevice);
        let e: f32 = (gelu(x.clone()) - burn_gelu(x)).abs().max().into_scalar();
        assert!(e < 1e-5, "max abs diff {e}");
    }

    #[test]
    fn quick_gelu_matches_burn() {
        let x = Tensor::<Flex, 2>::random([3, 20_000], Distribution::Normal(0.0, 30.0), &FlexDevice);
        let want = x.clone() * sigmoid(x.clone() * 1.702);
        let e: f32 = (quick_gelu(x) - want).abs().max().into_scalar();
        assert!(e < 1e-5, "max abs diff {e}");
    }

    #[test]
    fn geglu_matches_burn() {
        let h = Tensor::<Flex, 3>::random([2, 37, 2 * 45], Distribution::Normal(0.0, 3.0), &FlexDevice);
        let mut parts = h.clone().chunk(2, 2);
        let gate = parts.pop().unwrap();
        let want = parts.pop().unwrap() * burn_gelu(gate);
        let e: f32 = (geglu(h) - want).abs().max().into_scalar();
        assert!(e < 1e-5, "max abs diff {e}");
    }
}
