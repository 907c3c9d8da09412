//! Multi-head scaled dot-product attention, without a mask or with a causal one.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::bgemm::{self, BInput, PackedB16};
use crate::flex::{from_vec, operand_view, rows_3d, to_flex_view, FlexTensor, Kernel, SharedMut};
use crate::rows::exp_row_fn;
use crate::sgemm::{gemm, sgemm, BSource, MatRef, PackedB};

/// A (batch, head)'s keys (as kᵀ) and values, packed once for all its query blocks: in f32, or
/// in bf16 when [`crate::use_bf16_gemm`] is on (as PyTorch's bf16 attention, scores and
/// probabilities rounded to bf16, sums in f32).
enum KeysValues {
    F32(PackedB, PackedB),
    Bf16(PackedB16, PackedB16),
}

/// `softmax(q kᵀ / √d) v` per head, with `q` `[B, Lq, heads·d]`, `k` `[B, Lk, heads·d]` and
/// `v` `[B, Lk, heads·dv]` (head `h` owns columns `h·d..(h+1)·d`, as the projections of
/// diffusers' and transformers' attention lay them out). Returns `[B, Lq, heads·dv]`.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let q = Tensor::<Flex, 3>::random([2, 10, 16], Distribution::Default, &FlexDevice);
/// let kv = Tensor::<Flex, 3>::random([2, 7, 16], Distribution::Default, &FlexDevice);
/// assert_eq!(cpu_kernels::attention(q, kv.clone(), kv, 4).dims(), [2, 10, 16]);
/// ```
///
/// # Panics
/// If the shapes disagree (batch, key/value length, widths not divisible by `heads`): a
/// programming error, the callers build these tensors.
pub fn attention<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    attention_impl(q, k, v, heads, false)
}

/// [`attention`] where query `i` sees keys `0..=i` only: the mask of CLIP's text encoder,
/// for self-attention (as many queries as keys, where PyTorch's and Burn's `is_causal` agree).
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_flex::{Flex, FlexDevice};
/// let x = Tensor::<Flex, 3>::random([2, 77, 64], Distribution::Default, &FlexDevice);
/// assert_eq!(cpu_kernels::causal_attention(x.clone(), x.clone(), x, 4).dims(), [2, 77, 64]);
/// ```
///
/// # Panics
/// As [`attention`], and when queries and keys are not as many.
pub fn causal_attention<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    // With fewer queries than keys PyTorch aligns the mask top-left and Burn bottom-right.
    assert_eq!(q.dims()[1], k.dims()[1], "causal_attention: {} queries, {} keys", q.dims()[1], k.dims()[1]);
    attention_impl(q, k, v, heads, true)
}

fn attention_impl<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [b, lq, cq] = q.dims();
    let [bk, lk, ck] = k.dims();
    let [bv, lv, cv] = v.dims();
    assert!(
        b == bk && b == bv && lk == lv && cq == ck,
        "attention: q {:?}, k {:?}, v {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    );
    assert!(
        heads > 0 && cq % heads == 0 && cv % heads == 0,
        "attention: widths {cq}/{cv} not divisible by {heads} heads"
    );
    let qf = match to_flex_view(q, Kernel::Attention, &[k.dtype(), v.dtype()]) {
        Ok(q) => q,
        Err(q) => return attention_burn(q, k, v, heads, causal),
    };
    // Column slices (the parts of a fused qkv projection) are read in place; anything else is
    // made contiguous first.
    let fix = |f: FlexTensor| if rows_3d(&f).is_some() { f } else { f.to_contiguous() };
    let (qf, kf, vf) = (fix(qf), fix(operand_view(k)), fix(operand_view(v)));
    let rows = |f| {
        let (data, sb, sl) = rows_3d(f).expect("contiguous tensors have rows");
        Rows { data, sb, sl }
    };
    let mut out = vec![0f32; b * lq * cv];
    attention_f32(
        rows(&qf),
        rows(&kf),
        rows(&vf),
        &mut out,
        Dims { b, lq, lk, heads, d: cq / heads, dv: cv / heads, causal },
    );
    from_vec(out, [b, lq, cv])
}

/// The same maths with Burn's ops, for every other backend.
fn attention_burn<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    h: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let split = |t: Tensor<B, 3>| {
        let [b, l, c] = t.dims();
        t.reshape([b, l, h, c / h]).swap_dims(1, 2)
    };
    let [b, lq, _] = q.dims();
    let cv = v.dims()[2];
    let opts = AttentionModuleOptions { is_causal: causal, ..Default::default() };
    let o = burn_attention(split(q), split(k), split(v), None, None, opts);
    o.swap_dims(1, 2).reshape([b, lq, cv])
}

/// A `[B, L, C]` operand with contiguous rows: element `(b, l, c)` at `b·sb + l·sl + c`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    sb: usize,
    sl: usize,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    dv: usize,
    causal: bool,
}

/// Scores of one block of queries against all keys stay under about 1 MiB: on the UNet's
/// shapes 256 KiB, 512 KiB and 2 MiB blocks measured slower.
fn query_block(lk: usize) -> usize {
    ((1 << 18) / lk.max(1)).clamp(16, 256)
}

fn attention_f32(q: Rows, k: Rows, v: Rows, out: &mut [f32], s: Dims) {
    let Dims { b, lq, lk, heads, d, dv, causal } = s;
    if lk == 0 {
        // No keys: every output is an empty sum (out is zeroed).
        return;
    }
    let cv = heads * dv;
    let qb = query_block(lk);
    let blocks = lq.div_ceil(qb);
    let scale = 1.0 / (d as f32).sqrt();
    let exp_row = exp_row_fn();
    // Keys (as kᵀ) and values of each (batch, head), packed once for all its query blocks.
    // The causal mask cuts the values' depth per block, which the bf16 packs do not take.
    let bf16 = !causal && bgemm::active().is_some();
    let packed: Vec<KeysValues> = (0..b * heads)
        .into_par_iter()
        .map(|unit| {
            let (bi, h) = (unit / heads, unit % heads);
            // kᵀ: row index = feature (stride 1), column index = key (row stride).
            let kt = MatRef::new(k.data[bi * k.sb + h * d..].as_ptr(), 1, k.sl);
            let vh = MatRef::new(v.data[bi * v.sb + h * dv..].as_ptr(), v.sl, 1);
            if bf16 {
                // SAFETY: kt and vh cover d × lk and lk × dv; `active` checked the CPU.
                unsafe { KeysValues::Bf16(PackedB16::new(d, lk, kt, false), PackedB16::new(lk, dv, vh, false)) }
            } else {
                KeysValues::F32(PackedB::new(d, lk, kt, false), PackedB::new(lk, dv, vh, false))
            }
        })
        .collect();
    let dst = SharedMut(out.as_mut_ptr());
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || (vec![0f32; qb * lk], vec![0f32; qb]),
        |(scores, inv), task| {
            let (unit, blk) = (task / blocks, task % blocks);
            let (bi, h) = (unit / heads, unit % heads);
            let kv = &packed[unit];
            let q0 = blk * qb;
            let rows = qb.min(lq - q0);
            // Under a causal mask this block sees only the keys up to its last query.
            let keys = if causal { lk.min(q0 + rows) } else { lk };
            let scores = &mut scores[..rows * lk];
            // SAFETY: every pointer and stride below stays inside its slice: rows q0..q0+rows
            // of batch bi, columns of head h. Tasks write disjoint blocks of `out`.
            unsafe {
                // Captures the whole Sync wrapper, not its raw pointer field (edition 2021).
                #[allow(clippy::redundant_locals)]
                let dst = dst;
                let qm = MatRef::new(q.data.as_ptr().add(bi * q.sb + q0 * q.sl + h * d), q.sl, 1);
                match kv {
                    KeysValues::F32(kt, _) => {
                        sgemm(rows, keys, d, qm, BSource::Packed(kt), scores.as_mut_ptr(), lk, scale, false, false)
                    }
                    KeysValues::Bf16(kt, _) => {
                        gemm(rows, keys, d, qm, BInput::Bf16(kt), scores.as_mut_ptr(), lk, scale, false, false)
                    }
                }
                for (r, row) in scores.chunks_exact_mut(lk).enumerate() {
                    let seen = if causal { keys.min(q0 + r + 1) } else { keys };
                    inv[r] = 1.0 / exp_row(&mut row[..seen]);
                    row[seen..keys].fill(0.0);
                }
                let o = dst.0.add((bi * lq + q0) * cv + h * dv);
                let pm = MatRef::new(scores.as_ptr(), lk, 1);
                match kv {
                    KeysValues::F32(_, vp) => sgemm(rows, dv, keys, pm, BSource::Packed(vp), o, cv, 1.0, false, false),
                    KeysValues::Bf16(_, vp) => gemm(rows, dv, keys, pm, BInput::Bf16(vp), o, cv, 1.0, false, false),
                }
                for (r, &f) in inv[..rows].iter().enumerate() {
                    for x in std::slice::from_raw_parts_mut(o.add(r * cv), dv) {
                        *x *= f;
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    fn max_diff(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Our kernel against Burn's attention, over shapes that hit one and several query
    /// blocks, a ragged last block, different value width and cross-attention; with a causal
    /// mask where queries and keys are as many (one block of CLIP's 77, several of 300 and
    /// 1100 with keys past one GEMM depth block).
    #[test]
    fn matches_burn_attention() {
        let dev = FlexDevice;
        for &(b, lq, lk, heads, d, dv) in &[
            (1, 1, 1, 1, 1, 1),
            (1, 3, 0, 1, 2, 2),
            (2, 10, 7, 4, 4, 4),
            (1, 300, 300, 2, 8, 8),
            (2, 1000, 85, 3, 5, 7),
            (1, 40, 2000, 1, 16, 16),
            (2, 77, 77, 3, 8, 8),
            (1, 1100, 1100, 1, 8, 4),
        ] {
            let q = Tensor::<Flex, 3>::random([b, lq, heads * d], Distribution::Normal(0.0, 2.0), &dev);
            let k = Tensor::<Flex, 3>::random([b, lk, heads * d], Distribution::Normal(0.0, 2.0), &dev);
            let v = Tensor::<Flex, 3>::random([b, lk, heads * dv], Distribution::Default, &dev);
            let want = attention_burn(q.clone(), k.clone(), v.clone(), heads, false);
            let got = attention(q.clone(), k.clone(), v.clone(), heads);
            assert_eq!(got.dims(), want.dims());
            let e = max_diff(got, want);
            assert!(e < 2e-5, "{b} {lq} {lk} {heads} {d} {dv}: max abs diff {e}");
            if lq == lk {
                let want = attention_burn(q.clone(), k.clone(), v.clone(), heads, true);
                let e = max_diff(causal_attention(q, k, v, heads), want);
                assert!(e < 2e-5, "causal {b} {lq} {heads} {d} {dv}: max abs diff {e}");
            }
        }
    }

    /// A causal mask over fewer queries than keys has two conventions (PyTorch top-left,
    /// Burn bottom-right): refused rather than picked silently.
    #[test]
    #[should_panic(expected = "2 queries, 4 keys")]
    fn causal_needs_as_many_queries_as_keys() {
        let q = Tensor::<Flex, 3>::random([1, 2, 8], Distribution::Default, &FlexDevice);
        let kv = Tensor::<Flex, 3>::random([1, 4, 8], Distribution::Default, &FlexDevice);
        causal_attention(q, kv.clone(), kv, 1);
    }

    /// Column slices of one fused projection (read in place) give the same result as
    /// contiguous copies.
    #[test]
    fn reads_column_slices_in_place() {
        let dev = FlexDevice;
        let qkv = Tensor::<Flex, 3>::random([2, 33, 3 * 24], Distribution::Normal(0.0, 2.0), &dev);
        let part = |i: usize| qkv.clone().narrow(2, i * 24, 24);
        let want = attention_burn(part(0), part(1), part(2), 4, false);
        assert!(max_diff(attention(part(0), part(1), part(2), 4), want.clone()) < 2e-5);
        let want_c = attention_burn(part(0), part(1), part(2), 4, true);
        assert!(max_diff(causal_attention(part(0), part(1), part(2), 4), want_c) < 2e-5);
    }

    /// Strided (transposed) inputs are made contiguous first, not misread.
    #[test]
    fn reads_strided_inputs() {
        let dev = FlexDevice;
        let q = Tensor::<Flex, 3>::random([2, 12, 9], Distribution::Default, &dev).swap_dims(1, 2);
        let k = Tensor::<Flex, 3>::random([2, 12, 5], Distribution::Default, &dev).swap_dims(1, 2);
        let want = attention_burn(q.clone(), k.clone(), k.clone(), 3, false);
        assert!(max_diff(attention(q, k.clone(), k, 3), want) < 1e-5);
    }
}
