//! `use_bf16_gemm`: convolutions, linear layers and (non-causal) attention on f32 tensors round
//! their operands to bf16 (in its own test binary: the switch is process-wide).

use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};
use burn_flex::{Flex, FlexDevice};

/// Max |got − want| / max |want|.
fn rel<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>) -> f32 {
    let scale: f32 = want.clone().abs().max().into_scalar();
    (got - want).abs().max().into_scalar() / scale
}

#[test]
fn bf16_gemms_stay_within_bf16_rounding_of_f32() {
    if !cpu_kernels::use_bf16_gemm(true) {
        eprintln!("skipped: this CPU has no bf16 GEMM (AMX-BF16 or AVX512-BF16)");
        return;
    }
    let dev = FlexDevice;
    let x = Tensor::<Flex, 4>::random([2, 64, 20, 18], Distribution::Default, &dev);
    let w = Tensor::<Flex, 4>::random([40, 64, 3, 3], Distribution::Default, &dev);
    let b = Tensor::<Flex, 1>::random([40], Distribution::Default, &dev);
    let want = burn_conv2d(x.clone(), w.clone(), Some(b.clone()), ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
    let got = cpu_kernels::conv2d(x, w, Some(b), 1, 1);
    let e = rel(got, want);
    // bf16 keeps 8 bits of mantissa: each product errs by up to 2^-8 relative, and the sums
    // of 576 random-signed products average that down; f32 alone would be near 1e-7.
    assert!(e < 1e-2 && e > 1e-5, "conv2d in bf16: relative error {e}");

    for rows in [7, 1500] {
        let x = Tensor::<Flex, 2>::random([rows, 300], Distribution::Default, &dev);
        let w = Tensor::<Flex, 2>::random([70, 300], Distribution::Default, &dev).transpose();
        let want = x.clone().matmul(w.clone());
        let e = rel(cpu_kernels::linear(x.clone(), w.clone(), None), want.clone());
        assert!(e < 1e-2 && e > 1e-5, "linear in bf16, {rows} rows: relative error {e}");
        let packed = cpu_kernels::PackedLinear::new(&w).expect("f32 on burn-flex");
        assert!(format!("{packed:?}").contains("bf16"), "{packed:?}");
        let e = rel(cpu_kernels::linear_packed(x, &packed, None), want);
        assert!(e < 1e-2 && e > 1e-5, "packed linear in bf16, {rows} rows: relative error {e}");
    }
    // Attention as softmax(q·kᵀ/√d)·v in f32 Burn ops, [B, L, heads·d] in and out; the
    // causal form (CLIP's) stays f32.
    let (heads, d) = (3, 40);
    let q = Tensor::<Flex, 3>::random([2, 300, heads * d], Distribution::Default, &dev);
    let k = Tensor::<Flex, 3>::random([2, 77, heads * d], Distribution::Default, &dev);
    let v = Tensor::<Flex, 3>::random([2, 77, heads * d], Distribution::Default, &dev);
    let split = |t: Tensor<Flex, 3>| {
        let [b, l, _] = t.dims();
        t.reshape([b, l, heads, d]).swap_dims(1, 2)
    };
    let scores = split(q.clone()).matmul(split(k.clone()).swap_dims(2, 3)) / (d as f32).sqrt();
    let want = burn::tensor::activation::softmax(scores, 3).matmul(split(v.clone())).swap_dims(1, 2).reshape([
        2,
        300,
        heads * d,
    ]);
    let e = rel(cpu_kernels::attention(q.clone(), k.clone(), v.clone(), heads), want);
    assert!(e < 2e-2 && e > 1e-5, "attention in bf16: relative error {e}");
    let qc = q.clone().slice([0..2, 0..77]);
    let want = cpu_kernels::causal_attention(qc.clone(), k.clone(), v.clone(), heads);
    cpu_kernels::use_bf16_gemm(false);
    let e = rel(cpu_kernels::causal_attention(qc, k, v, heads), want);
    assert!(e < 1e-6, "causal attention is f32 under bf16 GEMMs: {e}");
    cpu_kernels::use_bf16_gemm(true);

    // Switched off, the same layers are f32 again.
    cpu_kernels::use_bf16_gemm(false);
    let x = Tensor::<Flex, 2>::random([9, 300], Distribution::Default, &dev);
    let w = Tensor::<Flex, 2>::random([300, 70], Distribution::Default, &dev);
    let e = rel(cpu_kernels::linear(x.clone(), w.clone(), None), x.matmul(w));
    assert!(e < 1e-5, "linear after switching bf16 off: {e}");
}
