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
/// Byte offset of `s_hi` in an A16 block.
const S_HI: usize = std::mem::offset_of!(BlockA16, s_hi);

/// The kernel for `kind` at `level` (AVX2 or one of the AVX-512 levels).
pub(super) fn kernel(kind: RepackedKind, level: SimdLevel) -> Option<RepackedFn> {
    macro_rules! by_kind {
        ($backend:ident; $($kind:ident),*) => {
            match kind {
                $(RepackedKind::$kind => $backend::entry::<{ RepackedKind::$kind as u8 }>,)*
            }
        };
    }
    Some(match level {
        SimdLevel::Scalar => return None,
        SimdLevel::Avx2 => by_kind!(avx2; Q4, Q8, Q5, Q4K, Q6K, Q5M, Q5K, Q3K, Q2K, Iq4Nl, Iq4Xs, Mxfp4),
        SimdLevel::Avx512 => by_kind!(avx512; Q4, Q8, Q5, Q4K, Q6K, Q5M, Q5K, Q3K, Q2K, Iq4Nl, Iq4Xs, Mxfp4),
        SimdLevel::Avx512Vnni => by_kind!(avx512vnni; Q4, Q8, Q5, Q4K, Q6K, Q5M, Q5K, Q3K, Q2K, Iq4Nl, Iq4Xs, Mxfp4),
    })
}

/// `run::<K, n>` for the `n` in the list equal to `$n` (the call's token count).
macro_rules! by_tokens {
    ($n:expr, $run:ident::<$k:ident>($rp:expr, $g:expr, $p:expr, $out:expr); $($nt:literal),*) => {
        match $n {
            $($nt => $run::<$k, $nt>($rp, $g, std::array::from_fn($p), $out),)*
            _ => {}
        }
    };
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
                    by_tokens!(a.len(), run::<K>(rp, g, p, out); 1, 2, 3, 4, 5, 6, 7, 8);
                }
            }
        }
    };
}

backend!(avx2, Avx2, "avx2,fma,f16c");
backend!(avx512, Avx512Bw, "avx512f,avx512bw,avx512vl,avx2,fma,f16c");
backend!(avx512vnni, Avx512Vnni, "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c");

const _: () = assert!(MAX_TOKENS == 8, "the entry points dispatch 1..=8 tokens");

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
/// alone left decode at about half of a plain read's bandwidth. Measured on the 8B-shape
/// Q4_K model (2 threads, AVX2): none 5.1 tok/s, 1 KiB 6.8, 2 KiB 6.9, 4 KiB 7.0-8.0,
/// 8 KiB 5.9-7.7 (a noisy machine; 4 KiB was best in each of several rounds).
const PREFETCH_AHEAD: usize = 4096;

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

/// The i16 pairs of elements `(2p, 2p + 1)` of one plane, their bits placed from bit `at`
/// of each half (see the plane layout in `repack`): a shift and a mask, or for the signed
/// 8-bit plane a sign extension of each half's low or high byte.
///
/// # Safety
/// `qt` is a tile with `plane`; `off` a half's byte offset in a chunk.
#[inline(always)]
unsafe fn plane_pair<L: Lanes>(qt: *const u8, off: usize, plane: Plane, p: usize, at: u32) -> L::I {
    let (chunk, field) = plane.field(p);
    let v = L::load(qt.add(plane.at + 64 * chunk + off));
    if plane.bits == 8 {
        return if field == 0 { L::low_bytes16(v) } else { L::high_bytes16(v) };
    }
    let mask = ((1 << plane.bits) - 1) << at;
    L::and(L::shift(v, field as i32 - at as i32), L::splat(mask | (mask << 16)))
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
    let table = kind.table().map(|t| L::table(t.as_ptr().cast()));
    let mut out = [L::zero(); 4];
    unroll!(s in [0, 1, 2, 3] {
        let p = 4 * k + s;
        if let Some(table) = table {
            // The index into each half's high byte, its value from the table there, then
            // sign-extended down (the low byte's lookup is shifted out).
            let index = plane_pair::<L>(qt, off, low.expect("a table indexes the low plane"), p, 8);
            out[s] = L::high_bytes16(L::lookup(table, index));
        } else {
            if let Some(plane) = low {
                out[s] = plane_pair::<L>(qt, off, plane, p, plane.shl);
            }
            if let Some(plane) = high {
                out[s] = L::or(out[s], plane_pair::<L>(qt, off, plane, p, plane.shl));
            }
            if offset != 0 {
                out[s] = L::sub16(out[s], offset);
            }
        }
    });
    out
}

/// Per-row f32 factors of one block, for the rows of a half: the scale of each 16-element
/// half-block's i32 sum (equal for layouts with one scale per block), the min that
/// multiplies the activations' sum (for layouts that have one) and, with a min per 16
/// elements (Q2_K), the second half's min less the first's, which multiplies the sum of the
/// second half: `m0 s0 + m1 s1 = m0 s + (m1 - m0) s1`.
struct BlockScales<F> {
    d: [F; 2],
    m: Option<F>,
    m_hi: Option<F>,
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
            BlockScales { d: [d, d], m: if min { Some(L::f16s(st.add(32 + 2 * n * h))) } else { None }, m_hi: None }
        }
        Scales::Super { signed, per_half, min } => {
            let bytes = |i: usize| if signed { L::i8s(st.add(16 * i + n * h)) } else { L::u8s(st.add(16 * i + n * h)) };
            let d0 = L::fmul(sup.0, bytes(0));
            let d1 = if per_half { L::fmul(sup.0, bytes(1)) } else { d0 };
            let per = 1 + per_half as usize;
            let min_of = |i: usize| L::fsub(L::fzero(), L::fmul(sup.1, bytes(per + i)));
            let m = min.then(|| min_of(0));
            let m_hi = (min && per_half).then(|| L::fsub(min_of(1), min_of(0)));
            BlockScales { d: [d0, d1], m, m_hi }
        }
    }
}

/// Adds a block's i32 sums for one token (`isum`, chains as [`chain`]) to its f32
/// accumulator: `sum * d * da` per half-block scale, plus `m * s` for a min, plus
/// `m_hi * s_hi` (`head` is the token's A16 block: `da` at byte 0, `s = da * sum(qs)` at byte
/// 4, `s_hi`, the second half's, at [`S_HI`]).
///
/// # Safety
/// `head` readable for 8 bytes.
#[inline(always)]
unsafe fn scale_into<L: Lanes>(kind: RepackedKind, acc: &mut L::F, isum: [L::I; 4], scales: &BlockScales<L::F>, head: *const u8) {
    let da = L::fsplat(f32_at(head));
    let [c0, c1, c2, c3] = isum;
    let (lo, hi) = (L::add(c0, c1), L::add(c2, c3));
    if kind.scales().per_half() {
        *acc = L::fmadd(L::to_f(lo), L::fmul(scales.d[0], da), *acc);
        *acc = L::fmadd(L::to_f(hi), L::fmul(scales.d[1], da), *acc);
    } else {
        *acc = L::fmadd(L::to_f(L::add(lo, hi)), L::fmul(scales.d[0], da), *acc);
    }
    if let Some(m) = scales.m {
        *acc = L::fmadd(m, L::fsplat(f32_at(head.add(4))), *acc);
    }
    if let Some(m_hi) = scales.m_hi {
        *acc = L::fmadd(m_hi, L::fsplat(f32_at(head.add(S_HI))), *acc);
    }
}

/// Group `g` of `rp` times `NT` activation rows into `out` (the contract of `RepackedFn`).
///
/// # Safety
/// The CPU has `L`'s features (the caller's target features enable them); `rp.kind()` is
/// layout `K`; each `a[t]` holds `rp.blocks_per_row()` A16 blocks; `out.len() >= NT`.
#[inline(always)]
unsafe fn tiles<L: Lanes, const K: u8, const NT: usize>(rp: &Repacked, g: usize, a: [*const u8; NT], out: &mut [[f32; ROWS]]) {
    // One or two tokens keep their sums of both halves in registers (decode: the weights
    // stream through registers, no stack round trip).
    if L::TOKENS_OUTER && NT > 2 {
        tiles_tokens_outer::<L, K, NT>(rp, g, a, out)
    } else {
        tiles_weights_outer::<L, K, NT>(rp, g, a, out)
    }
}

/// [`tiles`] with each weight register feeding every token in turn (32 registers).
///
/// # Safety
/// As [`tiles`].
#[inline(always)]
unsafe fn tiles_weights_outer<L: Lanes, const K: u8, const NT: usize>(rp: &Repacked, g: usize, a: [*const u8; NT], out: &mut [[f32; ROWS]]) {
    let kind = RepackedKind::from_u8(K);
    let (qb, sb, pb) = (kind.quant_bytes(), kind.scale_bytes(), kind.super_bytes());
    let (q, s, p) = rp.group_ptrs(g);
    let halves = ROWS / L::N;
    let mut acc = [[L::fzero(); NT]; 2];
    let mut sup = [(L::fzero(), L::fzero()); 2];
    for b in 0..rp.blocks_per_row() {
        let qt = q.add(qb * b);
        prefetch(qt.add(PREFETCH_AHEAD), qb);
        for h in 0..halves {
            if pb > 0 && b % 8 == 0 {
                sup[h] = super_scales::<L>(kind, p.add(pb * (b / 8)), h);
            }
            let mut isum = [[L::zero(); 4]; NT];
            unroll!(k in [0, 1, 2, 3] {
                let w = quad::<L>(kind, qt, h, k);
                for t in 0..NT {
                    // Pairs 4k..4k + 4 of block b: bytes 8 + 4 (4k + s) of its A16 block.
                    let ap = a[t].add(A16 * b + 8 + 16 * k);
                    unroll!(s in [0, 1, 2, 3] {
                        let c = chain::<L>(kind, k, s);
                        isum[t][c] = L::dot_pair(isum[t][c], w[s], ap.add(4 * s));
                    });
                }
            });
            let scales = block_scales::<L>(kind, s.add(sb * b), h, sup[h]);
            for t in 0..NT {
                scale_into::<L>(kind, &mut acc[h][t], isum[t], &scales, a[t].add(A16 * b));
            }
        }
    }
    store::<L, NT>(&acc, out);
}

/// [`tiles`] with each token in turn reading the block's weights, unpacked once into a stack
/// buffer for both register halves (16 registers: the halves share each activation
/// broadcast, and the multiplies read the weights from L1).
///
/// # Safety
/// As [`tiles`].
#[inline(always)]
unsafe fn tiles_tokens_outer<L: Lanes, const K: u8, const NT: usize>(rp: &Repacked, g: usize, a: [*const u8; NT], out: &mut [[f32; ROWS]]) {
    let kind = RepackedKind::from_u8(K);
    let (qb, sb, pb) = (kind.quant_bytes(), kind.scale_bytes(), kind.super_bytes());
    let (q, s, p) = rp.group_ptrs(g);
    let halves = ROWS / L::N;
    let mut acc = [[L::fzero(); NT]; 2];
    let mut sup = [(L::fzero(), L::fzero()); 2];
    for b in 0..rp.blocks_per_row() {
        let qt = q.add(qb * b);
        prefetch(qt.add(PREFETCH_AHEAD), qb);
        let mut w = [[L::zero(); 16]; 2];
        let mut scales = [BlockScales { d: [L::fzero(); 2], m: None, m_hi: None }, BlockScales { d: [L::fzero(); 2], m: None, m_hi: None }];
        for h in 0..halves {
            if pb > 0 && b % 8 == 0 {
                sup[h] = super_scales::<L>(kind, p.add(pb * (b / 8)), h);
            }
            unroll!(k in [0, 1, 2, 3] {
                let quad = quad::<L>(kind, qt, h, k);
                w[h][4 * k..4 * k + 4].copy_from_slice(&quad);
            });
            scales[h] = block_scales::<L>(kind, s.add(sb * b), h, sup[h]);
        }
        for t in 0..NT {
            // Pair j of block b: bytes 8 + 4 j of its A16 block.
            let ap = a[t].add(A16 * b + 8);
            let mut isum = [[L::zero(); 4]; 2];
            unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                let c = chain::<L>(kind, j / 4, j % 4);
                for h in 0..halves {
                    isum[h][c] = L::dot_pair(isum[h][c], w[h][j], ap.add(4 * j));
                }
            });
            for h in 0..halves {
                scale_into::<L>(kind, &mut acc[h][t], isum[h], &scales[h], a[t].add(A16 * b));
            }
        }
    }
    store::<L, NT>(&acc, out);
}

/// The super-block header (`d`, `dmin`) of the rows of half `h` (`head`: the header).
///
/// # Safety
/// `head` is a super-block header of layout `kind`.
#[inline(always)]
unsafe fn super_scales<L: Lanes>(kind: RepackedKind, head: *const u8, h: usize) -> (L::F, L::F) {
    let head = head.add(2 * L::N * h);
    (L::f16s(head), if kind.scales().has_min() { L::f16s(head.add(32)) } else { L::fzero() })
}

/// Stores each token's accumulators (a register per half) into its output row.
///
/// # Safety
/// `out.len() >= NT`.
#[inline(always)]
unsafe fn store<L: Lanes, const NT: usize>(acc: &[[L::F; NT]; 2], out: &mut [[f32; ROWS]]) {
    for h in 0..ROWS / L::N {
        for (o, acc) in out.iter_mut().zip(acc[h]) {
            L::store(o.as_mut_ptr().add(L::N * h), acc);
        }
    }
}
