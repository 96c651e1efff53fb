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
use super::repack::{check_repacked, Repacked, RepackedFn, RepackedKind, MAX_TOKENS, ROWS};
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

/// The layout with discriminant `k` (a constant, so every `match` on it folds away).
#[inline(always)]
const fn kind_of(k: u8) -> RepackedKind {
    match k {
        0 => RepackedKind::Q4,
        1 => RepackedKind::Q8,
        2 => RepackedKind::Q5,
        3 => RepackedKind::Q4K,
        _ => RepackedKind::Q6K,
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

/// The i32 chain of pair `s` of quad `k`: chains `0..CHAINS` sum the block's first 16
/// elements (quads 0, 1), `2..2 + CHAINS` the last 16, so layouts with a scale per 16
/// elements scale the halves apart.
#[inline(always)]
fn chain<L: Lanes>(k: usize, s: usize) -> usize {
    2 * (k / 2) + s % L::CHAINS
}

/// One plane of quant bits (`repack`'s module doc): `bits` per element, its chunks starting
/// at byte `at` of the tile, shifted left by `shl` into the quant.
#[derive(Clone, Copy)]
struct Plane {
    bits: i32,
    at: usize,
    shl: i32,
}

/// The quant planes of a layout (at most two) and the offset subtracted from each quant.
#[inline(always)]
const fn planes(kind: RepackedKind) -> ([Option<Plane>; 2], i16) {
    let low4 = Some(Plane { bits: 4, at: 0, shl: 0 });
    match kind {
        RepackedKind::Q4 | RepackedKind::Q4K => ([low4, None], 0),
        RepackedKind::Q5 => ([low4, Some(Plane { bits: 1, at: 256, shl: 4 })], 16),
        RepackedKind::Q6K => ([low4, Some(Plane { bits: 2, at: 256, shl: 4 })], 32),
        RepackedKind::Q8 => ([None, None], 0),
    }
}

/// The i16 pairs of elements `(2p, 2p + 1)` of one plane, `p = 4k + s`, shifted into place:
/// pair `p` sits in chunk `p * bits / 16`, field `p % (16 / bits)` of each 16-bit half.
///
/// # Safety
/// `qt` is a tile of the layout; `off` a half's byte offset in a chunk.
#[inline(always)]
unsafe fn plane_pair<L: Lanes>(qt: *const u8, off: usize, plane: Plane, p: usize) -> L::I {
    let per_half = (16 / plane.bits) as usize;
    let v = L::load(qt.add(plane.at + 64 * (p / per_half) + off));
    let field = (p % per_half) as i32 * plane.bits;
    let mask = ((1 << plane.bits) - 1) << plane.shl;
    L::and(L::shift(v, field - plane.shl), L::splat(mask | (mask << 16)))
}

/// Quad `k` of a tile (elements `8k..8k + 8`) for the rows of half `h`: four registers of
/// signed i16 pairs, elements `(8k + 2s, 8k + 2s + 1)` in register `s`.
///
/// # Safety
/// `qt` is a tile of layout `kind`.
#[inline(always)]
unsafe fn quad<L: Lanes>(kind: RepackedKind, qt: *const u8, h: usize, k: usize) -> [L::I; 4] {
    let off = 4 * L::N * h;
    if kind == RepackedKind::Q8 {
        // Chunk c holds the pairs (4c, 4c + 1) in the low bytes, (4c + 2, 4c + 3) in the high.
        let (v0, v1) = (L::load(qt.add(128 * k + off)), L::load(qt.add(128 * k + 64 + off)));
        return [L::low_bytes16(v0), L::high_bytes16(v0), L::low_bytes16(v1), L::high_bytes16(v1)];
    }
    let ([low, high], offset) = planes(kind);
    // A plain loop, not `array::from_fn`: its closure is not always inlined, and an
    // intrinsic outside this target-feature context becomes a call.
    let mut out = [L::zero(); 4];
    for (s, w) in out.iter_mut().enumerate() {
        let p = 4 * k + s;
        if let Some(plane) = low {
            *w = plane_pair::<L>(qt, off, plane, p);
        }
        if let Some(plane) = high {
            *w = L::or(*w, plane_pair::<L>(qt, off, plane, p));
        }
        if offset != 0 {
            *w = L::sub16(*w, offset);
        }
    }
    out
}

/// Per-row f32 factors of one block, for the rows of a half: the scale of each 16-element
/// half-block's i32 sum (equal for layouts with one scale per block) and the min that
/// multiplies the activation sum (zero for layouts without one).
struct BlockScales<F> {
    d: [F; 2],
    m: Option<F>,
}

/// The scales of block `b` (tile scales at `st`, super-block header `sup` = (d, dmin)).
///
/// # Safety
/// `st` is the block's tile scales, `sup` loaded for its super-block.
#[inline(always)]
unsafe fn block_scales<L: Lanes>(kind: RepackedKind, st: *const u8, h: usize, sup: (L::F, L::F)) -> BlockScales<L::F> {
    let n = L::N;
    match kind {
        RepackedKind::Q4 => {
            let d = L::f16s(st.add(2 * n * h));
            BlockScales { d: [d, d], m: Some(L::f16s(st.add(32 + 2 * n * h))) }
        }
        RepackedKind::Q8 | RepackedKind::Q5 => {
            let d = L::f16s(st.add(2 * n * h));
            BlockScales { d: [d, d], m: None }
        }
        RepackedKind::Q4K => {
            let d = L::fmul(sup.0, L::u8s(st.add(n * h)));
            let m = L::fsub(L::fzero(), L::fmul(sup.1, L::u8s(st.add(16 + n * h))));
            BlockScales { d: [d, d], m: Some(m) }
        }
        RepackedKind::Q6K => {
            BlockScales { d: [L::fmul(sup.0, L::i8s(st.add(n * h))), L::fmul(sup.0, L::i8s(st.add(16 + n * h)))], m: None }
        }
    }
}

/// Whether the layout's two half-blocks have their own scales.
#[inline(always)]
const fn two_scales(kind: RepackedKind) -> bool {
    matches!(kind, RepackedKind::Q6K)
}

/// Group `g` of `rp` times `NT` activation rows into `out` (the contract of `RepackedFn`).
///
/// # Safety
/// The CPU has `L`'s features (the caller's target features enable them); `rp.kind()` is
/// layout `K`; each `a[t]` holds `rp.blocks_per_row()` A16 blocks; `out.len() >= NT`.
#[inline(always)]
unsafe fn tiles<L: Lanes, const K: u8, const NT: usize>(rp: &Repacked, g: usize, a: [*const u8; NT], out: &mut [[f32; ROWS]]) {
    let kind = kind_of(K);
    let (qb, sb, pb) = (kind.quant_bytes(), kind.scale_bytes(), kind.super_bytes());
    let (q, s, p) = rp.group_ptrs(g);
    let nb = rp.blocks_per_row();
    for h in 0..ROWS / L::N {
        let mut acc = [L::fzero(); NT];
        let mut sup = (L::fzero(), L::fzero());
        for b in 0..nb {
            if pb > 0 && b % 8 == 0 {
                let head = p.add(pb * (b / 8) + 2 * L::N * h);
                sup = (L::f16s(head), if pb == 64 { L::f16s(head.add(32)) } else { L::fzero() });
            }
            let qt = q.add(qb * b);
            let mut isum = [[L::zero(); 4]; NT];
            for k in 0..4 {
                let w = quad::<L>(kind, qt, h, k);
                for t in 0..NT {
                    // Pairs 4k..4k + 4 of block b: bytes 8 + 4 (4k + s) of its A16 block.
                    let ap = a[t].add(A16 * b + 8 + 16 * k);
                    for (s, w) in w.iter().enumerate() {
                        let c = chain::<L>(k, s);
                        isum[t][c] = L::dot(isum[t][c], *w, L::pair(ap.add(4 * s)));
                    }
                }
            }
            let scales = block_scales::<L>(kind, s.add(sb * b), h, sup);
            for t in 0..NT {
                let head = a[t].add(A16 * b);
                let da = L::fsplat(f32_at(head));
                let [c0, c1, c2, c3] = isum[t];
                let (lo, hi) = (L::add(c0, c1), L::add(c2, c3));
                if two_scales(kind) {
                    acc[t] = L::fmadd(L::to_f(lo), L::fmul(scales.d[0], da), acc[t]);
                    acc[t] = L::fmadd(L::to_f(hi), L::fmul(scales.d[1], da), acc[t]);
                } else {
                    acc[t] = L::fmadd(L::to_f(L::add(lo, hi)), L::fmul(scales.d[0], da), acc[t]);
                }
                if let Some(m) = scales.m {
                    acc[t] = L::fmadd(m, L::fsplat(f32_at(head.add(4))), acc[t]);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            L::store(o.as_mut_ptr().add(L::N * h), acc);
        }
    }
}
