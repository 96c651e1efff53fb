//! AVX2 + FMA + F16C twins of the reference dot products: integer products within a block
//! (`vpmaddubsw` + `vpmaddwd`), one f32 FMA per block into a vector accumulator, one
//! horizontal sum at the end. Legacy formats go four blocks per step so their eight f16
//! scales convert in one `vcvtph2ps`; k-quants go one 256-element super-block per step.
//!
//! Followed: ggml/src/ggml-cpu/arch/x86/quants.c in ggml-org/llama.cpp (`ggml_vec_dot_*` AVX2
//! paths: nibble unpacking, `bytes_from_bits_32`, the Q4_K scale shuffles, the Q6_K bsums
//! trick), rewritten around unsigned quants: `sum (q - k) * a = sum q * a - k * sum a`.
//!
//! Every kernel here is reached only through [`vec_dot_fn`], which `super::vec_dot_fn_at`
//! calls only after `detected_simd()` has found AVX2, FMA and F16C; that is the safety
//! argument of each wrapper. All loads are unaligned (`loadu`): blocks sit at any address.

use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::reference::unpack_q4k_scales;
use super::{check_dot, GgmlType, VecDotFn};

/// The AVX2 kernel for weights of type `ty`; `None` for the activation-only types.
pub(super) fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    Some(match ty {
        GgmlType::F32 => vec_dot_f32_f32_avx2,
        GgmlType::F16 => vec_dot_f16_f32_avx2,
        GgmlType::BF16 => vec_dot_bf16_f32_avx2,
        GgmlType::Q4_0 => vec_dot_q4_0_q8_0_avx2,
        GgmlType::Q4_1 => vec_dot_q4_1_q8_1_avx2,
        GgmlType::Q5_0 => vec_dot_q5_0_q8_0_avx2,
        GgmlType::Q8_0 => vec_dot_q8_0_q8_0_avx2,
        GgmlType::Q4K => vec_dot_q4_k_q8_k_avx2,
        GgmlType::Q6K => vec_dot_q6_k_q8_k_avx2,
        GgmlType::Q8_1 | GgmlType::Q8K => return None,
    })
}

/// A safe `VecDotFn` wrapper: checks lengths, then runs the `unsafe` kernel on pointers.
macro_rules! wrapper {
    ($name:ident, $ty:expr, $kernel:ident) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let blocks = check_dot($ty, n, w, a);
            // SAFETY: this fn is handed out only after AVX2, FMA and F16C were detected (see
            // the module doc); `check_dot` proved `w` and `a` hold `blocks` blocks each.
            unsafe { $kernel(blocks, w.as_ptr(), a.as_ptr()) }
        }
    };
}

wrapper!(vec_dot_f32_f32_avx2, GgmlType::F32, f32_f32);
wrapper!(vec_dot_f16_f32_avx2, GgmlType::F16, f16_f32);
wrapper!(vec_dot_bf16_f32_avx2, GgmlType::BF16, bf16_f32);
wrapper!(vec_dot_q4_0_q8_0_avx2, GgmlType::Q4_0, q4_0_q8_0);
wrapper!(vec_dot_q4_1_q8_1_avx2, GgmlType::Q4_1, q4_1_q8_1);
wrapper!(vec_dot_q5_0_q8_0_avx2, GgmlType::Q5_0, q5_0_q8_0);
wrapper!(vec_dot_q8_0_q8_0_avx2, GgmlType::Q8_0, q8_0_q8_0);
wrapper!(vec_dot_q4_k_q8_k_avx2, GgmlType::Q4K, q4_k_q8_k);
wrapper!(vec_dot_q6_k_q8_k_avx2, GgmlType::Q6K, q6_k_q8_k);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    hsum_ps128(s)
}

/// Sum of the 4 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The two f16 at `p` (a 32-bit read) as f32 lanes 0 and 1 (lanes 2, 3 are zero).
///
/// Scales are always converted in pairs or more: a lone 16-bit load into a vector register
/// compiles to `vpinsrw` into whatever register is free, which can be an accumulator, and the
/// false dependency serializes the loop. A 32-bit load (`vmovd`) has no such input.
///
/// # Safety
/// `p` must be readable for 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_pair(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned(p.cast::<i32>())))
}

/// Four u16 at `p`, `p + stride`, ... packed into a u64, first in the low bits.
///
/// # Safety
/// The four 2-byte reads must be in bounds.
#[inline(always)]
unsafe fn gather4_u16(p: *const u8, stride: usize) -> i64 {
    let r = |k: usize| read_unaligned(p.add(k * stride).cast::<u16>()) as u64;
    (r(0) | (r(1) << 16) | (r(2) << 32) | (r(3) << 48)) as i64
}

/// The scales `f16(w.d) * f16(a.d)` of four consecutive blocks (`d` first in each block):
/// eight scalar 16-bit reads, one `vcvtph2ps`.
///
/// # Safety
/// Four blocks of `w_stride` / `a_stride` bytes readable at `w` / `a`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales4(w: *const u8, w_stride: usize, a: *const u8, a_stride: usize) -> __m256 {
    let f = _mm256_cvtph_ps(_mm_set_epi64x(
        gather4_u16(a, a_stride),
        gather4_u16(w, w_stride),
    ));
    _mm256_castps128_ps256(_mm_mul_ps(
        _mm256_castps256_ps128(f),
        _mm256_extractf128_ps::<1>(f),
    ))
}

/// Lane `k` of `v` in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane(v: __m256, k: i32) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(k))
}

/// Copies the last `count` (< 4) blocks into zeroed four-block buffers, so the last partial
/// step of a four-blocks-per-step loop runs the same code (a zero scale adds nothing).
///
/// # Safety
/// `count` blocks of `W / 4` and `A / 4` bytes readable at `w` and `a`.
#[inline(always)]
pub(super) unsafe fn pad_tail<const W: usize, const A: usize>(
    count: usize,
    w: *const u8,
    a: *const u8,
) -> ([u8; W], [u8; A]) {
    let (mut wt, mut at) = ([0u8; W], [0u8; A]);
    std::ptr::copy_nonoverlapping(w, wt.as_mut_ptr(), count * (W / 4));
    std::ptr::copy_nonoverlapping(a, at.as_mut_ptr(), count * (A / 4));
    (wt, at)
}

/// Runs `$step` on pointers to each group of four blocks, the last partial group padded.
macro_rules! by_fours {
    ($nb:expr, $w:expr, $a:expr, $wsize:literal, $asize:literal, |$x:ident, $y:ident| $step:expr) => {{
        let full = $nb - $nb % 4;
        for i in (0..full).step_by(4) {
            let ($x, $y) = ($w.add($wsize * i), $a.add($asize * i));
            $step;
        }
        if full < $nb {
            let (wt, at) = $crate::quant::avx2::pad_tail::<{ 4 * $wsize }, { 4 * $asize }>(
                $nb - full,
                $w.add($wsize * full),
                $a.add($asize * full),
            );
            let ($x, $y) = (wt.as_ptr(), at.as_ptr());
            $step;
        }
    }};
}
pub(super) use by_fours;

/// The f32 at `p`.
///
/// # Safety
/// `p` must be readable for 4 bytes.
#[inline(always)]
pub(super) unsafe fn f32_at(p: *const u8) -> f32 {
    read_unaligned(p.cast::<f32>())
}

/// 32 bytes from `p`, unaligned.
///
/// # Safety
/// `p` must be readable for 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// The 32 quants of a 16-byte nibble array in element order: low nibbles (elements 0..16),
/// then high nibbles (16..32).
///
/// # Safety
/// `p` must be readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte j is 0xFF where bit j of `bits` is set, else 0 (ggml's `bytes_from_bits_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bytes_from_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // Each byte keeps every bit but its own position; all-ones iff that bit was set.
    let probe = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(probe, _mm256_set1_epi64x(-1))
}

/// Eight i32 lanes, each the sum of four `u8 * i8` products (pairs must not saturate i16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// As [`dot_u8_i8`] for `(x - k) * y`, with `k` broadcast in `offset`: `x*y - k*y` in i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8_offset(x: __m256i, y: __m256i, offset: __m256i) -> __m256i {
    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(x, y), _mm256_maddubs_epi16(offset, y));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

// ---------------------------------------------------------------------------------------------
// Float weights x f32 activations.

/// The float dot-product loop: 4 x 8 lanes per step, then 8 at a time, then a scalar tail.
/// `$load(p)` turns the weights at element pointer `p` into 8 f32; `$scalar(p)` one f32.
macro_rules! float_dot {
    ($name:ident, $width:expr, $load:expr, $scalar:expr) => {
        /// # Safety
        /// `w` and `a` must be readable for `n` elements; AVX2, FMA and F16C must be present.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(n: usize, w: *const u8, a: *const u8) -> f32 {
            let a = a.cast::<f32>();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    *acc =
                        _mm256_fmadd_ps($load(w.add($width * j)), _mm256_loadu_ps(a.add(j)), *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] =
                    _mm256_fmadd_ps($load(w.add($width * i)), _mm256_loadu_ps(a.add(i)), acc[0]);
                i += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum_ps(sum);
            while i < n {
                total += $scalar(w.add($width * i)) * read_unaligned(a.add(i));
                i += 1;
            }
            total
        }
    };
}

float_dot!(
    f32_f32,
    4,
    |p: *const u8| _mm256_loadu_ps(p.cast()),
    |p: *const u8| f32_at(p)
);
float_dot!(
    f16_f32,
    2,
    |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
    |p: *const u8| half::f16::from_bits(read_unaligned(p.cast::<u16>())).to_f32()
);
float_dot!(
    bf16_f32,
    2,
    |p: *const u8| {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    },
    |p: *const u8| f32::from_bits((read_unaligned(p.cast::<u16>()) as u32) << 16)
);

// ---------------------------------------------------------------------------------------------
// Legacy formats: four 32-element blocks per step, their eight f16 scales in one conversion,
// one accumulator per block position.

/// Q4_0 (18-byte blocks) x Q8_0 (34-byte blocks).
///
/// # Safety
/// `w`, `a` readable for `nb` blocks each; AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let eight = _mm256_set1_epi8(8);
    let mut acc = [_mm256_setzero_ps(); 4];
    by_fours!(nb, w, a, 18, 34, |x, y| {
        let s = scales4(x, 18, y, 34);
        for (k, acc) in acc.iter_mut().enumerate() {
            let sums = dot_u8_i8_offset(nibbles(x.add(18 * k + 2)), load(y.add(34 * k + 2)), eight);
            *acc = _mm256_fmadd_ps(lane(s, k as i32), _mm256_cvtepi32_ps(sums), *acc);
        }
    });
    hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ))
}

/// Q4_1 (20-byte blocks) x Q8_1 (36-byte blocks). `d, m` and `d, s` are adjacent, so one
/// 32-bit read per block fetches both; the `m * s` products sum in the odd lanes of `acc_m`.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let gather = |p: *const u8, stride: usize| {
        let r = |k: usize| read_unaligned(p.add(k * stride).cast::<i32>());
        _mm_set_epi32(r(3), r(2), r(1), r(0))
    };
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_m = _mm256_setzero_ps();
    by_fours!(nb, w, a, 20, 36, |x, y| {
        // [d0*da0, m0*s0, d1*da1, m1*s1, ...]
        let p = _mm256_mul_ps(
            _mm256_cvtph_ps(gather(x, 20)),
            _mm256_cvtph_ps(gather(y, 36)),
        );
        acc_m = _mm256_add_ps(acc_m, p);
        for (k, acc) in acc.iter_mut().enumerate() {
            let sums = dot_u8_i8(nibbles(x.add(20 * k + 4)), load(y.add(36 * k + 4)));
            *acc = _mm256_fmadd_ps(lane(p, 2 * k as i32), _mm256_cvtepi32_ps(sums), *acc);
        }
    });
    let mins = _mm256_blend_ps::<0b1010_1010>(_mm256_setzero_ps(), acc_m);
    hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    )) + hsum_ps(mins)
}

/// Q5_0 (22-byte blocks) x Q8_0: the fifth bits come from `qh` as 0x10 per byte.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let sixteen = _mm256_set1_epi8(16);
    let mut acc = [_mm256_setzero_ps(); 4];
    by_fours!(nb, w, a, 22, 34, |x, y| {
        let s = scales4(x, 22, y, 34);
        for (k, acc) in acc.iter_mut().enumerate() {
            let xb = x.add(22 * k);
            let high = _mm256_and_si256(
                bytes_from_bits(read_unaligned(xb.add(2).cast::<u32>())),
                sixteen,
            );
            let q = _mm256_or_si256(nibbles(xb.add(6)), high);
            let sums = dot_u8_i8_offset(q, load(y.add(34 * k + 2)), sixteen);
            *acc = _mm256_fmadd_ps(lane(s, k as i32), _mm256_cvtepi32_ps(sums), *acc);
        }
    });
    hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ))
}

/// Q8_0 x Q8_0: signed x signed through `|x| * (y with x's sign)`.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    by_fours!(nb, w, a, 34, 34, |x, y| {
        let s = scales4(x, 34, y, 34);
        for (k, acc) in acc.iter_mut().enumerate() {
            let (xv, yv) = (load(x.add(34 * k + 2)), load(y.add(34 * k + 2)));
            let sums = dot_u8_i8(_mm256_abs_epi8(xv), _mm256_sign_epi8(yv, xv));
            *acc = _mm256_fmadd_ps(lane(s, k as i32), _mm256_cvtepi32_ps(sums), *acc);
        }
    });
    hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ))
}

// ---------------------------------------------------------------------------------------------
// k-quants: one 256-element super-block per step.

/// `vpshufb` control that broadcasts i16 lane `k` of each 128-bit half to all 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn broadcast_i16_lane(k: i32) -> __m256i {
    _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16)
}

/// Q4_K (144-byte blocks) x Q8_K (292-byte blocks).
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_q8_k(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(144 * i), a.add(292 * i));
        // [d * dy, dmin * dy]
        let dd = _mm_mul_ps(f16_pair(x), _mm_set1_ps(f32_at(y)));
        let unpacked = unpack_q4k_scales(&*x.add(4).cast::<[u8; 12]>());
        // i16 lanes: scales 0..8, then mins 0..8.
        let sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(unpacked.as_ptr().cast()));

        // Min term: mins . (activation sums of each 32), the sums from `bsums` pairs.
        let bsums = load(y.add(260));
        let sums32 = _mm_hadd_epi16(
            _mm256_castsi256_si128(bsums),
            _mm256_extracti128_si256::<1>(bsums),
        );
        let mprod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), sums32);
        acc_m = _mm_fmadd_ps(
            _mm_permute_ps::<0b0101_0101>(dd),
            _mm_cvtepi32_ps(mprod),
            acc_m,
        );

        let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm));
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q = load(x.add(16 + 32 * c));
            let q_lo = _mm256_and_si256(q, low4);
            let q_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
            let s_lo = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c as i32));
            let s_hi = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c as i32 + 1));
            let p_lo = _mm256_maddubs_epi16(q_lo, load(y.add(4 + 64 * c)));
            let p_hi = _mm256_maddubs_epi16(q_hi, load(y.add(36 + 64 * c)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_lo, s_lo));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_hi, s_hi));
        }
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - hsum_ps128(acc_m)
}

/// Q6_K (210-byte blocks) x Q8_K: unsigned 6-bit quants, minus `32 * sum(sc * bsums)`.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_q8_k(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(210 * i), a.add(292 * i));
        // The 32-bit read at 206 ends with `d` (lane 1); lane 0 is two scale bytes, unused.
        let d = _mm_cvtss_f32(_mm_movehdup_ps(f16_pair(x.add(206)))) * f32_at(y);
        let scales = _mm_loadu_si128(x.add(192).cast());
        // 32 * sum_g sc_g * bsum_g, as 8 i32 lanes.
        let corr = _mm256_madd_epi16(load(y.add(260)), _mm256_cvtepi8_epi16(scales));
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(corr));
        for h in 0..2 {
            let q1 = load(x.add(64 * h));
            let q2 = load(x.add(64 * h + 32));
            let qh = load(x.add(128 + 32 * h));
            let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)));
            let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)));
            let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
            let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)));
            let quants = [
                _mm256_or_si256(_mm256_and_si256(q1, low4), h0),
                _mm256_or_si256(_mm256_and_si256(q2, low4), h1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q1), low4), h2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q2), low4), h3),
            ];
            for (k, &q) in quants.iter().enumerate() {
                // Groups 8h + 2k and 8h + 2k + 1 (16 elements each) share this vector.
                let g = (8 * h + 2 * k) as i64;
                let pick =
                    _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                let p = _mm256_maddubs_epi16(q, load(y.add(4 + 128 * h + 32 * k)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}
