//! bf16 GEMM with f32 accumulation: `C = α·A·B (+ C)`, `A` and `B` f32 in memory and rounded
//! to bf16 (nearest even) while they are packed, `C` f32. What PyTorch's `bfloat16` matmuls
//! compute on the CPU, for `--dtype bf16`.
//!
//! Two microkernels, picked at run time ([`bf16_path`]):
//! * `amx`: AMX-BF16 tiles (Sapphire Rapids and later): a 32×32 block of `C` in four 16×16
//!   f32 tiles, per step of depth 32 two tiles of `A` and two of `B` and four `tdpbf16ps`.
//!   Rust 1.95 has no stable AMX intrinsics, so the tile instructions are inline assembly, and
//!   Linux lends the tile registers only after `arch_prctl(ARCH_REQ_XCOMP_PERM)`.
//! * `avx512bf16`: `vdpbf16ps` (Zen 4 and 5, Cooper Lake): an 8×32 block in 16 zmm registers,
//!   per pair of depths two loads of `B` and 8 broadcast pairs of `A`.
//!
//! Both read the same packed layouts: `A` in micropanels of 16 rows, each a run of 16×32 bf16
//! tiles (row-major, one per 32 of depth); `B` in panels of 16 columns, each a run of tiles of
//! 16 depth pairs × 16 columns × 2 (the "VNNI" order `tdpbf16ps` and `vdpbf16ps` multiply
//! pairwise). Depth and edges are padded with zeros, so the kernels always run whole tiles and
//! only the stores are cut to the matrix.

use rayon::prelude::*;

use crate::sgemm::{BSource, MatRef, KC, NR};

/// Rows of an `A` micropanel and of a `C` tile.
const TM: usize = 16;
/// Columns of a `B` panel and of a `C` tile.
const TN: usize = 16;
/// Depth of one tile step (32 bf16: a 64-byte tile row).
const TK: usize = 32;
/// Rows of the `vdpbf16ps` kernel's block (× 32 columns: 16 accumulators).
const DP_ROWS: usize = 8;
/// bf16 values in one packed tile (16 rows × 32, or 16 pairs × 16 columns × 2).
const TILE: usize = 512;
/// Depth of a block: a multiple of [`TK`] and of sgemm's [`KC`] (ahead-of-time packed `B`
/// comes in blocks of that depth).
const KCB: usize = 2 * KC;
/// Rows of an `A` block (a multiple of 32): 128×512 bf16 is 128 KiB, inside L2.
const MCB: usize = 128;
/// Columns of a `B` block: 512×2048 bf16 is 2 MiB.
const NCB: usize = 2048;

/// The bf16 microkernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Kernel {
    Amx,
    Avx512Bf16,
}

impl Bf16Kernel {
    fn name(self) -> &'static str {
        match self {
            Self::Amx => "amx",
            Self::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The bf16 kernel this CPU runs, if any: AMX where the CPU has it and Linux lends the tiles,
/// else AVX512-BF16; `None` without AVX512-BF16 (and AVX512-BW, used in packing).
/// For comparison (read once): `PERSONALIZE_GEMM_BF16=avx512bf16` keeps an AMX CPU on the
/// `vdpbf16ps` kernel, `off` leaves `--dtype bf16` on Burn's bf16 ops.
pub(crate) fn bf16_kernel() -> Option<Bf16Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Bf16Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let base = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16");
            if !base {
                return None;
            }
            let choice = std::env::var("PERSONALIZE_GEMM_BF16");
            if choice.as_deref() == Ok("off") {
                return None;
            }
            if choice.as_deref() != Ok("avx512bf16") && amx::available() {
                return Some(Bf16Kernel::Amx);
            }
            Some(Bf16Kernel::Avx512Bf16)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// The bf16 GEMM kernel this CPU runs, `"amx"` or `"avx512bf16"`, or `None` where the CPU has
/// neither (then `--dtype bf16` runs on Burn's bf16 ops).
///
/// ```
/// let path = cpu_kernels::bf16_path();
/// assert!(matches!(path, None | Some("amx") | Some("avx512bf16")));
/// ```
pub fn bf16_path() -> Option<&'static str> {
    bf16_kernel().map(Bf16Kernel::name)
}

static USE_BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the GEMMs of [`crate::conv2d`], [`crate::linear`] and [`crate::linear_packed`] on f32
/// tensors round their operands to bf16 and sum in f32, where the CPU has a bf16 kernel
/// ([`bf16_path`]): `--dtype bf16` on such CPUs, with tensors, norms, softmax, GELU and the
/// scheduler in f32 (as PyTorch's bf16 autocast keeps them). Non-causal [`crate::attention`]
/// runs its two GEMMs in bf16 too; the causal form (CLIP's) stays f32. Returns
/// whether the GEMMs now run in bf16 (false without a kernel, or when `on` is false).
///
/// ```
/// let on = cpu_kernels::use_bf16_gemm(true);
/// assert_eq!(on, cpu_kernels::bf16_path().is_some());
/// cpu_kernels::use_bf16_gemm(false);
/// ```
pub fn use_bf16_gemm(on: bool) -> bool {
    let on = on && bf16_kernel().is_some();
    USE_BF16.store(on, std::sync::atomic::Ordering::Relaxed);
    on
}

/// Whether [`use_bf16_gemm`] switched the bf16 GEMMs on.
///
/// ```
/// let was = cpu_kernels::bf16_gemm_on();
/// cpu_kernels::use_bf16_gemm(false);
/// assert!(!cpu_kernels::bf16_gemm_on());
/// cpu_kernels::use_bf16_gemm(was);
/// ```
pub fn bf16_gemm_on() -> bool {
    active().is_some()
}

/// The bf16 kernel when [`use_bf16_gemm`] switched it on.
pub(crate) fn active() -> Option<Bf16Kernel> {
    if USE_BF16.load(std::sync::atomic::Ordering::Relaxed) {
        bf16_kernel()
    } else {
        None
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as `vcvtne2ps2bf16` rounds: NaN stays NaN
/// (quiet), and subnormals become zero of their sign, as the instruction makes them, so a
/// value rounds the same in the vector and the scalar packing paths.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((b >> 16) & 0x8000) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `bf16` bits back to f32 (exact).
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A buffer of `len` bf16 values starting on a 64-byte boundary (tile loads of whole lines).
fn aligned(buf: &mut Vec<u16>, len: usize) -> &mut [u16] {
    if buf.len() < len + 32 {
        buf.resize(len + 32, 0);
    }
    let skip = buf.as_ptr().align_offset(64).min(31);
    &mut buf[skip..skip + len]
}

/// Packs rows `i0..i0 + mc`, columns `k0..k0 + kc` of `a`, times `alpha`, into micropanels of
/// [`TM`] rows: micropanel `q`, depth tile `t` at `(q·tiles + t)·512`, row-major 16×32.
///
/// # Safety
/// `a` must cover those rows and columns; the CPU must have AVX512-BF16 (see [`bf16_kernel`]).
#[allow(clippy::too_many_arguments)]
unsafe fn pack_a(a: MatRef, i0: usize, mc: usize, k0: usize, kc: usize, alpha: f32, dst: &mut [u16]) {
    let tiles = kc.div_ceil(TK);
    for q in 0..mc.div_ceil(TM) {
        for i in 0..TM {
            let r = q * TM + i;
            for t in 0..tiles {
                let d = &mut dst[(q * tiles + t) * TILE + i * TK..][..TK];
                let depth = TK.min(kc - t * TK);
                if r >= mc {
                    d.fill(0);
                    continue;
                }
                let src = a.ptr.add((i0 + r) * a.rs + (k0 + t * TK) * a.cs);
                #[cfg(target_arch = "x86_64")]
                if a.cs == 1 && depth == TK {
                    x86::row32(src, alpha, d.as_mut_ptr());
                    continue;
                }
                for (kk, v) in d.iter_mut().enumerate() {
                    *v = if kk < depth { to_bf16(alpha * *src.add(kk * a.cs)) } else { 0 };
                }
            }
        }
    }
}

/// Where the rows of a block of `B` lie in f32, 16 columns a panel.
trait PanelRows: Sync {
    /// The 16 floats of row `kk` (of the block) in panel `p`, zeros past the matrix's columns.
    fn row(&self, kk: usize, p: usize) -> *const f32;
}

/// Rows of `B` already in sgemm's packed layout (panel `p` at `p·stride`, 16 floats a row).
struct F32Panels<'a> {
    block: &'a [f32],
    stride: usize,
}
impl PanelRows for F32Panels<'_> {
    fn row(&self, kk: usize, p: usize) -> *const f32 {
        self.block[p * self.stride + kk * NR..].as_ptr()
    }
}

/// Packs `kc` rows of `B` (16-column panels in `rows`, `panels` of them) into the VNNI tiles
/// of [`bf16_kernel`]'s `B`: panel `p`, depth tile `t` at `(p·tiles + t)·512`.
///
/// # Safety
/// As [`pack_a`]; `rows` must give 16 readable floats for every row below `kc`.
unsafe fn pack_b_rows(rows: &dyn PanelRows, kc: usize, panels: usize, dst: &mut [u16], parallel: bool) {
    let tiles = kc.div_ceil(TK);
    let one = |(p, d): (usize, &mut [u16])| {
        for t in 0..tiles {
            let d = &mut d[t * TILE..(t + 1) * TILE];
            for pair in 0..TK / 2 {
                let k = t * TK + 2 * pair;
                let zero = [0f32; NR];
                let lo = if k < kc { rows.row(k, p) } else { zero.as_ptr() };
                let hi = if k + 1 < kc { rows.row(k + 1, p) } else { zero.as_ptr() };
                let out = &mut d[pair * 2 * TN..(pair + 1) * 2 * TN];
                #[cfg(target_arch = "x86_64")]
                {
                    x86::interleave16(lo, hi, out.as_mut_ptr());
                    continue;
                }
                #[allow(unreachable_code)]
                for j in 0..TN {
                    out[2 * j] = to_bf16(*lo.add(j));
                    out[2 * j + 1] = to_bf16(*hi.add(j));
                }
            }
        }
    };
    let dst = &mut dst[..panels * tiles * TILE];
    if parallel {
        dst.par_chunks_mut(tiles * TILE).enumerate().for_each(one);
    } else {
        dst.chunks_mut(tiles * TILE).enumerate().for_each(one);
    }
}

/// [`pack_b_rows`] from a block that `fill` writes in sgemm's packed f32 layout (`kc` rows,
/// `nc` columns) into `scratch`.
///
/// # Safety
/// As [`pack_a`].
unsafe fn via_f32(
    kc: usize,
    nc: usize,
    dst: &mut [u16],
    scratch: &mut Vec<f32>,
    parallel: bool,
    fill: impl FnOnce(&mut [f32]),
) {
    let panels = nc.div_ceil(NR);
    scratch.clear();
    scratch.resize(panels * kc * NR, 0.0);
    fill(scratch);
    pack_b_rows(&F32Panels { block: scratch, stride: kc * NR }, kc, panels, dst, parallel);
}

/// Rows of a block of `B` from sgemm's ahead-of-time packed blocks: depth [`KCB`] spans
/// two of its [`KC`] blocks, each with its own panel stride.
struct Parts<'a> {
    parts: [(&'a [f32], usize); 2],
}
impl PanelRows for Parts<'_> {
    fn row(&self, kk: usize, p: usize) -> *const f32 {
        let (block, stride) = self.parts[kk / KC];
        block[p * stride + (kk % KC) * NR..].as_ptr()
    }
}

/// Packs rows `k0..k0 + kc`, columns `j0..j0 + nc` of an f32 `B` (of depth `k`) into bf16
/// tiles, whatever form sgemm's callers hand it in.
///
/// # Safety
/// As [`pack_a`]; `b` must cover those rows and columns.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_f32_b(
    b: &BSource,
    k: usize,
    k0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    dst: &mut [u16],
    scratch: &mut Vec<f32>,
    parallel: bool,
) {
    let panels = nc.div_ceil(NR);
    match b {
        // Through sgemm's f32 packing (which reads rows and transposed weights fast), then to
        // bf16 pairs: one more pass over a block that the kernel reads many times.
        BSource::Mat(m) => {
            via_f32(kc, nc, dst, scratch, parallel, |f| crate::sgemm::pack_b(*m, k0, kc, j0, nc, f, parallel))
        }
        BSource::Fill(f) => via_f32(kc, nc, dst, scratch, parallel, |s| f(k0, kc, j0, nc, s)),
        BSource::Packed(pb) => {
            assert!(pb.k >= k && pb.n >= j0 + nc, "bgemm: {k}×{} from a packed {}×{}", j0 + nc, pb.k, pb.n);
            let first = pb.block(k0, j0, nc);
            // A block deeper than KC reads its second half from sgemm's next block.
            let second = if kc > KC { pb.block(k0 + KC, j0, nc) } else { first };
            pack_b_rows(&Parts { parts: [first, second] }, kc, panels, dst, parallel);
        }
    }
}

/// A whole `k × n` matrix `B` rounded to bf16 and packed once, in blocks of [`KCB`] depth
/// (each all `n` columns wide): a frozen layer's weight at half the memory of f32.
pub(crate) struct PackedB16 {
    data: Vec<u16>,
    pub(crate) k: usize,
    pub(crate) n: usize,
}

impl PackedB16 {
    /// Packs `b` (`k × n`), over rayon's threads when `parallel`.
    ///
    /// # Safety
    /// `b` must cover `k × n`; the CPU must have a bf16 kernel ([`bf16_kernel`]).
    pub(crate) unsafe fn new(k: usize, n: usize, b: MatRef, parallel: bool) -> Self {
        let panels = n.div_ceil(TN);
        let mut data = vec![0u16; Self::offset(n, k) + 32];
        let skip = data.as_ptr().align_offset(64).min(31);
        let mut scratch = Vec::new();
        for k0 in (0..k).step_by(KCB) {
            let kc = KCB.min(k - k0);
            let at = skip + Self::offset(n, k0);
            let dst = &mut data[at..at + panels * kc.div_ceil(TK) * TILE];
            pack_f32_b(&BSource::Mat(b), k, k0, kc, 0, n, dst, &mut scratch, parallel);
        }
        Self { data, k, n }
    }

    /// Where the block from depth `k0` (a multiple of [`KCB`]) starts, or the length of all
    /// blocks for `k0 = k`.
    fn offset(n: usize, k0: usize) -> usize {
        k0.div_ceil(TK) * n.div_ceil(TN) * TILE
    }

    /// The packed tiles of the block from depth `k0`, from column `j0` (a multiple of 16) on.
    fn block(&self, k0: usize, j0: usize) -> &[u16] {
        let skip = self.data.as_ptr().align_offset(64).min(31);
        let tiles = KCB.min(self.k - k0).div_ceil(TK);
        &self.data[skip + Self::offset(self.n, k0) + (j0 / TN) * tiles * TILE..]
    }

    /// The bf16 values back as f32, row-major `k × n`.
    pub(crate) fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut out = vec![0f32; k * n];
        for k0 in (0..k).step_by(KCB) {
            let tiles = KCB.min(k - k0).div_ceil(TK);
            let block = self.block(k0, 0);
            for kk in 0..KCB.min(k - k0) {
                for j in 0..n {
                    let tile = &block[((j / TN) * tiles + kk / TK) * TILE..];
                    out[(k0 + kk) * n + j] = from_bf16(tile[(kk % TK) / 2 * 2 * TN + (j % TN) * 2 + kk % 2]);
                }
            }
        }
        out
    }
}

/// `B` for [`bgemm`]: f32 to round while packing, or packed in bf16 ahead of time.
pub(crate) enum BInput<'a> {
    F32(BSource<'a>),
    Bf16(&'a PackedB16),
}

/// `C = α·A·B`, or `C = α·A·B + C` when `accumulate`, in bf16 with f32 sums (see the module);
/// the arguments as [`crate::sgemm::sgemm`]'s.
///
/// # Safety
/// As [`crate::sgemm::sgemm`]; the CPU must have `kernel`'s instructions ([`bf16_kernel`]).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bgemm(
    kernel: Bf16Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BInput<'_>,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if crate::sgemm::empty_product(m, n, k, c, ldc, accumulate) {
        return;
    }
    let threads = if parallel && m * n.min(NCB) * k.min(KCB) >= 1 << 20 { rayon::current_num_threads() } else { 1 };
    let mblocks = m.div_ceil(MCB);
    let mb = m.div_ceil(mblocks).div_ceil(2 * TM) * 2 * TM;
    let mblocks = m.div_ceil(mb);
    let c = crate::flex::SharedMut(c);
    let (mut bbuf, mut fbuf, mut abuf) = (Vec::new(), Vec::new(), Vec::new());
    for j0 in (0..n).step_by(NCB) {
        let nc = NCB.min(n - j0);
        let panels = nc.div_ceil(TN);
        let jchunks = if threads > 1 { (4 * threads).div_ceil(mblocks).min(panels.div_ceil(2)) } else { 1 };
        let per_chunk = panels.div_ceil(jchunks).div_ceil(2) * 2;
        let jchunks = panels.div_ceil(per_chunk);
        for k0 in (0..k).step_by(KCB) {
            let kc = KCB.min(k - k0);
            let tiles = kc.div_ceil(TK);
            let bpack: &[u16] = match &b {
                BInput::Bf16(pb) => {
                    assert!(pb.k == k && pb.n >= n, "bgemm: {k}×{n} from a bf16-packed {}×{}", pb.k, pb.n);
                    pb.block(k0, j0)
                }
                BInput::F32(b) => {
                    let bpack = aligned(&mut bbuf, panels * tiles * TILE);
                    pack_f32_b(b, k, k0, kc, j0, nc, bpack, &mut fbuf, parallel);
                    bpack
                }
            };
            let apack = aligned(&mut abuf, mblocks * mb * tiles * TK);
            let pack = |(ib, d): (usize, &mut [u16])| {
                // SAFETY: rows ib·mb.. and columns k0..k0+kc of A exist.
                unsafe { pack_a(a, ib * mb, mb.min(m - ib * mb), k0, kc, alpha, d) }
            };
            if threads > 1 {
                apack.par_chunks_mut(mb * tiles * TK).enumerate().for_each(pack);
            } else {
                apack.chunks_mut(mb * tiles * TK).enumerate().for_each(pack);
            }
            let (apack, bpack): (&[u16], &[u16]) = (apack, bpack);
            let acc = accumulate || k0 > 0;
            let task = |t: usize| {
                let (ib, jb) = (t / jchunks, t % jchunks);
                let (i0, mc) = (ib * mb, mb.min(m - ib * mb));
                let a_block = &apack[ib * mb * tiles * TK..];
                #[allow(clippy::redundant_locals)]
                let c = c;
                let (p0, p_end) = (jb * per_chunk, ((jb + 1) * per_chunk).min(panels));
                // SAFETY: tasks write disjoint tiles of C (their rows × their panels); the
                // packs hold whole tiles for every micropanel and panel read.
                unsafe {
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Bf16Kernel::Amx => {
                            amx::start();
                            for p in (p0..p_end).step_by(2) {
                                let col = j0 + p * TN;
                                let cols = (2 * TN).min(j0 + nc - col);
                                let b0 = bpack[p * tiles * TILE..].as_ptr();
                                let b1 = if p + 1 < panels { bpack[(p + 1) * tiles * TILE..].as_ptr() } else { b0 };
                                for q in (0..mc.div_ceil(TM)).step_by(2) {
                                    let rows = (2 * TM).min(mc - q * TM);
                                    let a0 = a_block[q * tiles * TILE..].as_ptr();
                                    let a1 = if rows > TM { a_block[(q + 1) * tiles * TILE..].as_ptr() } else { a0 };
                                    let dst = c.0.add((i0 + q * TM) * ldc + col);
                                    amx::block(tiles, a0, a1, b0, b1, dst, ldc, rows, cols, acc);
                                }
                            }
                            amx::end();
                        }
                        #[cfg(target_arch = "x86_64")]
                        Bf16Kernel::Avx512Bf16 => {
                            for p in (p0..p_end).step_by(2) {
                                let col = j0 + p * TN;
                                let cols = (2 * TN).min(j0 + nc - col);
                                let b0 = bpack[p * tiles * TILE..].as_ptr();
                                let b1 = if p + 1 < panels { bpack[(p + 1) * tiles * TILE..].as_ptr() } else { b0 };
                                for q in 0..mc.div_ceil(TM) {
                                    let rows = TM.min(mc - q * TM);
                                    let ap = a_block[q * tiles * TILE..].as_ptr();
                                    for r0 in (0..rows).step_by(DP_ROWS) {
                                        let dst = c.0.add((i0 + q * TM + r0) * ldc + col);
                                        let (ar, rr) = (ap.add(r0 * TK), DP_ROWS.min(rows - r0));
                                        x86::dp_block(tiles, ar, b0, b1, dst, ldc, rr, cols, acc);
                                    }
                                }
                            }
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        _ => unreachable!("no bf16 kernel off x86-64"),
                    }
                }
            };
            let tasks = mblocks * jchunks;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    }
}

/// The AVX-512 code: packing conversions and the `vdpbf16ps` kernel.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{DP_ROWS, TILE, TK, TN};

    /// 32 floats from `src` times `alpha` as 32 bf16 at `dst`, in order.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn row32(src: *const f32, alpha: f32, dst: *mut u16) {
        let s = _mm512_set1_ps(alpha);
        let lo = _mm512_mul_ps(_mm512_loadu_ps(src), s);
        let hi = _mm512_mul_ps(_mm512_loadu_ps(src.add(16)), s);
        // cvtne2ps puts its second operand in the low half.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.cast(), v);
    }

    /// Two rows of 16 floats as 16 bf16 pairs `(lo[j], hi[j])` at `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave16(lo: *const f32, hi: *const f32, dst: *mut u16) {
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi), _mm512_loadu_ps(lo)));
        // Lane 2j takes lo's j (element j), lane 2j + 1 hi's j (element 16 + j).
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_storeu_si512(dst.cast(), _mm512_permutexvar_epi16(idx, v));
    }

    /// `C (+)= A·B` for an 8×32 block over `tiles` depth tiles: rows `a` (8 consecutive rows
    /// of a packed micropanel, whose tile rows lie 32 bf16 apart) against panels `b0` and `b1`
    /// (16 columns each), stored into its `rows × cols` corner of `c`. Two `B` loads and eight
    /// broadcasts feed 16 `vdpbf16ps` (a 16×16 block needed a broadcast per product).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dp_block(
        tiles: usize,
        a: *const u16,
        b0: *const u16,
        b1: *const u16,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; DP_ROWS];
        for t in 0..tiles {
            let (at, bt0, bt1) = (a.add(t * TILE), b0.add(t * TILE), b1.add(t * TILE));
            for pair in 0..TK / 2 {
                let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bt0.add(pair * 2 * TN).cast()));
                let v1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bt1.add(pair * 2 * TN).cast()));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let va: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        at.add(i * TK + 2 * pair).cast::<i32>().read_unaligned(),
                    ));
                    acc[0] = _mm512_dpbf16_ps(acc[0], va, v0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], va, v1);
                }
            }
        }
        let mask = |w: usize| -> __mmask16 {
            if w >= 16 {
                0xffff
            } else {
                (1u16 << w) - 1
            }
        };
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (s, v) in row.iter().enumerate() {
                if cols <= s * TN {
                    break;
                }
                let (m, dst) = (mask(cols - s * TN), c.add(i * ldc + s * TN));
                let v = if accumulate { _mm512_add_ps(*v, _mm512_maskz_loadu_ps(m, dst)) } else { *v };
                _mm512_mask_storeu_ps(dst, m, v);
            }
        }
    }
}

/// The AMX-BF16 kernel, in inline assembly. Tile registers: `tmm0`–`tmm3` the 2×2 tiles of
/// `C`, `tmm4`/`tmm5` the two row tiles of `A`, `tmm6`/`tmm7` the two column tiles of `B`; all
/// 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use super::{TILE, TM, TN};

    /// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    static CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row
            c[48 + t] = 16; // rows
            t += 1;
        }
        Config(c)
    };

    /// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22) and the
    /// kernel lends this process the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`, which Linux requires before the first tile instruction).
    pub(super) fn available() -> bool {
        // Leaf 7 exists on every CPU with AVX-512 (checked by the caller).
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for a permission; it changes no memory of ours.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// Loads the tile configuration on this thread (the tiles are per-thread state).
    ///
    /// # Safety
    /// [`available`] must have returned true.
    pub(super) unsafe fn start() {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    /// Releases the tiles (a thread with tiles in use saves 8 KiB more on every switch).
    pub(super) unsafe fn end() {
        asm!("tilerelease", options(nostack, nomem));
    }

    macro_rules! load {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
                options(nostack, readonly))
        };
    }
    macro_rules! store {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride,
                options(nostack))
        };
    }
    macro_rules! zero {
        ($t:literal) => {
            asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
        };
    }
    macro_rules! dot {
        ($c:literal, $a:literal, $b:literal) => {
            asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
        };
    }

    /// A `C` tile in or out: straight from `c` when whole, else through `scratch`.
    unsafe fn c_tile(
        t: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        scratch: &mut [f32; TM * TN],
        load: bool,
    ) {
        let whole = rows >= TM && cols >= TN;
        let (p, stride) = if whole { (c, ldc * 4) } else { (scratch.as_mut_ptr(), TN * 4) };
        if load {
            if !whole {
                scratch.fill(0.0);
                for i in 0..rows.min(TM) {
                    std::ptr::copy_nonoverlapping(c.add(i * ldc), scratch[i * TN..].as_mut_ptr(), cols.min(TN));
                }
            }
            match t {
                0 => load!(0, p, stride),
                1 => load!(1, p, stride),
                2 => load!(2, p, stride),
                _ => load!(3, p, stride),
            }
        } else {
            match t {
                0 => store!(0, p, stride),
                1 => store!(1, p, stride),
                2 => store!(2, p, stride),
                _ => store!(3, p, stride),
            }
            if !whole {
                for i in 0..rows.min(TM) {
                    std::ptr::copy_nonoverlapping(scratch[i * TN..].as_ptr(), c.add(i * ldc), cols.min(TN));
                }
            }
        }
    }

    /// `C (+)= A·B` for the `rows × cols` (up to 32×32) block at `c`: micropanels `a0`, `a1`
    /// (the second read when `rows > 16`) and panels `b0`, `b1` (when `cols > 16`), over
    /// `tiles` depth tiles.
    ///
    /// # Safety
    /// [`start`] on this thread; the packs hold `tiles` whole tiles each.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        tiles: usize,
        a0: *const u16,
        a1: *const u16,
        b0: *const u16,
        b1: *const u16,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let (two_rows, two_cols) = (rows > TM, cols > TN);
        let mut scratch = [0f32; TM * TN];
        // Tile (r, s) is C's rows 16r.., columns 16s..
        let corner = |r: usize, s: usize| (c.add(r * TM * ldc + s * TN), rows - r * TM, cols - s * TN);
        let tiles_used = [(0, 0, true), (0, 1, two_cols), (1, 0, two_rows), (1, 1, two_rows && two_cols)];
        for (t, &(r, s, used)) in tiles_used.iter().enumerate() {
            if !used {
                continue;
            }
            if accumulate {
                let (p, rr, cc) = corner(r, s);
                c_tile(t, p, ldc, rr, cc, &mut scratch, true);
            } else {
                match t {
                    0 => zero!(0),
                    1 => zero!(1),
                    2 => zero!(2),
                    _ => zero!(3),
                }
            }
        }
        let stride = 64usize;
        if two_rows && two_cols {
            for t in 0..tiles {
                load!(4, a0.add(t * TILE), stride);
                load!(6, b0.add(t * TILE), stride);
                load!(5, a1.add(t * TILE), stride);
                load!(7, b1.add(t * TILE), stride);
                dot!(0, 4, 6);
                dot!(1, 4, 7);
                dot!(2, 5, 6);
                dot!(3, 5, 7);
            }
        } else {
            for t in 0..tiles {
                load!(4, a0.add(t * TILE), stride);
                load!(6, b0.add(t * TILE), stride);
                dot!(0, 4, 6);
                if two_cols {
                    load!(7, b1.add(t * TILE), stride);
                    dot!(1, 4, 7);
                }
                if two_rows {
                    load!(5, a1.add(t * TILE), stride);
                    dot!(2, 5, 6);
                }
            }
        }
        for (t, &(r, s, used)) in tiles_used.iter().enumerate() {
            if used {
                let (p, rr, cc) = corner(r, s);
                c_tile(t, p, ldc, rr, cc, &mut scratch, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sgemm::PackedB;

    fn rand(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The product of the bf16-rounded operands in f64, and the sum of |a·b| per entry (the
    /// scale of f32's summation error).
    #[allow(clippy::too_many_arguments)]
    fn exact(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        ars: usize,
        acs: usize,
        b: &[f32],
        brs: usize,
        bcs: usize,
        alpha: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut c = vec![0f64; m * n];
        let mut s = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    let p = r(alpha * a[i * ars + kk * acs]) * r(b[kk * brs + j * bcs]);
                    c[i * n + j] += p;
                    s[i * n + j] += p.abs();
                }
            }
        }
        (c, s)
    }

    fn kernels() -> Vec<Bf16Kernel> {
        match bf16_kernel() {
            None => vec![],
            Some(Bf16Kernel::Amx) => vec![Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16],
            Some(k) => vec![k],
        }
    }

    /// The bf16 pack holds the rounded matrix, in the order the kernels read it.
    #[test]
    fn packed_bf16_unpacks_to_the_rounded_matrix() {
        if bf16_kernel().is_none() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(k, n) in &[(1, 1), (33, 17), (1100, 40)] {
            let b = rand(k * n, 9);
            // SAFETY: b covers k × n; the CPU has a bf16 kernel.
            let p = unsafe { PackedB16::new(k, n, MatRef::new(b.as_ptr(), n, 1), true) };
            let want: Vec<f32> = b.iter().map(|&x| from_bf16(to_bf16(x))).collect();
            assert_eq!(p.unpack(), want, "{k}×{n}");
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(to_bf16(-1e-40), 0x8000);
        assert_eq!(to_bf16(f32::from_bits(0x007f_ffff)), 0);
    }

    /// The vector conversions of both packings (A's 32-wide rows, B's interleaved pairs) give
    /// the scalar rounding's bits on ties, NaN, infinities, subnormals and overflow.
    #[test]
    fn vector_and_scalar_rounding_agree() {
        if bf16_kernel().is_none() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let specials = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 1.0 / 256.0),
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            f32::from_bits(0x007f_ffff),
            f32::MAX,
            -0.0,
            f32::MIN_POSITIVE,
        ];
        let v: Vec<f32> = (0..64).map(|i| specials[i % specials.len()]).collect();
        let scalar: Vec<u16> = v.iter().map(|&x| to_bf16(x)).collect();
        // A: two 32-wide rows through `row32`.
        let mut dst = vec![0u16; TILE];
        // SAFETY: v holds 2 × 32 floats; the CPU has AVX512-BF16.
        unsafe { pack_a(MatRef::new(v.as_ptr(), 32, 1), 0, 2, 0, 32, 1.0, &mut dst) };
        assert_eq!(&dst[..64], &scalar[..], "A's packing");
        // B: 4 rows of 16 through `interleave16`, back in row-major order.
        // SAFETY: as above, 4 × 16.
        let p = unsafe { PackedB16::new(4, 16, MatRef::new(v.as_ptr(), 16, 1), false) };
        let back: Vec<u32> = p.unpack().iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = scalar.iter().map(|&h| from_bf16(h).to_bits()).collect();
        assert_eq!(back, want, "B's packing");
    }

    /// Every kernel this CPU has, every source of `B`, edges in all three dimensions, more than
    /// one block of depth (KCB) and of columns (NCB), α ≠ 1 and accumulation: the result is the
    /// product of the bf16-rounded operands up to f32 summation error. Skips (and says so) on
    /// CPUs without AVX512-BF16.
    #[test]
    fn matches_the_exact_product_of_the_rounded_operands() {
        if kernels().is_empty() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for kernel in kernels() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (16, 16, 32),
                (17, 33, 31),
                (40, 70, 600),
                (150, 2100, 40),
                (33, 17, 1100),
                (5, 300, 7),
                (20, 40, 300),
                (20, 40, 700),
            ] {
                for &(ta, tb) in &[(false, false), (true, true)] {
                    let a = rand(m * k, 1);
                    let b = rand(k * n, 2);
                    let (ars, acs) = if ta { (1, m) } else { (k, 1) };
                    let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
                    let alpha = 0.75;
                    let (want, scale) = exact(m, n, k, &a, ars, acs, &b, brs, bcs, alpha);
                    let ldc = n + 3;
                    // One row more than C: a write past row m shows.
                    let prior = rand((m + 1) * ldc, 3);
                    // sgemm's pack is deeper and wider than the product: only its top-left is read.
                    let (kb, nb) = (k + 50, n + 20);
                    let bbig = crate::sgemm::tests::embed(&b, brs, bcs, k, n, kb, nb, &rand(kb * nb, 4));
                    let packed = PackedB::new(kb, nb, MatRef::new(bbig.as_ptr(), nb, 1), false);
                    // SAFETY: b covers k × n; the CPU has a bf16 kernel (checked above).
                    let packed16 = unsafe { PackedB16::new(k, n, MatRef::new(b.as_ptr(), brs, bcs), k % 2 == 0) };
                    let sources = [
                        (0, false, false),
                        (0, true, true),
                        (1, false, true),
                        (1, true, false),
                        (2, true, false),
                        (2, false, true),
                    ];
                    for (source, accumulate, parallel) in sources {
                        let mut c = prior.clone();
                        let bs = match source {
                            0 => BInput::F32(BSource::Mat(MatRef::new(b.as_ptr(), brs, bcs))),
                            1 => BInput::F32(BSource::Packed(&packed)),
                            _ => BInput::Bf16(&packed16),
                        };
                        // SAFETY: a, b and c cover their matrices; the kernel is this CPU's.
                        unsafe {
                            bgemm(
                                kernel,
                                m,
                                n,
                                k,
                                MatRef::new(a.as_ptr(), ars, acs),
                                bs,
                                c.as_mut_ptr(),
                                ldc,
                                alpha,
                                accumulate,
                                parallel,
                            )
                        };
                        assert_eq!(c[m * ldc..], prior[m * ldc..], "{kernel:?} wrote past row {m}");
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j] as f64;
                                if j >= n {
                                    assert_eq!(got, prior[i * ldc + j] as f64, "{kernel:?} wrote past column {n}");
                                    continue;
                                }
                                let base = if accumulate { prior[i * ldc + j] as f64 } else { 0.0 };
                                let w = want[i * n + j] + base;
                                let tol = 1e-6 * (scale[i * n + j] + base.abs()) + 1e-30;
                                assert!(
                                    (got - w).abs() <= tol,
                                    "{kernel:?} {m}×{n}×{k} ta {ta} source {source} acc {accumulate}: ({i}, {j}) {got} against {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
