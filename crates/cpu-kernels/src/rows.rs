//! Row kernels: softmax, GELU/GEGLU, group- and layer-norm rows, on a vectorised `exp` and `erf`
//! (libm's `expf` and `erff` are scalar calls), each compiled for AVX2+FMA as well and picked
//! at run time.

/// Defines `$select()`, returning `$body` compiled for AVX2+FMA when the CPU has them (chosen
/// at run time, so one binary serves every x86-64 machine) and as plain code otherwise.
macro_rules! best_for_cpu {
    ($select:ident, $body:ident, fn($($a:ident: $t:ty),*) $(-> $r:ty)?) => {
        pub(crate) fn $select() -> fn($($t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features it was compiled for are present.
                    return |$($a),*| unsafe { avx2($($a),*) };
                }
            }
            fn portable($($a: $t),*) $(-> $r)? {
                $body($($a),*)
            }
            portable
        }
    };
}

/// `exp(x)` for `x <= 0` to about 1 ulp (Cephes' `expf` polynomial), written branch-free so
/// that loops over it vectorise. Inputs below −87 give `exp(−87)` (1.6e-38) instead of
/// smaller numbers or 0, which no softmax can tell apart.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5·2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let v = x * LOG2E + ROUND;
    let n = v - ROUND;
    // The integer n sits in v's low mantissa bits: reading it there instead of with `as i32`
    // (a saturating conversion LLVM will not vectorise) keeps the loops vectorised.
    let ni = (v.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// `1 / (1 + exp(−y))` from `exp(−|y|) ≤ 1`, so the exp never overflows.
#[inline(always)]
fn sigmoid(y: f32) -> f32 {
    let e = exp_nonpositive(-y.abs());
    if y >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// Replaces `row` by `exp(row − max(row))` and returns the sum (the caller divides).
#[inline(always)]
fn exp_row_body(row: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let max = m.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut s = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            s[i] += c[i];
        }
    }
    s.iter().chain(rest).sum()
}

/// `erf(x)` to about 2e-7 absolute: Abramowitz & Stegun 7.1.26 on the vectorised exp, and
/// below |x| = 0.6, where that form loses digits to cancellation, the Taylor series.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let mut p = 1.061_405_4f32;
    p = p.mul_add(t, -1.453_152);
    p = p.mul_add(t, 1.421_413_8);
    p = p.mul_add(t, -0.284_496_72);
    p = p.mul_add(t, 0.254_829_6);
    let tail = 1.0 - p * t * exp_nonpositive(-a * a);
    // 2/√π · Σ (−1)ⁿ x^(2n+1) / (n! (2n+1)), n ≤ 6: under 1e-8 off for |x| < 0.6.
    let x2 = a * a;
    let mut s = 1.0f32 / 9360.0;
    s = s.mul_add(x2, -1.0 / 1320.0);
    s = s.mul_add(x2, 1.0 / 216.0);
    s = s.mul_add(x2, -1.0 / 42.0);
    s = s.mul_add(x2, 1.0 / 10.0);
    s = s.mul_add(x2, -1.0 / 3.0);
    s = s.mul_add(x2, 1.0);
    let series = s * a * std::f32::consts::FRAC_2_SQRT_PI;
    let y = if a < 0.6 { series } else { tail };
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// `dst = x · gelu(g)` for `src = [x | g]`.
#[inline(always)]
fn geglu_row_body(src: &[f32], dst: &mut [f32]) {
    let (x, g) = src.split_at(dst.len());
    for ((d, &x), &g) in dst.iter_mut().zip(x).zip(g) {
        *d = x * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2)));
    }
}

/// `dst = x·a + s`, then SiLU (`y · sigmoid(y)`) when `silu` is set.
#[inline(always)]
fn norm_row_body(src: &[f32], dst: &mut [f32], a: f32, s: f32, silu: bool) {
    if silu {
        for (d, &x) in dst.iter_mut().zip(src) {
            let y = x.mul_add(a, s);
            *d = y * sigmoid(y);
        }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.mul_add(a, s);
        }
    }
}

/// `Σ f(v)` over `src` in f64, on four independent lanes.
#[inline(always)]
fn sum_f64(src: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = src.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += f(c[i] as f64);
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&v| f(v as f64)).sum::<f64>()
}

/// Mean and (biased) variance of `src`, two passes in f64.
#[inline(always)]
fn mean_var(src: &[f32]) -> (f64, f64) {
    let n = src.len().max(1) as f64;
    let mean = sum_f64(src, |v| v) / n;
    (mean, sum_f64(src, |v| (v - mean) * (v - mean)) / n)
}

/// One row of `torch.nn.LayerNorm`: `dst = (src − mean) / √(var + eps) · w + b`.
#[inline(always)]
fn layer_norm_row(src: &[f32], dst: &mut [f32], w: &[f32], b: &[f32], eps: f64) {
    let (mean, var) = mean_var(src);
    let (mean, rstd) = (mean as f32, (1.0 / (var + eps).sqrt()) as f32);
    for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(w).zip(b) {
        *d = ((x - mean) * rstd).mul_add(w, b);
    }
}

/// Exact (erf) GELU.
#[inline(always)]
fn gelu_row(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// `x · sigmoid(1.702 x)`, the "quick GELU" of OpenAI's CLIP.
#[inline(always)]
fn quick_gelu_row(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x * sigmoid(1.702 * x);
    }
}

best_for_cpu!(exp_row_fn, exp_row_body, fn(row: &mut [f32]) -> f32);
best_for_cpu!(geglu_row_fn, geglu_row_body, fn(src: &[f32], dst: &mut [f32]));
best_for_cpu!(norm_row_fn, norm_row_body, fn(src: &[f32], dst: &mut [f32], a: f32, s: f32, silu: bool));
best_for_cpu!(mean_var_fn, mean_var, fn(src: &[f32]) -> (f64, f64));
best_for_cpu!(layer_norm_row_fn, layer_norm_row, fn(src: &[f32], dst: &mut [f32], w: &[f32], b: &[f32], eps: f64));
best_for_cpu!(gelu_row_fn, gelu_row, fn(src: &[f32], dst: &mut [f32]));
best_for_cpu!(quick_gelu_row_fn, quick_gelu_row, fn(src: &[f32], dst: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let rel = ((exp_nonpositive(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 2e-38);
    }

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x <= 6.0 {
            worst = worst.max((erf(x) as f64 - libm_erf(x as f64)).abs());
            x += 0.0007;
        }
        assert!(worst < 3e-7, "worst absolute error {worst}");
    }

    /// erf by its Taylor series (|x| < 3) or its continued fraction tail, in f64.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = x.abs();
            let mut cf = 0.0;
            for k in (1..60).rev() {
                cf = (k as f64 / 2.0) / (a + cf);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + cf);
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn row_softmax_sums() {
        for f in [exp_row_fn(), exp_row_body as fn(&mut [f32]) -> f32] {
            let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            let want: Vec<f32> = {
                let m = row.iter().cloned().fold(f32::MIN, f32::max);
                row.iter().map(|x| (x - m).exp()).collect()
            };
            let sum = f(&mut row);
            let want_sum: f32 = want.iter().sum();
            assert!((sum - want_sum).abs() < 1e-5 * want_sum);
            for (a, b) in row.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }
}
