//! AVX-512 VNNI kernels over repacked weights (layouts in `repack`): 16 rows per 512-bit
//! register, one i32 lane per row, up to four tokens per call so every unpacked weight
//! register feeds one `vpdpwssd` per token (prefill reuses weights from registers, decode
//! runs the one-token build).
//!
//! Per 32-column block: the quant chunks load as aligned cache lines and unpack to i16 pairs
//! with a shift and a mask (Q4) or two shifts (Q8: sign-extended bytes); each pair of
//! activations is one broadcast 32-bit load (`vpbroadcastd`, folded into `vpdpwssd`'s memory
//! operand); the block's 16 f16 scales (and mins) convert with one `vcvtph2ps`; the i32 sum
//! is scaled into an f32 accumulator per token once per block (sums of one block cannot
//! overflow: 32 * 128 * 32767 < 2^31).
//!
//! Every kernel is reached only through [`kernel`], which `repack::repacked_fn_at` hands out
//! only after `detected_simd()` found AVX-512 F/BW/VL + VNNI (with AVX2, FMA, F16C).

use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::repack::{check_repacked, Repacked, RepackedFn, RepackedKind, ROWS};

/// The VNNI kernel for `kind`.
pub(super) fn kernel(kind: RepackedKind) -> RepackedFn {
    match kind {
        RepackedKind::Q4 => q4,
        RepackedKind::Q8 => q8,
        RepackedKind::Q5 => q5,
        RepackedKind::Q4K => q4k,
        RepackedKind::Q6K => q6k,
    }
}

/// The activation rows as pointers (at most four: `check_repacked`).
fn ptrs<const NT: usize>(a: &[&[u8]]) -> [*const u8; NT] {
    std::array::from_fn(|t| a[t].as_ptr())
}

/// Instantiates a safe [`RepackedFn`] over a const-generic `unsafe` tile kernel.
macro_rules! entry {
    ($name:ident, $tile:ident) => {
        fn $name(rp: &Repacked, g: usize, a: &[&[u8]], out: &mut [[f32; ROWS]]) {
            check_repacked(rp, g, a, out);
            let (q, s, p) = rp.group_ptrs(g);
            let nb = rp.blocks_per_row();
            // SAFETY: handed out only when the CPU has the features the tile kernels enable
            // (module doc); `check_repacked` proved each activation row holds `nb` A16 blocks
            // and there is an output per row; `group_ptrs` points at `nb` tiles (and their
            // super-block headers).
            unsafe {
                match a.len() {
                    1 => $tile::<1>(nb, q, s, p, ptrs(a), out),
                    2 => $tile::<2>(nb, q, s, p, ptrs(a), out),
                    3 => $tile::<3>(nb, q, s, p, ptrs(a), out),
                    4 => $tile::<4>(nb, q, s, p, ptrs(a), out),
                    _ => {}
                }
            }
        }
    };
}

entry!(q4, q4_tile);
entry!(q8, q8_tile);
entry!(q5, q5_tile);
entry!(q4k, q4k_tile);
entry!(q6k, q6k_tile);

/// The f32 at `p`.
///
/// # Safety
/// `p` readable for 4 bytes.
#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    read_unaligned(p.cast::<f32>())
}

/// The i32 (an activation pair) at `p`, broadcast.
///
/// # Safety
/// `p` readable for 4 bytes; AVX-512 F present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair(p: *const u8) -> __m512i {
    _mm512_set1_epi32(read_unaligned(p.cast::<i32>()))
}

/// `acc[t] += cvt(isum[t][0] + isum[t][1]) * (d * da_t)` (+ `m * s_t` for Q4) per token.
///
/// # Safety
/// `a[t] + 72 b` readable for an A16 block header; AVX-512 F present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scale_block<const NT: usize>(
    acc: &mut [__m512; NT],
    isum: &[[__m512i; 2]; NT],
    a: &[*const u8; NT],
    b: usize,
    d: __m512,
    m: Option<__m512>,
) {
    for t in 0..NT {
        let head = a[t].add(72 * b);
        let i = _mm512_cvtepi32_ps(_mm512_add_epi32(isum[t][0], isum[t][1]));
        acc[t] = _mm512_fmadd_ps(i, _mm512_mul_ps(d, _mm512_set1_ps(f32_at(head))), acc[t]);
        if let Some(m) = m {
            acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(f32_at(head.add(4))), acc[t]);
        }
    }
}

/// The i32 sums of one Q4-layout tile (256 quant bytes at `qt`) with block `b` of each
/// token, in two interleaved chains per token.
///
/// # Safety
/// `qt` readable for 256 bytes, each `a[t]` for `b + 1` A16 blocks; features as the tiles.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_isum<const NT: usize>(qt: *const u8, a: &[*const u8; NT], b: usize) -> [[__m512i; 2]; NT] {
    let mask = _mm512_set1_epi32(0x000F_000F);
    let mut isum = [[_mm512_setzero_si512(); 2]; NT];
    for c in 0..4 {
        let v = _mm512_loadu_si512(qt.add(64 * c).cast());
        let w = [
            _mm512_and_si512(v, mask),
            _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask),
            _mm512_and_si512(_mm512_srli_epi32::<8>(v), mask),
            _mm512_and_si512(_mm512_srli_epi32::<12>(v), mask),
        ];
        for t in 0..NT {
            // Pairs 4c..4c+4 of block b: bytes 8 + 4 * (4c + s) of its A16 block.
            let ap = a[t].add(72 * b + 8 + 16 * c);
            for (k, w) in w.iter().enumerate() {
                isum[t][k & 1] = _mm512_dpwssd_epi32(isum[t][k & 1], *w, pair(ap.add(4 * k)));
            }
        }
    }
    isum
}

/// Q4 tiles (256 quant bytes, 64 scale bytes) x `NT` A16 rows.
///
/// # Safety
/// `q` / `s` readable for `nb` tiles; each `a[t]` for `nb` A16 blocks; `out.len() >= NT`;
/// AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_tile<const NT: usize>(
    nb: usize,
    q: *const u8,
    s: *const u8,
    _p: *const u8,
    a: [*const u8; NT],
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        let st = s.add(64 * b);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(st.cast()));
        let m = _mm512_cvtph_ps(_mm256_loadu_si256(st.add(32).cast()));
        let isum = q4_isum(q.add(256 * b), &a, b);
        scale_block(&mut acc, &isum, &a, b, d, Some(m));
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
}

/// Q5 tiles (Q4 nibbles, then a chunk of fifth bits; 32 bytes of f16 `d`) x `NT` A16 rows:
/// each pair is `(nibbles | fifth << 4) - 16` as i16.
///
/// # Safety
/// As [`q4_tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_tile<const NT: usize>(
    nb: usize,
    q: *const u8,
    s: *const u8,
    _p: *const u8,
    a: [*const u8; NT],
    out: &mut [[f32; ROWS]],
) {
    let (low4, bit, off) = (_mm512_set1_epi32(0x000F_000F), _mm512_set1_epi32(0x0001_0001), _mm512_set1_epi16(16));
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        let qt = q.add(320 * b);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(32 * b).cast()));
        let hw = _mm512_loadu_si512(qt.add(256).cast());
        let mut isum = [[_mm512_setzero_si512(); 2]; NT];
        for c in 0..4 {
            let v = _mm512_loadu_si512(qt.add(64 * c).cast());
            for k in 0..4 {
                let nib = _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(4 * k as i32)), low4);
                let hb = _mm512_and_si512(_mm512_srl_epi32(hw, _mm_cvtsi32_si128((4 * c + k) as i32)), bit);
                let w = _mm512_sub_epi16(_mm512_or_si512(nib, _mm512_slli_epi32::<4>(hb)), off);
                for t in 0..NT {
                    let ap = a[t].add(72 * b + 8 + 16 * c + 4 * k);
                    isum[t][k & 1] = _mm512_dpwssd_epi32(isum[t][k & 1], w, pair(ap));
                }
            }
        }
        scale_block(&mut acc, &isum, &a, b, d, None);
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
}

/// 16 bytes at `p` (u8, or i8 when `signed`) as 16 f32.
///
/// # Safety
/// `p` readable for 16 bytes; AVX-512 F present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bytes_ps(p: *const u8, signed: bool) -> __m512 {
    let v = _mm_loadu_si128(p.cast());
    _mm512_cvtepi32_ps(if signed { _mm512_cvtepi8_epi32(v) } else { _mm512_cvtepu8_epi32(v) })
}

/// Q4_K tiles (Q4 quants, 32 bytes of u8 scales and mins; 64-byte super-block headers of
/// f16 `d`, `dmin`) x `NT` A16 rows.
///
/// # Safety
/// As [`q4_tile`], and `p` readable for `nb / 8` headers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_tile<const NT: usize>(
    nb: usize,
    q: *const u8,
    s: *const u8,
    p: *const u8,
    a: [*const u8; NT],
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm512_setzero_ps(); NT];
    let (mut dv, mut mv) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for b in 0..nb {
        if b % 8 == 0 {
            let head = p.add(64 * (b / 8));
            dv = _mm512_cvtph_ps(_mm256_loadu_si256(head.cast()));
            mv = _mm512_cvtph_ps(_mm256_loadu_si256(head.add(32).cast()));
        }
        let st = s.add(32 * b);
        let d = _mm512_mul_ps(dv, bytes_ps(st, false));
        let m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(mv, bytes_ps(st.add(16), false)));
        let isum = q4_isum(q.add(256 * b), &a, b);
        scale_block(&mut acc, &isum, &a, b, d, Some(m));
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
}

/// Q6_K tiles (low nibbles as Q4, then two chunks of high bit pairs; i8 scales per half
/// block; 32-byte super-block headers of f16 `d`) x `NT` A16 rows. The two chains of a
/// token are the block's two halves, scaled separately.
///
/// # Safety
/// As [`q4k_tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_tile<const NT: usize>(
    nb: usize,
    q: *const u8,
    s: *const u8,
    p: *const u8,
    a: [*const u8; NT],
    out: &mut [[f32; ROWS]],
) {
    let (low4, high2, off) = (_mm512_set1_epi32(0x000F_000F), _mm512_set1_epi32(0x0003_0003), _mm512_set1_epi16(32));
    let mut acc = [_mm512_setzero_ps(); NT];
    let mut dv = _mm512_setzero_ps();
    for b in 0..nb {
        if b % 8 == 0 {
            dv = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * (b / 8)).cast()));
        }
        let (qt, st) = (q.add(384 * b), s.add(32 * b));
        let mut isum = [[_mm512_setzero_si512(); 2]; NT];
        for c in 0..4 {
            let v = _mm512_loadu_si512(qt.add(64 * c).cast());
            let hw = _mm512_loadu_si512(qt.add(256 + 64 * (c / 2)).cast());
            let hw = if c % 2 == 1 { _mm512_srli_epi32::<8>(hw) } else { hw };
            for k in 0..4 {
                let nib = _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(4 * k as i32)), low4);
                let hb = _mm512_and_si512(_mm512_srl_epi32(hw, _mm_cvtsi32_si128(2 * k as i32)), high2);
                let w = _mm512_sub_epi16(_mm512_or_si512(nib, _mm512_slli_epi32::<4>(hb)), off);
                for t in 0..NT {
                    let ap = a[t].add(72 * b + 8 + 16 * c + 4 * k);
                    isum[t][c / 2] = _mm512_dpwssd_epi32(isum[t][c / 2], w, pair(ap));
                }
            }
        }
        let d0 = _mm512_mul_ps(dv, bytes_ps(st, true));
        let d1 = _mm512_mul_ps(dv, bytes_ps(st.add(16), true));
        for t in 0..NT {
            let da = _mm512_set1_ps(f32_at(a[t].add(72 * b)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][0]), _mm512_mul_ps(d0, da), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][1]), _mm512_mul_ps(d1, da), acc[t]);
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
}

/// Q8 tiles (512 quant bytes, 32 scale bytes) x `NT` A16 rows.
///
/// # Safety
/// As [`q4_tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_tile<const NT: usize>(
    nb: usize,
    q: *const u8,
    s: *const u8,
    _p: *const u8,
    a: [*const u8; NT],
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        let (qt, st) = (q.add(512 * b), s.add(32 * b));
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(st.cast()));
        let mut isum = [[_mm512_setzero_si512(); 2]; NT];
        for c in 0..8 {
            let v = _mm512_loadu_si512(qt.add(64 * c).cast());
            // Low bytes of each 16-bit half: elements (4c, 4c + 1); high bytes: (4c + 2, 4c + 3).
            let lo = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(v));
            let hi = _mm512_srai_epi16::<8>(v);
            for t in 0..NT {
                let ap = a[t].add(72 * b + 8 + 8 * c);
                isum[t][0] = _mm512_dpwssd_epi32(isum[t][0], lo, pair(ap));
                isum[t][1] = _mm512_dpwssd_epi32(isum[t][1], hi, pair(ap.add(4)));
            }
        }
        scale_block(&mut acc, &isum, &a, b, d, None);
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
}
