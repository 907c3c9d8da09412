//! Group normalisation (optionally followed by SiLU) and layer normalisation.

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::flex::{data, from_vec, operand, to_flex, Kernel};

/// `torch.nn.GroupNorm` (affine) over `x` `[N, C, ...]` viewed as `[N, C, L]`, then SiLU when
/// `silu` is set (the resnet blocks' `silu(norm(x))`). Burn's version makes some eight passes
/// over the tensor (mean, variance, subtract, divide, scale, shift, sigmoid, product); this makes
/// two, in parallel over (sample, group), with f64 sums.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 3>::random([2, 8, 5], Distribution::Default, &FlexDevice);
/// let (w, b) = (Tensor::ones([8], &FlexDevice), Tensor::zeros([8], &FlexDevice));
/// assert_eq!(cpu_kernels::group_norm(x, w, b, 4, 1e-6, true).dims(), [2, 8, 5]);
/// ```
///
/// # Panics
/// If `groups` does not divide the channels or the affine parameters are not `[C]`.
pub fn group_norm<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    groups: usize,
    eps: f64,
    silu_after: bool,
) -> Tensor<B, 3> {
    let [n, c, l] = x.dims();
    assert!(
        groups > 0 && c % groups == 0 && weight.dims() == [c] && bias.dims() == [c],
        "group_norm: {c} channels, {groups} groups"
    );
    let xf = match to_flex(x, Kernel::Norm, &[weight.dtype(), bias.dtype()]) {
        Ok(x) => x,
        Err(x) => return group_norm_burn(x, weight, bias, groups, eps, silu_after),
    };
    let (wf, bf) = (operand(weight), operand(bias));
    let (w, b) = (data(&wf), data(&bf));
    let cg = c / groups;
    let mut out = vec![0f32; n * c * l];
    let row = crate::rows::norm_row_fn();
    let stats = crate::rows::mean_var_fn();
    out.par_chunks_mut(cg * l).zip(data(&xf).par_chunks(cg * l)).enumerate().for_each(|(i, (dst, src))| {
        let (mean, var) = stats(src);
        let rstd = 1.0 / (var + eps).sqrt();
        let c0 = (i % groups) * cg;
        for (j, (d, s)) in dst.chunks_exact_mut(l).zip(src.chunks_exact(l)).enumerate() {
            // y = x·a + s with a = w·rstd, s = b − mean·a.
            let a = w[c0 + j] as f64 * rstd;
            row(s, d, a as f32, (b[c0 + j] as f64 - mean * a) as f32, silu_after);
        }
    });
    from_vec(out, [n, c, l])
}

/// `torch.nn.LayerNorm` over the last dimension of `x` (any rank), with `weight` and `bias`
/// `[D]`: one pass for the statistics and one for the output per row, rows in parallel.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 3>::random([2, 4, 6], Distribution::Default, &FlexDevice);
/// let y = cpu_kernels::layer_norm(x, Tensor::ones([6], &FlexDevice), None, 1e-5);
/// assert_eq!(y.dims(), [2, 4, 6]);
/// ```
///
/// # Panics
/// If `weight` or `bias` is not `[D]`.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
    eps: f64,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d = dims[D - 1];
    assert!(weight.dims() == [d] && bias.as_ref().is_none_or(|b| b.dims() == [d]), "layer_norm: last dimension {d}");
    let others: Vec<DType> = std::iter::once(weight.dtype()).chain(bias.as_ref().map(|b| b.dtype())).collect();
    let xf = match to_flex(x, Kernel::Norm, &others) {
        Ok(x) => x,
        Err(x) => return layer_norm_burn(x, weight, bias, eps),
    };
    let wf = operand(weight);
    let bf = bias.map(operand);
    let zeros;
    let b = match &bf {
        Some(b) => data(b),
        None => {
            zeros = vec![0f32; d];
            &zeros
        }
    };
    let w = data(&wf);
    let row = crate::rows::layer_norm_row_fn();
    let mut out = vec![0f32; dims.iter().product()];
    out.par_chunks_mut(d).zip(data(&xf).par_chunks(d)).for_each(|(dst, src)| row(src, dst, w, b, eps));
    from_vec(out, dims)
}

fn layer_norm_burn<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
    eps: f64,
) -> Tensor<B, D> {
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    let mut shape = [1usize; D];
    shape[D - 1] = weight.dims()[0];
    let y = (x - mean) / (var + eps).sqrt() * weight.reshape(shape);
    match bias {
        Some(b) => y + b.reshape(shape),
        None => y,
    }
}

fn group_norm_burn<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    groups: usize,
    eps: f64,
    silu_after: bool,
) -> Tensor<B, 3> {
    let [n, c, l] = x.dims();
    let g = x.reshape([n, groups, (c / groups) * l]);
    let (var, mean) = g.clone().var_mean_bias(2);
    let y = ((g - mean) / (var + eps).sqrt()).reshape([n, c, l]);
    let y = y * weight.reshape([1, c, 1]) + bias.reshape([1, c, 1]);
    if silu_after {
        silu(y)
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    #[test]
    fn matches_burn_layer_norm() {
        let dev = FlexDevice;
        for (d, bias) in [(1408, true), (7, false), (1, true)] {
            let x = Tensor::<Flex, 3>::random([2, 9, d], Distribution::Normal(-2.0, 4.0), &dev);
            let w = Tensor::<Flex, 1>::random([d], Distribution::Normal(1.0, 0.5), &dev);
            let b = bias.then(|| Tensor::<Flex, 1>::random([d], Distribution::Default, &dev));
            let want = layer_norm_burn(x.clone(), w.clone(), b.clone(), 1e-6);
            let e: f32 = (layer_norm(x, w, b, 1e-6) - want).abs().max().into_scalar();
            assert!(e < 1e-5, "{d} {bias}: max abs diff {e}");
        }
    }

    /// Group norm in f64 from the f32 inputs, and for each output the size of the f32 terms
    /// that any f32 formulation rounds: `|x − mean|·rstd·|w|` (or `|x·a|` and `|b − mean·a|`
    /// for PyTorch's `x·a + s`) plus `|b|`.
    fn group_norm_f64(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        [n, c, l]: [usize; 3],
        groups: usize,
        eps: f64,
        silu_after: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let cg = c / groups;
        let (mut y, mut scale) = (vec![0f64; n * c * l], vec![0f64; n * c * l]);
        for (i, src) in x.chunks(cg * l).enumerate() {
            let mean = src.iter().map(|&v| v as f64).sum::<f64>() / (cg * l) as f64;
            let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (cg * l) as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            for (k, &v) in src.iter().enumerate() {
                let ch = (i % groups) * cg + k / l;
                let (a, v) = (w[ch] as f64 * rstd, v as f64);
                let t = (v - mean) * a + b[ch] as f64;
                let o = i * cg * l + k;
                y[o] = if silu_after { t / (1.0 + (-t).exp()) } else { t };
                scale[o] = (v.abs() + mean.abs()) * a.abs() + (b[ch] as f64).abs() + t.abs();
            }
        }
        (y, scale)
    }

    fn floats<const D: usize>(t: &Tensor<Flex, D>) -> Vec<f32> {
        t.to_data().to_vec().unwrap()
    }

    /// Largest error in units of `2^-24 · scale` (f32 rounding of the terms that form each
    /// output), so a well-rounded f32 computation scores a small constant however badly the
    /// group is conditioned.
    fn ulps_of_scale(got: Tensor<Flex, 3>, want: &[f64], scale: &[f64]) -> f64 {
        let got = got.into_data().to_vec::<f32>().unwrap();
        got.iter()
            .zip(want)
            .zip(scale)
            .map(|((&g, &w), &s)| (g as f64 - w).abs() / (s.max(f64::MIN_POSITIVE) * 2f64.powi(-24)))
            .fold(0.0, f64::max)
    }

    #[test]
    fn matches_group_norm_in_f64() {
        let dev = FlexDevice;
        // The last case has groups of two values, so its variance is now and then tiny next to
        // the mean and rstd large: f32 then loses digits to cancellation in both our x·a + s and
        // burn's (x − mean)/σ, and an absolute tolerance against burn failed now and then. An
        // f64 reference with an error scaled to the rounded terms checks both fairly.
        for &(n, c, l, groups, silu_after) in
            &[(2, 8, 50, 4, false), (1, 32, 4096, 32, true), (2, 6, 1, 3, true), (64, 6, 1, 3, false)]
        {
            let x = Tensor::<Flex, 3>::random([n, c, l], Distribution::Normal(3.0, 5.0), &dev);
            let w = Tensor::<Flex, 1>::random([c], Distribution::Normal(1.0, 0.5), &dev);
            let b = Tensor::<Flex, 1>::random([c], Distribution::Default, &dev);
            let (want, scale) =
                group_norm_f64(&floats(&x), &floats(&w), &floats(&b), [n, c, l], groups, 1e-5, silu_after);
            let ours =
                ulps_of_scale(group_norm(x.clone(), w.clone(), b.clone(), groups, 1e-5, silu_after), &want, &scale);
            assert!(ours < 4.0, "{n} {c} {l} {groups} {silu_after}: kernel off by {ours} roundings");
            // Burn sums the mean and variance in f32, so its error grows with the group size.
            let burn = ulps_of_scale(group_norm_burn(x, w, b, groups, 1e-5, silu_after), &want, &scale);
            let allowed = 8.0 * ((c / groups * l) as f64).sqrt();
            assert!(
                burn < allowed,
                "{n} {c} {l} {groups} {silu_after}: fallback off by {burn} roundings (allowed {allowed})"
            );
        }
        // A group whose spread (1e-4) is far below √eps, next to one far above it.
        let x = Tensor::<Flex, 3>::from_floats([[[3.0, 3.0001], [-20.0, 7.5]]], &dev);
        let (w, b) = (Tensor::<Flex, 1>::from_floats([1.5, 0.5], &dev), Tensor::from_floats([0.25, -1.0], &dev));
        let (want, scale) = group_norm_f64(&floats(&x), &floats(&w), &floats(&b), [1, 2, 2], 2, 1e-5, true);
        let got = group_norm(x, w, b, 2, 1e-5, true);
        let ours = ulps_of_scale(got, &want, &scale);
        assert!(ours < 4.0, "ill-conditioned group: kernel off by {ours} roundings");
    }
}
