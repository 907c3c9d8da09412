//! Single-precision GEMM, `C = α·A·B (+ C)` with `C` row-major, laid out the BLIS way.
//!
//! Why not the `gemm` crate that burn-flex uses: on AVX2 its f32 microkernel reads one
//! operand unpacked through a chain of address additions, and reached about 40 % of the FMA
//! peak inside the UNet (2-core AMD EPYC, Zen 3); this one about 50 % there and 66 % alone.
//! Here both operands are packed into the order the microkernel reads them (a 6×16 tile of
//! `C` in twelve registers; per step two vector loads of `B` and six broadcasts of `A`),
//! blocked so that a `B` micropanel (256×16) stays in L1 and an `A` block (up to 144×256) in
//! L2. Callers can hand over `B` already packed (the keys
//! and values of an attention head, packed once for all query blocks; a frozen layer's weight,
//! packed at load) or a function that
//! writes it packed (im2col straight into the layout, with no buffer of its own).

use rayon::prelude::*;

use crate::bgemm::BInput;

/// Rows of a microkernel tile (broadcasts of `A`).
pub(crate) const MR: usize = 6;
/// Columns of a microkernel tile (two 8-float vectors of `B`).
pub(crate) const NR: usize = 16;
/// Depth of a block: a 256×16 `B` micropanel is 16 KiB, half of L1.
pub(crate) const KC: usize = 256;
/// Rows of an `A` block: 144×256 floats is 144 KiB, well inside L2.
const MC: usize = 144;
/// Columns of a `B` block: 256×4096 floats is 4 MiB, inside L3.
const NC: usize = 4096;
/// Whether the AVX-512 kernels take two `B` micropanels (12×32 tiles) or one (12×16). On the
/// Sapphire Rapids Xeon measured, 12×16 ran at 140 GFLOP/s on 1024³ (2 cores) and 12×32 at
/// 100: off, but kept (and tested) for CPUs where the wider tile wins.
static WIDE_TWO_PANELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A read-only matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
    /// As `A`: always read in place, never packed (see [`MatRef::in_place`]).
    pub in_place: bool,
}
// SAFETY: only read, while the slice it points into is borrowed by the caller.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    pub(crate) fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs, in_place: false }
    }

    /// A row-major `A` (column stride 1) that the GEMM reads where it lies instead of packing:
    /// for a weight met once per call, where packing would copy all of it.
    pub(crate) fn in_place(ptr: *const f32, rs: usize) -> Self {
        Self { ptr, rs, cs: 1, in_place: true }
    }
}

/// Fills the packed block of `B` for rows `k0..k0 + kc` and columns `j0..j0 + nc` (see
/// [`pack_b`] for the layout).
pub(crate) type FillB<'a> = &'a (dyn Fn(usize, usize, usize, usize, &mut [f32]) + Sync);

/// Where the packed blocks of `B` come from.
pub(crate) enum BSource<'a> {
    /// A matrix, packed block by block.
    Mat(MatRef),
    /// All of `B`, packed ahead of time.
    Packed(&'a PackedB),
    /// A function that writes each block packed.
    Fill(FillB<'a>),
}

/// `len` floats of `buf` starting on a 64-byte boundary: the microkernel's two 32-byte loads
/// per step then never straddle cache lines (a split load costs two).
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.is_empty() {
        // Zeroed by the allocator: a large buffer comes as fresh zero pages, not written twice.
        *buf = vec![0.0; len + 16];
    } else if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let skip = buf.as_ptr().align_offset(64).min(15);
    &mut buf[skip..skip + len]
}

/// A whole `k × n` matrix `B` in packed blocks, for reuse across several products, also of
/// its top-left parts (fewer rows or columns).
pub(crate) struct PackedB {
    data: Vec<f32>,
    pub(crate) k: usize,
    pub(crate) n: usize,
}

impl PackedB {
    /// Packs `b` (`k × n`) once; `parallel` spreads the packing over rayon's threads.
    pub(crate) fn new(k: usize, n: usize, b: MatRef, parallel: bool) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = Vec::new();
        let all = aligned(&mut data, k * panels * NR);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let block = &mut all[k0 * panels * NR..(k0 + kc) * panels * NR];
            // SAFETY: the caller's `b` covers k × n.
            unsafe { pack_b(b, k0, kc, 0, n, block, parallel) };
        }
        Self { data, k, n }
    }

    /// The matrix back, row-major `k × n`.
    pub(crate) fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut b = vec![0f32; k * n];
        for k0 in (0..k).step_by(KC) {
            let (block, panel) = self.block(k0, 0, n);
            for (kk, row) in b[k0 * n..].chunks_exact_mut(n).take(KC.min(k - k0)).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = block[(j / NR) * panel + kk * NR + j % NR];
                }
            }
        }
        b
    }

    fn all(&self) -> &[f32] {
        let skip = self.data.as_ptr().align_offset(64).min(15);
        &self.data[skip..skip + self.k * self.n.div_ceil(NR) * NR]
    }

    /// The packed block from row `k0` (a multiple of [`KC`]), columns `j0..j0 + nc` (`j0` a
    /// multiple of [`NR`]), and the distance between its panels: its panels are contiguous
    /// inside the block of all columns, each as deep as the block was packed (a product over
    /// fewer rows reads the top of each).
    pub(crate) fn block(&self, k0: usize, j0: usize, nc: usize) -> (&[f32], usize) {
        let kc = KC.min(self.k - k0);
        let base = k0 * self.n.div_ceil(NR) * NR;
        (&self.all()[base + j0 * kc..base + (j0 + nc).div_ceil(NR) * NR * kc], kc * NR)
    }
}

/// Packs rows `k0..k0 + kc`, columns `j0..j0 + nc` of `b` into `dst`: panel `p` (columns
/// `j0 + 16p..`) holds, for each row in turn, its 16 entries (zeros past column `j0 + nc`).
///
/// # Safety
/// `b` must cover those rows and columns; `dst` holds `kc · ⌈nc/16⌉ · 16` floats.
pub(crate) unsafe fn pack_b(b: MatRef, k0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32], parallel: bool) {
    // A group of panels at a time: with rows contiguous (b.cs == 1) each source row is read
    // along 8 panels (512 bytes) before the next, instead of 64 bytes per row jump.
    const GROUP: usize = 8;
    let group = |(g, d): (usize, &mut [f32])| {
        #[allow(clippy::redundant_locals)]
        let b = b; // the whole MatRef (Sync), not its raw pointer field
        let c0 = j0 + g * GROUP * NR;
        let width = (GROUP * NR).min(j0 + nc - c0);
        // SAFETY: rows k0..k0+kc and columns c0..c0+width lie inside `b` (caller's contract).
        unsafe {
            if !width.is_multiple_of(NR) {
                d.fill(0.0);
            }
            if b.cs == 1 {
                for kk in 0..kc {
                    let src = b.ptr.add((k0 + kk) * b.rs + c0);
                    for p in 0..width.div_ceil(NR) {
                        let to = d.as_mut_ptr().add(p * kc * NR + kk * NR);
                        let cols = NR.min(width - p * NR);
                        if cols == NR {
                            std::ptr::copy_nonoverlapping(src.add(p * NR), to, NR);
                        } else {
                            std::ptr::copy_nonoverlapping(src.add(p * NR), to, cols);
                        }
                    }
                }
            } else {
                // Columns contiguous (b.rs == 1, a transposed weight): 8 columns × 8 rows at
                // a time through an 8×8 transpose, whole panels only.
                let mut full = 0;
                #[cfg(target_arch = "x86_64")]
                if b.rs == 1 && avx2_ok() {
                    full = width / NR * NR;
                    let steps = kc / 8 * 8;
                    for j8 in (0..full).step_by(8) {
                        let col = |r: usize| b.ptr.add(k0 + (c0 + j8 + r) * b.cs);
                        let src = [col(0), col(1), col(2), col(3), col(4), col(5), col(6), col(7)];
                        let to = d.as_mut_ptr().add((j8 / NR) * kc * NR + j8 % NR);
                        for kk in (0..steps).step_by(8) {
                            avx2::transpose8(src.map(|p| p.add(kk)), to.add(kk * NR), NR);
                        }
                        #[allow(clippy::needless_range_loop)] // r indexes the source and the target
                        for r in 0..8 {
                            for kk in steps..kc {
                                *to.add(kk * NR + r) = *src[r].add(kk);
                            }
                        }
                    }
                }
                for j in full..width {
                    let col = b.ptr.add(k0 * b.rs + (c0 + j) * b.cs);
                    let d = &mut d[(j / NR) * kc * NR + j % NR..];
                    for kk in 0..kc {
                        d[kk * NR] = *col.add(kk * b.rs);
                    }
                }
            }
        }
    };
    let dst = &mut dst[..kc * nc.div_ceil(NR) * NR];
    if parallel {
        dst.par_chunks_mut(kc * NR * GROUP).enumerate().for_each(group);
    } else {
        dst.chunks_mut(kc * NR * GROUP).enumerate().for_each(group);
    }
}

/// Packs rows `i0..i0 + mc`, columns `k0..k0 + kc` of `a` into `dst`: micropanel `q` (rows
/// `i0 + 6q..`) holds, for each column in turn, its 6 entries (zeros past row `i0 + mc`).
///
/// # Safety
/// `a` must cover those rows and columns.
unsafe fn pack_a(a: MatRef, i0: usize, mc: usize, k0: usize, kc: usize, dst: &mut Vec<f32>) {
    let panels = mc.div_ceil(MR);
    dst.clear();
    dst.reserve(panels * kc * MR + 8);
    let d = dst.as_mut_ptr();
    for q in 0..panels {
        let rows = MR.min(mc - q * MR);
        let d = d.add(q * kc * MR);
        let row = |ii: usize| a.ptr.add((i0 + q * MR + ii.min(rows - 1)) * a.rs + k0 * a.cs);
        if rows == MR && a.cs == 1 {
            let r = [row(0), row(1), row(2), row(3), row(4), row(5)];
            // Eight steps at a time through an 8×8 transpose (rows 6 and 7 repeat row 0): each
            // store of 8 floats at d + 6·kk leaves 2 stray ones that the next store (or the
            // next panel, written after; or the slack past the end) takes.
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if avx2_ok() {
                done = kc / 8 * 8;
                for kk in (0..done).step_by(8) {
                    let src = [r[0], r[1], r[2], r[3], r[4], r[5], r[0], r[0]].map(|p| p.add(kk));
                    avx2::transpose8(src, d.add(kk * MR), MR);
                }
            }
            for kk in done..kc {
                for (ii, r) in r.iter().enumerate() {
                    *d.add(kk * MR + ii) = *r.add(kk);
                }
            }
        } else {
            for kk in 0..kc {
                for ii in 0..MR {
                    *d.add(kk * MR + ii) = if ii < rows { *row(ii).add(kk * a.cs) } else { 0.0 };
                }
            }
        }
    }
    dst.set_len(panels * kc * MR);
}

/// `C = α·A·B`, or `C = α·A·B + C` when `accumulate`; `A` is `m × k`, `B` `k × n`, `C` `m × n`
/// row-major with row stride `ldc`. `parallel` spreads the work over rayon's threads (leave it
/// off when the caller is already parallel).
///
/// # Safety
/// `a`, `b` (or the fill function) and `c` must cover their matrices; no other thread may
/// touch `C` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BSource<'_>,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if empty_product(m, n, k, c, ldc, accumulate) {
        return;
    }
    let kernel = kernel_fn();
    // Under about 2 MFLOP per block, forking costs more than it saves.
    let threads = if parallel && m * n.min(NC) * k.min(KC) >= 1 << 20 { rayon::current_num_threads() } else { 1 };
    // Row blocks of equal size (a multiple of MR), at most MC.
    let mblocks = m.div_ceil(MC);
    let mb = m.div_ceil(mblocks).div_ceil(MR) * MR;
    let mblocks = m.div_ceil(mb);
    let c = crate::flex::SharedMut(c);
    let mut bbuf = Vec::new();
    let mut apacks: Vec<Vec<f32>> = Vec::new();
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        let panels = nc.div_ceil(NR);
        // Enough tasks for the threads to balance: split the columns when rows are few.
        let jchunks = if threads > 1 { (4 * threads).div_ceil(mblocks).min(panels) } else { 1 };
        let per_chunk = panels.div_ceil(jchunks);
        let jchunks = panels.div_ceil(per_chunk);
        // Packing A costs about as much as using it against a few panels of B: with rows
        // already contiguous, the kernel then reads them where they are.
        let direct = a.cs == 1 && (a.in_place || per_chunk < 8);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (block, panel_stride): (&[f32], usize) = match &b {
                BSource::Packed(p) => {
                    assert!(p.k >= k && p.n >= n, "sgemm: {k}×{n} from a packed {}×{}", p.k, p.n);
                    p.block(k0, j0, nc)
                }
                BSource::Mat(bm) => {
                    let buf = aligned(&mut bbuf, panels * kc * NR);
                    pack_b(*bm, k0, kc, j0, nc, buf, parallel);
                    (buf, kc * NR)
                }
                BSource::Fill(f) => {
                    let buf = aligned(&mut bbuf, panels * kc * NR);
                    f(k0, kc, j0, nc, buf);
                    (buf, kc * NR)
                }
            };
            let acc = accumulate || k0 > 0;
            // When several column chunks share a row block, its A is packed once for all of
            // them (in parallel over row blocks) instead of once per task.
            let shared = !direct && jchunks > 1;
            if shared {
                apacks.resize_with(mblocks, Vec::new);
                let pack = |(ib, v): (usize, &mut Vec<f32>)| {
                    // SAFETY: rows ib·mb.. and columns k0..k0+kc of A exist.
                    unsafe { pack_a(a, ib * mb, mb.min(m - ib * mb), k0, kc, v) }
                };
                if threads > 1 {
                    apacks.par_iter_mut().enumerate().for_each(pack);
                } else {
                    apacks.iter_mut().enumerate().for_each(pack);
                }
            }
            let apacks = &apacks;
            let task = |t: usize, apack: &mut Vec<f32>| {
                let (ib, jb) = (t / jchunks, t % jchunks);
                let i0 = ib * mb;
                let mc = mb.min(m - i0);
                // SAFETY: rows i0..i0+mc and columns k0..k0+kc of A exist; tasks write
                // disjoint tiles of C (their own rows × their own panels).
                unsafe {
                    let apack: &Vec<f32> = if shared {
                        &apacks[ib]
                    } else {
                        if !direct {
                            pack_a(a, i0, mc, k0, kc, apack);
                        }
                        apack
                    };
                    // The whole Sync wrapper, not its raw pointer field.
                    #[allow(clippy::redundant_locals)]
                    let c = c;
                    let (p_end, mut p) = (((jb + 1) * per_chunk).min(panels), jb * per_chunk);
                    while p < p_end {
                        let bp = block[p * panel_stride..].as_ptr();
                        let col = j0 + p * NR;
                        let cols = NR.min(j0 + nc - col);
                        // Where the CPU has the registers (AVX-512's 32), tiles of two
                        // micropanels of A (12 rows; their packed A is contiguous) against two
                        // of B (32 columns, `panel_stride` apart).
                        if let Some(wide) = kernel.wide {
                            let two = WIDE_TWO_PANELS.load(std::sync::atomic::Ordering::Relaxed) && p + 1 < p_end;
                            let cols = if two { (2 * NR).min(j0 + nc - col) } else { cols };
                            for q in (0..mc.div_ceil(MR)).step_by(2) {
                                let rows = (2 * MR).min(mc - q * MR);
                                let dst = c.0.add((i0 + q * MR) * ldc + col);
                                if direct {
                                    let ap = a.ptr.add((i0 + q * MR) * a.rs + k0);
                                    (wide.direct)(kc, ap, a.rs, bp, panel_stride, dst, ldc, rows, cols, alpha, acc);
                                } else {
                                    let ap = apack.as_ptr().add(q * kc * MR);
                                    (wide.packed)(kc, ap, bp, panel_stride, dst, ldc, rows, cols, alpha, acc);
                                }
                            }
                            p += if two { 2 } else { 1 };
                            continue;
                        }
                        p += 1;
                        let mut q = 0;
                        while q < mc.div_ceil(MR) {
                            let rows = MR.min(mc - q * MR);
                            let dst = c.0.add((i0 + q * MR) * ldc + col);
                            if direct {
                                let ap = a.ptr.add((i0 + q * MR) * a.rs + k0);
                                kernel.direct(kc, ap, a.rs, bp, dst, ldc, rows, cols, alpha, acc);
                            } else {
                                kernel.packed(
                                    kc,
                                    apack.as_ptr().add(q * kc * MR),
                                    bp,
                                    dst,
                                    ldc,
                                    rows,
                                    cols,
                                    alpha,
                                    acc,
                                );
                            }
                            q += 1;
                        }
                    }
                }
            };
            let tasks = mblocks * jchunks;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each_init(Vec::new, |apack, t| task(t, apack));
            } else {
                let mut apack = Vec::new();
                for t in 0..tasks {
                    task(t, &mut apack);
                }
            }
        }
    }
}

/// The products with nothing to multiply: none for `m` or `n` zero, zeros (or `C` as it is,
/// when accumulating) for `k` zero. Returns whether the product was one of them.
///
/// # Safety
/// As [`sgemm`].
pub(crate) unsafe fn empty_product(m: usize, n: usize, k: usize, c: *mut f32, ldc: usize, accumulate: bool) -> bool {
    if m > 0 && n > 0 && k == 0 && !accumulate {
        for i in 0..m {
            std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
        }
    }
    m == 0 || n == 0 || k == 0
}

/// The GEMM of the layers that follow `--dtype` (convolutions, linear layers, attention): an
/// f32 `B` runs [`sgemm`], or [`crate::bgemm::bgemm`] when [`crate::use_bf16_gemm`] switched
/// bf16 on; a bf16-packed `B` always runs `bgemm`.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
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
    let kernel = match &b {
        BInput::F32(_) => crate::bgemm::active(),
        BInput::Bf16(_) => Some(crate::bgemm::bf16_kernel().expect("bf16-packed on a CPU with a bf16 kernel")),
    };
    match (kernel, b) {
        (None, BInput::F32(b)) => sgemm(m, n, k, a, b, c, ldc, alpha, accumulate, parallel),
        (Some(kernel), b) => crate::bgemm::bgemm(kernel, m, n, k, a, b, c, ldc, alpha, accumulate, parallel),
        (None, BInput::Bf16(_)) => unreachable!("a bf16 B always has a kernel"),
    }
}

/// The microkernels for this CPU: each computes the `rows × cols` corner of the 6×16 tile
/// `α·A·B` over depth `kc` against a packed `B` micropanel and stores it into (or adds it to)
/// `c`. `packed` reads a packed `A` micropanel; `direct` reads 6 rows of `A` (row stride `lda`,
/// contiguous along `k`; rows past `rows` read the last row again, their sums dropped).
#[derive(Clone, Copy)]
struct Kernels {
    packed: PackedKernel,
    direct: DirectKernel,
    /// The same for 12-row tiles (two micropanels of A against one of B), where the CPU has
    /// the registers: AVX-512's 32.
    wide: Option<WideKernels>,
    name: &'static str,
}

#[derive(Clone, Copy)]
struct WideKernels {
    packed: WidePacked,
    direct: WideDirect,
}

/// As [`PackedKernel`], with the stride between `B`'s two micropanels after the panel pointer;
/// `rows` up to 12 and `cols` up to 32 (a second panel is read only when `cols > 16`).
type WidePacked = unsafe fn(usize, *const f32, *const f32, usize, *mut f32, usize, usize, usize, f32, bool);
/// As [`DirectKernel`], with the stride between `B`'s micropanels.
type WideDirect = unsafe fn(usize, *const f32, usize, *const f32, usize, *mut f32, usize, usize, usize, f32, bool);

/// `(rows, a, b_panel, c, c_row_stride, k, ..., alpha, accumulate)` of a packed-A block.
type PackedKernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize, f32, bool);
/// As [`PackedKernel`], reading A in place with its row stride.
type DirectKernel = unsafe fn(usize, *const f32, usize, *const f32, *mut f32, usize, usize, usize, f32, bool);

impl Kernels {
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn packed(
        &self,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        (self.packed)(kc, a, b, c, ldc, rows, cols, alpha, acc)
    }
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn direct(
        &self,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        (self.direct)(kc, a, lda, b, c, ldc, rows, cols, alpha, acc)
    }
}

fn kernel_fn() -> Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if avx2_ok() {
            let wide = (avx512_ok() && std::env::var("PERSONALIZE_GEMM").as_deref() != Ok("avx2"))
                .then_some(WideKernels { packed: avx512::packed, direct: avx512::direct });
            let name = if wide.is_some() { "avx512" } else { "avx2" };
            return Kernels { packed: avx2::packed, direct: avx2::direct, wide, name };
        }
        Kernels { packed: portable_packed, direct: portable_direct, wide: None, name: "portable" }
    })
}

/// The GEMM microkernel this CPU runs: `avx512` (12×16 tiles in zmm registers), `avx2`
/// (6×16 in ymm) or `portable` (plain Rust, vectorised by LLVM). `PERSONALIZE_GEMM=avx2` (read at the first GEMM)
/// keeps an AVX-512 CPU on the AVX2 kernel, for comparison.
///
/// ```
/// assert!(["avx512", "avx2", "portable"].contains(&cpu_kernels::gemm_path()));
/// ```
pub fn gemm_path() -> &'static str {
    kernel_fn().name
}

/// Stores a finished tile (row-major 6×16 in `tile`) into `c`.
#[inline(always)]
unsafe fn store_tile(tile: &[f32; MR * NR], c: *mut f32, ldc: usize, rows: usize, cols: usize, accumulate: bool) {
    for i in 0..rows {
        let dst = std::slice::from_raw_parts_mut(c.add(i * ldc), cols);
        let src = &tile[i * NR..i * NR + cols];
        if accumulate {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// The microkernels in plain Rust, for CPUs without AVX2+FMA (LLVM vectorises them for SSE
/// or NEON).
#[allow(clippy::too_many_arguments)]
unsafe fn portable_packed(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    acc: bool,
) {
    portable(kc, |kk, i| *a.add(kk * MR + i), b, c, ldc, rows, cols, alpha, acc)
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_direct(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    acc: bool,
) {
    portable(kc, |kk, i| *a.add(i.min(rows - 1) * lda + kk), b, c, ldc, rows, cols, alpha, acc)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn portable(
    kc: usize,
    a: impl Fn(usize, usize) -> f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    accumulate: bool,
) {
    let b = std::slice::from_raw_parts(b, kc * NR);
    let mut acc = [0f32; MR * NR];
    for (kk, bk) in b.chunks_exact(NR).enumerate() {
        for i in 0..MR {
            let x = a(kk, i);
            for j in 0..NR {
                acc[i * NR + j] += x * bk[j];
            }
        }
    }
    for v in &mut acc {
        *v *= alpha;
    }
    store_tile(&acc, c, ldc, rows, cols, accumulate);
}

/// Rows `r0..r0 + n` (`n ≤ 8`) of the row-major `rows × cols` matrix whose column-major copy
/// is `src` (`src[c·rows + r]`), written to `dst` (`n × cols`): the output of a transposed
/// product put back in order, 8×8 blocks at a time.
pub(crate) fn untranspose_rows(src: &[f32], rows: usize, cols: usize, r0: usize, n: usize, dst: &mut [f32]) {
    assert!(n <= 8 && r0 + n <= rows && src.len() >= rows * cols && dst.len() >= n * cols);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if n == 8 && avx2_ok() {
        done = cols / 8 * 8;
        for c in (0..done).step_by(8) {
            let s: [*const f32; 8] = std::array::from_fn(|i| src[(c + i) * rows + r0..].as_ptr());
            // SAFETY: each source row holds 8 floats from r0 (r0 + 8 <= rows); dst rows 0..8
            // hold columns c..c+8 (c + 8 <= cols); asserted above.
            unsafe { avx2::transpose8(s, dst.as_mut_ptr().add(c), cols) };
        }
    }
    for c in done..cols {
        for i in 0..n {
            dst[i * cols + c] = src[c * rows + r0 + i];
        }
    }
}

/// Whether this CPU runs the AVX2+FMA code (checked once, then a cached load).
#[cfg(target_arch = "x86_64")]
fn avx2_ok() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Asks for the rows of a `C` tile while its products accumulate: its rows are far apart, and
/// stores that miss stalled the next tile (a third of the time on 1024² matrices).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_tile(c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for i in 0..rows {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + cols - 1) as *const i8);
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_ok() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// The microkernels for AVX-512: a 12×32 tile of `C` in 24 zmm accumulators (12×16 in 12 at
/// the right edge), per step one load of each `B` micropanel and twelve broadcasts of `A`
/// folded into the FMAs. The 6×16 AVX2 tile keeps 12 of 16 ymm registers busy; here 24 of 32
/// hold twice the rows at four times the width, and each broadcast feeds two FMAs.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    const ROWS: usize = 2 * MR;

    /// Two consecutive packed micropanels of A (rows 0–5, then 6–11; only the first when
    /// `rows <= 6`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn packed(
        kc: usize,
        a: *const f32,
        b: *const f32,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        // With 6 rows or fewer there is no second micropanel: the first is read again (its
        // sums dropped), never past the packed block.
        let a1 = if rows > MR { a.add(kc * MR) } else { a };
        let at = |k: usize, i: usize| if i < MR { a.add(k * MR + i) } else { a1.add(k * MR + i - MR) };
        if cols > NR {
            let t = tile::<2>(kc, b, bstride, c, ldc, rows, cols, at);
            store(t, c, ldc, rows, cols, alpha, acc);
        } else {
            let t = tile::<1>(kc, b, bstride, c, ldc, rows, cols, at);
            store(t, c, ldc, rows, cols, alpha, acc);
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn direct(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        // Rows past the tile's last repeat it (their sums are computed and dropped).
        let p: [*const f32; ROWS] = std::array::from_fn(|i| a.add(i.min(rows - 1) * lda));
        let at = |k: usize, i: usize| p[i].add(k);
        if cols > NR {
            let t = tile::<2>(kc, b, bstride, c, ldc, rows, cols, at);
            store(t, c, ldc, rows, cols, alpha, acc);
        } else {
            let t = tile::<1>(kc, b, bstride, c, ldc, rows, cols, at);
            store(t, c, ldc, rows, cols, alpha, acc);
        }
    }

    /// `P` micropanels of `B` (16 columns each, `bstride` apart).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const P: usize>(
        kc: usize,
        b: *const f32,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        a_at: impl Fn(usize, usize) -> *const f32,
    ) -> [[__m512; P]; ROWS] {
        super::prefetch_tile(c, ldc, rows, cols);
        let mut acc = [[_mm512_setzero_ps(); P]; ROWS];
        let mut b = b;
        let mut k = 0;
        macro_rules! step {
            ($o:expr) => {{
                let bv: [__m512; P] = std::array::from_fn(|j| _mm512_loadu_ps(b.add(j * bstride + $o * NR)));
                macro_rules! row {
                    ($i:expr) => {{
                        let x = _mm512_set1_ps(*a_at(k + $o, $i));
                        for j in 0..P {
                            acc[$i][j] = _mm512_fmadd_ps(x, bv[j], acc[$i][j]);
                        }
                    }};
                }
                row!(0);
                row!(1);
                row!(2);
                row!(3);
                row!(4);
                row!(5);
                row!(6);
                row!(7);
                row!(8);
                row!(9);
                row!(10);
                row!(11);
            }};
        }
        for _ in 0..kc / 4 {
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            k += 4;
            b = b.add(4 * NR);
        }
        for _ in 0..kc % 4 {
            step!(0);
            k += 1;
            b = b.add(NR);
        }
        acc
    }

    #[inline(always)]
    unsafe fn store<const P: usize>(
        acc: [[__m512; P]; ROWS],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        let al = _mm512_set1_ps(alpha);
        // Columns past `cols` are masked off, in the loads as in the stores.
        let masks: [__mmask16; P] = std::array::from_fn(|j| {
            let n = cols.saturating_sub(j * NR).min(NR);
            if n >= NR {
                0xFFFF
            } else {
                ((1u32 << n) - 1) as u16
            }
        });
        for (i, r) in acc.iter().enumerate().take(rows) {
            for j in 0..P {
                let p = c.add(i * ldc + j * NR);
                let mut v = _mm512_mul_ps(al, r[j]);
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], p));
                }
                _mm512_mask_storeu_ps(p, masks[j], v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{store_tile, MR, NR};

    /// Reads 8 floats from each of the 8 `src` rows and writes column `c` (the `c`-th float of
    /// every row, in row order) as 8 floats at `dst + c·stride`, for `c` in order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose8(src: [*const f32; 8], dst: *mut f32, stride: usize) {
        let r = src.map(|p| _mm256_loadu_ps(p));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let cols = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (c, v) in cols.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(c * stride), v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn packed(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        let t = tile(kc, b, c, ldc, rows, cols, |k, i| a.add(k * MR + i));
        store(t, c, ldc, rows, cols, alpha, acc);
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn direct(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        // Rows past the tile's last repeat it (their sums are computed and dropped).
        let r = |i: usize| a.add(i.min(rows - 1) * lda);
        let p = [r(0), r(1), r(2), r(3), r(4), r(5)];
        let t = tile(kc, b, c, ldc, rows, cols, |k, i| p[i].add(k));
        store(t, c, ldc, rows, cols, alpha, acc);
    }

    /// The 6×16 product: twelve accumulators, per step two loads of `B` and six broadcasts of
    /// `A` (`a_at(k, i)`: row `i` at step `k`).
    #[inline(always)]
    unsafe fn tile(
        kc: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        a_at: impl Fn(usize, usize) -> *const f32,
    ) -> [[__m256; 2]; MR] {
        super::prefetch_tile(c, ldc, rows, cols);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut b = b;
        let mut k = 0;
        macro_rules! step {
            ($o:expr) => {{
                let b0 = _mm256_loadu_ps(b.add($o * NR));
                let b1 = _mm256_loadu_ps(b.add($o * NR + 8));
                macro_rules! row {
                    ($i:expr) => {{
                        let x = _mm256_broadcast_ss(&*a_at(k + $o, $i));
                        acc[$i][0] = _mm256_fmadd_ps(x, b0, acc[$i][0]);
                        acc[$i][1] = _mm256_fmadd_ps(x, b1, acc[$i][1]);
                    }};
                }
                row!(0);
                row!(1);
                row!(2);
                row!(3);
                row!(4);
                row!(5);
            }};
        }
        for _ in 0..kc / 4 {
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            k += 4;
            b = b.add(4 * NR);
        }
        for _ in 0..kc % 4 {
            step!(0);
            k += 1;
            b = b.add(NR);
        }
        acc
    }

    #[inline(always)]
    unsafe fn store(
        acc: [[__m256; 2]; MR],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        let al = _mm256_set1_ps(alpha);
        if rows == MR && cols == NR {
            for (i, r) in acc.iter().enumerate() {
                let p = c.add(i * ldc);
                let (mut v0, mut v1) = (_mm256_mul_ps(al, r[0]), _mm256_mul_ps(al, r[1]));
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
                }
                _mm256_storeu_ps(p, v0);
                _mm256_storeu_ps(p.add(8), v1);
            }
        } else {
            let mut tile = [0f32; MR * NR];
            for (i, r) in acc.iter().enumerate() {
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), _mm256_mul_ps(al, r[0]));
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), _mm256_mul_ps(al, r[1]));
            }
            store_tile(&tile, c, ldc, rows, cols, accumulate);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)] // the GEMM's own argument list
    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        ars: usize,
        acs: usize,
        b: &[f32],
        brs: usize,
        bcs: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64).sum();
            }
        }
        c
    }

    /// The `k × n` matrix `b` (strides `brs`, `bcs`) as the top-left corner of a row-major
    /// `kb × nb` one whose other entries come from `filler`: a larger packed `B`, of which a
    /// product must read only that corner.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embed(
        b: &[f32],
        brs: usize,
        bcs: usize,
        k: usize,
        n: usize,
        kb: usize,
        nb: usize,
        filler: &[f32],
    ) -> Vec<f32> {
        (0..kb * nb)
            .map(|e| {
                let (r, c) = (e / nb, e % nb);
                if r < k && c < n {
                    b[r * brs + c * bcs]
                } else {
                    filler[e]
                }
            })
            .collect()
    }

    fn rand(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every source of `B`, both layouts of each operand (and `A` read in place), ragged
    /// edges in every dimension, several blocks in every dimension, α and accumulation, serial
    /// and parallel: against an f64 reference.
    #[test]
    fn matches_naive_product() {
        check_against_naive();
    }

    /// The same with the AVX-512 kernels' 12×32 tiles (off by default).
    #[test]
    fn two_panel_tiles_match_naive_product() {
        // The other tests may run meanwhile: both tile widths give the same products.
        WIDE_TWO_PANELS.store(true, std::sync::atomic::Ordering::Relaxed);
        check_against_naive();
        WIDE_TWO_PANELS.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The AVX-512 kernels read nothing past the last row of `A`: a panel or a matrix that
    /// ends where an unreadable page starts (a stray read faults instead of passing).
    #[test]
    #[cfg(all(target_arch = "x86_64", unix))]
    fn wide_kernels_read_nothing_past_a() {
        if !avx512_ok() {
            return;
        }
        let page = 4096usize;
        // SAFETY: an anonymous private mapping of two pages, the second made inaccessible.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p.cast::<u8>().add(page).cast(), page, libc::PROT_NONE), 0);
            p.cast::<f32>()
        };
        let floats = page / 4;
        let kc = 16;
        let b = rand(kc * NR, 13);
        let mut c = vec![0f32; 2 * MR * NR];
        unsafe {
            // One packed micropanel (kc·6 floats) ending at the guard page.
            let a = base.add(floats - kc * MR);
            std::slice::from_raw_parts_mut(a, kc * MR).fill(0.5);
            avx512::packed(kc, a, b.as_ptr(), 0, c.as_mut_ptr(), NR, 4, NR, 1.0, false);
            // In place: `rows` rows of stride `lda` whose last ends at the guard page.
            let lda = 40;
            for rows in 1..=2 * MR {
                let a = base.add(floats - ((rows - 1) * lda + kc));
                std::slice::from_raw_parts_mut(a, (rows - 1) * lda + kc).fill(0.25);
                avx512::direct(kc, a, lda, b.as_ptr(), 0, c.as_mut_ptr(), NR, rows, NR, 1.0, false);
            }
            libc::munmap(base.cast(), 2 * page);
        }
        let want: f32 = (0..kc).map(|k| 0.25 * b[k * NR]).sum();
        assert!((c[0] - want).abs() < 1e-4);
    }

    fn check_against_naive() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (6, 16, 256),
            (13, 40, 300),
            (150, 33, 520),
            (290, 4100, 20),
            (5, 9000, 7),
            (150, 300, 520),
        ] {
            for &(ta, tb) in &[(false, false), (true, true)] {
                let a = rand(m * k, 1);
                let b = rand(k * n, 2);
                let (ars, acs) = if ta { (1, m) } else { (k, 1) };
                let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
                let want = naive(m, n, k, &a, ars, acs, &b, brs, bcs);
                let ldc = n + 3;
                let prior = rand(m * ldc, 3);
                for (case, parallel) in [(0, false), (1, true), (2, true), (3, false)] {
                    let mut c = prior.clone();
                    let am = if acs == 1 && case == 3 {
                        MatRef::in_place(a.as_ptr(), ars)
                    } else {
                        MatRef::new(a.as_ptr(), ars, acs)
                    };
                    let bm = MatRef::new(b.as_ptr(), brs, bcs);
                    // The packed B is larger than the product's: only its top-left part is read.
                    let bbig = embed(&b, brs, bcs, k, n, k + 300, n + 20, &rand((k + 300) * (n + 20), 2));
                    let packed = PackedB::new(k + 300, n + 20, MatRef::new(bbig.as_ptr(), n + 20, 1), case == 1);
                    let fill = |k0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]| unsafe {
                        pack_b(bm, k0, kc, j0, nc, dst, false)
                    };
                    let src = match case {
                        0 | 3 => BSource::Mat(bm),
                        1 => BSource::Packed(&packed),
                        _ => BSource::Fill(&fill),
                    };
                    let (alpha, accumulate) = if case == 3 { (0.5, true) } else { (1.0, case == 2) };
                    unsafe { sgemm(m, n, k, am, src, c.as_mut_ptr(), ldc, alpha, accumulate, parallel) };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            let old = prior[i * ldc + j] as f64;
                            let exp = if j >= n {
                                old
                            } else {
                                alpha as f64 * want[i * n + j] + if accumulate { old } else { 0.0 }
                            };
                            assert!(
                                (got - exp).abs() < 1e-4 * (1.0 + (k as f64).sqrt()),
                                "{m}×{n}×{k} case {case} ({i},{j}): {got} vs {exp}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The 12-row AVX-512 kernels against an f64 reference, on full and ragged tiles (7 to 12
    /// rows, partial columns), packed (two micropanels) and direct, storing and accumulating.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn wide_kernels_match_a_reference() {
        if !avx512_ok() {
            eprintln!("no AVX-512 here: the 12-row kernels are not used");
            return;
        }
        let kc = 41;
        // Two B micropanels, `bstride` apart (with a gap, as packed blocks may have).
        let bstride = kc * NR + 16;
        let (ap, b) = (rand(2 * kc * MR, 8), rand(2 * bstride, 9));
        let bat = |k: usize, j: usize| b[(j / NR) * bstride + k * NR + j % NR];
        let (lda, ldc) = (60, 40);
        let ad = rand(2 * MR * lda, 10);
        // One micropanel only (the last of a block): nothing past it is read.
        let one = rand(kc * MR, 12);
        let mut c1 = vec![0f32; MR * ldc];
        unsafe { avx512::packed(kc, one.as_ptr(), b.as_ptr(), bstride, c1.as_mut_ptr(), ldc, 4, NR, 1.0, false) };
        let want: f64 = (0..kc).map(|k| one[k * MR + 3] as f64 * bat(k, 7) as f64).sum();
        assert!((c1[3 * ldc + 7] as f64 - want).abs() < 1e-4);
        for (rows, cols) in [(2 * MR, 2 * NR), (2 * MR, NR), (7, 2 * NR), (9, 5), (12, 1), (11, 23), (5, NR)] {
            for acc in [false, true] {
                let prior = rand(2 * MR * ldc, 11);
                let (mut cp, mut cd) = (prior.clone(), prior.clone());
                unsafe {
                    let (a1, a2) = (ap.as_ptr(), ad.as_ptr());
                    avx512::packed(kc, a1, b.as_ptr(), bstride, cp.as_mut_ptr(), ldc, rows, cols, 0.7, acc);
                    avx512::direct(kc, a2, lda, b.as_ptr(), bstride, cd.as_mut_ptr(), ldc, rows, cols, 0.7, acc);
                }
                for i in 0..2 * MR {
                    for j in 0..ldc {
                        let dot = |a: &dyn Fn(usize) -> f32| {
                            (0..kc).map(|k| a(k) as f64 * bat(k, j.min(2 * NR - 1)) as f64).sum::<f64>()
                        };
                        let base = if acc { prior[i * ldc + j] as f64 } else { 0.0 };
                        let inside = i < rows && j < cols;
                        let (panel, r) = (i / MR, i % MR);
                        let want_p = if inside {
                            0.7 * dot(&|k| ap[panel * kc * MR + k * MR + r]) + base
                        } else {
                            prior[i * ldc + j] as f64
                        };
                        let want_d =
                            if inside { 0.7 * dot(&|k| ad[i * lda + k]) + base } else { prior[i * ldc + j] as f64 };
                        assert!((cp[i * ldc + j] as f64 - want_p).abs() < 1e-4, "packed {rows}×{cols} ({i},{j})");
                        assert!((cd[i * ldc + j] as f64 - want_d).abs() < 1e-4, "direct {rows}×{cols} ({i},{j})");
                    }
                }
            }
        }
    }

    /// The portable microkernels agree with an f64 reference and with the ones picked for
    /// this CPU, on full and ragged tiles, packed and direct.
    #[test]
    fn portable_kernels_agree() {
        let kc = 37;
        let (ap, b) = (rand(kc * MR, 4), rand(kc * NR, 5));
        let ad = rand(MR * 50, 7);
        for (rows, cols) in [(MR, NR), (4, 11)] {
            let mut c1 = rand(MR * 20, 6);
            let mut c2 = c1.clone();
            let mut c3 = c1.clone();
            let mut c4 = c1.clone();
            let k = kernel_fn();
            unsafe {
                portable_packed(kc, ap.as_ptr(), b.as_ptr(), c1.as_mut_ptr(), 20, rows, cols, 0.7, true);
                k.packed(kc, ap.as_ptr(), b.as_ptr(), c2.as_mut_ptr(), 20, rows, cols, 0.7, true);
                portable_direct(kc, ad.as_ptr(), 50, b.as_ptr(), c3.as_mut_ptr(), 20, rows, cols, 0.7, false);
                k.direct(kc, ad.as_ptr(), 50, b.as_ptr(), c4.as_mut_ptr(), 20, rows, cols, 0.7, false);
            }
            for (x, y) in c1.iter().zip(&c2).chain(c3.iter().zip(&c4)) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
            let prior = rand(MR * 20, 6);
            for i in 0..MR {
                for j in 0..20 {
                    let inside = i < rows && j < cols;
                    let dot =
                        |a: &dyn Fn(usize) -> f32| (0..kc).map(|k| a(k) as f64 * b[k * NR + j] as f64).sum::<f64>();
                    let packed = if inside {
                        0.7 * dot(&|k| ap[k * MR + i]) + prior[i * 20 + j] as f64
                    } else {
                        prior[i * 20 + j] as f64
                    };
                    let direct = if inside { 0.7 * dot(&|k| ad[i * 50 + k]) } else { prior[i * 20 + j] as f64 };
                    assert!((c1[i * 20 + j] as f64 - packed).abs() < 1e-5, "packed ({i},{j})");
                    assert!((c3[i * 20 + j] as f64 - direct).abs() < 1e-5, "direct ({i},{j})");
                }
            }
        }
    }
}
