//! The SIMD kernels over repacked weights (layouts in `repack`): one generic kernel for
//! every layout, compiled for each register width in `lanes` (AVX2: a 16-row tile as two
//! halves of 8 rows; AVX-512: the whole tile), up to [`MAX_TOKENS`] tokens per call so every
//! unpacked weight register feeds one multiply-add per token (prefill reuses weights from
//! registers; decode runs the one-token build).
//!
//! Per 32-column block: the quant chunks load as aligned cache lines (or halves of them) and
//! unpack to i16 pairs with shifts and masks (see the bit planes in `repack`), or a byte
//! table lookup for the non-linear types; each pair of activations is one broadcast 32-bit
//! load; the block's f16 scales convert with one instruction per register; the i32 sums are
//! scaled into an f32 accumulator per token once per block (sums of one block cannot
//! overflow: 32 * 128 * 32767 < 2^31).
//!
//! Every kernel is reached only through [`kernel`], which `repack::repacked_fn_at` calls only
//! for a level the CPU has (`cpu_simd()`): that is the safety argument of each entry point.

use std::ptr::read_unaligned;

use super::blocks::BlockA16;
use super::lanes::{Avx2, Avx512Bw, Avx512Vnni, Lanes};
use super::repack::{check_repacked, Plane, Repacked, RepackedFn, RepackedKind, Scales, MAX_TOKENS, ROWS};
use super::SimdLevel;

/// Bytes of one A16 activation block; its quants start at byte 8.
const A16: usize = std::mem::size_of::<BlockA16>();

/// The kernel for `kind` at `level` (AVX2 or one of the AVX-512 levels).
pub(super) fn kernel(kind: RepackedKind, level: SimdLevel) -> Option<RepackedFn> {
    macro_rules! by_kind {
        ($backend:ident) => {
            match kind {
                RepackedKind::Q4 => $backend::entry::<{ RepackedKind::Q4 as u8 }>,
                RepackedKind::Q8 => $backend::entry::<{ RepackedKind::Q8 as u8 }>,
                RepackedKind::Q5 => $backend::entry::<{ RepackedKind::Q5 as u8 }>,
                RepackedKind::Q4K => $backend::entry::<{ RepackedKind::Q4K as u8 }>,
                RepackedKind::Q6K => $backend::entry::<{ RepackedKind::Q6K as u8 }>,
            }
        };
    }
    Some(match level {
        SimdLevel::Scalar => return None,
        SimdLevel::Avx2 => by_kind!(avx2),
        SimdLevel::Avx512 => by_kind!(avx512),
        SimdLevel::Avx512Vnni => by_kind!(avx512vnni),
    })
}

/// The entry points of one backend: a safe [`RepackedFn`] per layout that checks the call,
/// then runs the generic tile kernel inside a function compiled with the backend's features.
macro_rules! backend {
    ($module:ident, $lanes:ty, $features:literal) => {
        mod $module {
            use super::*;

            /// # Safety
            /// The CPU has the backend's features; see [`tiles`].
            #[target_feature(enable = $features)]
            unsafe fn run<const K: u8, const NT: usize>(rp: &Repacked, g: usize, a: [*const u8; NT], out: &mut [[f32; ROWS]]) {
                tiles::<$lanes, K, NT>(rp, g, a, out)
            }

            pub(super) fn entry<const K: u8>(rp: &Repacked, g: usize, a: &[&[u8]], out: &mut [[f32; ROWS]]) {
                check_repacked(rp, g, a, out);
                assert_eq!(rp.kind() as u8, K, "kernel for another layout");
                let p = |t: usize| a[t].as_ptr();
                // SAFETY: handed out by `kernel` only for a level the CPU has (module doc);
                // `check_repacked` proved each activation row holds a row of A16 blocks and
                // there is an output per row.
                unsafe {
                    match a.len() {
                        1 => run::<K, 1>(rp, g, [p(0)], out),
                        2 => run::<K, 2>(rp, g, [p(0), p(1)], out),
                        3 => run::<K, 3>(rp, g, [p(0), p(1), p(2)], out),
                        4 => run::<K, 4>(rp, g, [p(0), p(1), p(2), p(3)], out),
                        _ => {}
                    }
                }
            }
        }
    };
}

backend!(avx2, Avx2, "avx2,fma,f16c");
backend!(avx512, Avx512Bw, "avx512f,avx512bw,avx512vl,avx2,fma,f16c");
backend!(avx512vnni, Avx512Vnni, "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c");

const _: () = assert!(MAX_TOKENS == 4, "the entry points dispatch 1..=4 tokens");

/// Repeats `$body` with `$i` bound to each literal: loops whose index picks shift counts and
/// registers must be unrolled, and LLVM does not always unroll nested ones by itself (when
/// it does not, shift counts become run-time values and accumulators spill).
macro_rules! unroll {
    ($i:ident in [$($n:literal),*] $body:block) => {
        $({
            let $i: usize = $n;
            $body
        })*
    };
}

/// Bytes ahead of the current tile whose cache lines are prefetched: the hardware prefetcher
/// alone left decode at about half of a plain read's bandwidth.
const PREFETCH_AHEAD: usize = 2048;

/// Asks for the `len` bytes at `p` (whole cache lines) to be brought into L1; a hint, safe
/// for any address.
#[inline(always)]
fn prefetch(p: *const u8, len: usize) {
    for line in (0..len).step_by(64) {
        // SAFETY: prefetching never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line).cast()) };
    }
}

/// The f32 at `p`.
///
/// # Safety
/// `p` readable for 4 bytes.
#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    read_unaligned(p.cast::<f32>())
}

/// The i32 chain of pair `s` of quad `k`: layouts with a scale per 16 elements sum the
/// block's first 16 elements (quads 0, 1) in chains `0..CHAINS` and the last 16 in
/// `2..2 + CHAINS`, to scale them apart; the others use chains `0..CHAINS` only (fewer
/// registers).
#[inline(always)]
fn chain<L: Lanes>(kind: RepackedKind, k: usize, s: usize) -> usize {
    let half = if kind.scales().per_half() { 2 * (k / 2) } else { 0 };
    half + s % L::CHAINS
}

/// The i16 pairs of elements `(2p, 2p + 1)` of one plane, shifted into place (see the
/// plane layout in `repack`): a shift and a mask, or for the signed 8-bit plane a sign
/// extension of each half's low or high byte.
///
/// # Safety
/// `qt` is a tile with `plane`; `off` a half's byte offset in a chunk.
#[inline(always)]
unsafe fn plane_pair<L: Lanes>(qt: *const u8, off: usize, plane: Plane, p: usize) -> L::I {
    let (chunk, field) = plane.field(p);
    let v = L::load(qt.add(plane.at + 64 * chunk + off));
    if plane.bits == 8 {
        return if field == 0 { L::low_bytes16(v) } else { L::high_bytes16(v) };
    }
    let mask = ((1 << plane.bits) - 1) << plane.shl;
    L::and(L::shift(v, field as i32 - plane.shl as i32), L::splat(mask | (mask << 16)))
}

/// Quad `k` of a tile (elements `8k..8k + 8`) for the rows of half `h`: four registers of
/// signed i16 pairs, elements `(8k + 2s, 8k + 2s + 1)` in register `s`.
///
/// # Safety
/// `qt` is a tile of layout `kind`.
#[inline(always)]
unsafe fn quad<L: Lanes>(kind: RepackedKind, qt: *const u8, h: usize, k: usize) -> [L::I; 4] {
    let off = 4 * L::N * h;
    let [low, high] = kind.planes();
    let offset = kind.offset();
    let mut out = [L::zero(); 4];
    unroll!(s in [0, 1, 2, 3] {
        let p = 4 * k + s;
        if let Some(plane) = low {
            out[s] = plane_pair::<L>(qt, off, plane, p);
        }
        if let Some(plane) = high {
            out[s] = L::or(out[s], plane_pair::<L>(qt, off, plane, p));
        }
        if offset != 0 {
            out[s] = L::sub16(out[s], offset);
        }
    });
    out
}

/// Per-row f32 factors of one block, for the rows of a half: the scale of each 16-element
/// half-block's i32 sum (equal for layouts with one scale per block) and the min that
/// multiplies the activations' sum (for layouts that have one).
struct BlockScales<F> {
    d: [F; 2],
    m: Option<F>,
}

/// The scales of a block (tile scales at `st`, super-block header `sup` = (d, dmin)).
///
/// # Safety
/// `st` is the block's tile scales, `sup` loaded for its super-block.
#[inline(always)]
unsafe fn block_scales<L: Lanes>(kind: RepackedKind, st: *const u8, h: usize, sup: (L::F, L::F)) -> BlockScales<L::F> {
    let n = L::N;
    match kind.scales() {
        Scales::Legacy { min } => {
            let d = L::f16s(st.add(2 * n * h));
            BlockScales { d: [d, d], m: if min { Some(L::f16s(st.add(32 + 2 * n * h))) } else { None } }
        }
        Scales::Super { signed, per_half, min } => {
            let bytes = |i: usize| if signed { L::i8s(st.add(16 * i + n * h)) } else { L::u8s(st.add(16 * i + n * h)) };
            let d0 = L::fmul(sup.0, bytes(0));
            let d1 = if per_half { L::fmul(sup.0, bytes(1)) } else { d0 };
            let per = 1 + per_half as usize;
            let m = if min { Some(L::fsub(L::fzero(), L::fmul(sup.1, bytes(per)))) } else { None };
            BlockScales { d: [d0, d1], m }
        }
    }
}

/// Group `g` of `rp` times `NT` activation rows into `out` (the contract of `RepackedFn`).
///
/// # Safety
/// The CPU has `L`'s features (the caller's target features enable them); `rp.kind()` is
/// layout `K`; each `a[t]` holds `rp.blocks_per_row()` A16 blocks; `out.len() >= NT`.
#[inline(always)]
unsafe fn tiles<L: Lanes, const K: u8, const NT: usize>(rp: &Repacked, g: usize, a: [*const u8; NT], out: &mut [[f32; ROWS]]) {
    let kind = RepackedKind::from_u8(K);
    let (qb, sb, pb) = (kind.quant_bytes(), kind.scale_bytes(), kind.super_bytes());
    let (q, s, p) = rp.group_ptrs(g);
    let nb = rp.blocks_per_row();
    // Register halves of the tile (2 at 8 lanes). With few tokens each block's halves run
    // back to back, so the weights stream from memory once (decode is bound by that
    // stream); with more, a half at a time over all blocks, as the accumulators of both
    // would not fit in registers (the second pass reads the group's tiles from L2).
    const fn halves_inside(halves: usize, nt: usize) -> usize {
        if nt <= 2 { halves } else { 1 }
    }
    let halves = ROWS / L::N;
    let inner = halves_inside(halves, NT);
    for h0 in (0..halves).step_by(inner) {
        let mut acc = [[L::fzero(); NT]; 2];
        let mut sup = [(L::fzero(), L::fzero()); 2];
        for b in 0..nb {
            let qt = q.add(qb * b);
            if h0 == 0 {
                prefetch(qt.add(PREFETCH_AHEAD), qb);
            }
            for (i, h) in (h0..h0 + inner).enumerate() {
                if pb > 0 && b % 8 == 0 {
                    let head = p.add(pb * (b / 8) + 2 * L::N * h);
                    sup[i] = (L::f16s(head), if kind.scales().has_min() { L::f16s(head.add(32)) } else { L::fzero() });
                }
                let mut isum = [[L::zero(); 4]; NT];
                unroll!(k in [0, 1, 2, 3] {
                    let w = quad::<L>(kind, qt, h, k);
                    for t in 0..NT {
                        // Pairs 4k..4k + 4 of block b: bytes 8 + 4 (4k + s) of its A16 block.
                        let ap = a[t].add(A16 * b + 8 + 16 * k);
                        unroll!(s in [0, 1, 2, 3] {
                            let c = chain::<L>(kind, k, s);
                            isum[t][c] = L::dot(isum[t][c], w[s], L::pair(ap.add(4 * s)));
                        });
                    }
                });
                let scales = block_scales::<L>(kind, s.add(sb * b), h, sup[i]);
                for t in 0..NT {
                    let head = a[t].add(A16 * b);
                    let da = L::fsplat(f32_at(head));
                    let [c0, c1, c2, c3] = isum[t];
                    let (lo, hi) = (L::add(c0, c1), L::add(c2, c3));
                    let acc = &mut acc[i][t];
                    if kind.scales().per_half() {
                        *acc = L::fmadd(L::to_f(lo), L::fmul(scales.d[0], da), *acc);
                        *acc = L::fmadd(L::to_f(hi), L::fmul(scales.d[1], da), *acc);
                    } else {
                        *acc = L::fmadd(L::to_f(L::add(lo, hi)), L::fmul(scales.d[0], da), *acc);
                    }
                    if let Some(m) = scales.m {
                        *acc = L::fmadd(m, L::fsplat(f32_at(head.add(4))), *acc);
                    }
                }
            }
        }
        for (i, h) in (h0..h0 + inner).enumerate() {
            for (o, acc) in out.iter_mut().zip(acc[i]) {
                L::store(o.as_mut_ptr().add(L::N * h), acc);
            }
        }
    }
}
