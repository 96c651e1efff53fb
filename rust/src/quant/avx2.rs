//! AVX2 + FMA + F16C twins of the reference dot products, one block (or super-block) per
//! loop step: integer products within a block (`vpmaddubsw` + `vpmaddwd`), one f32 FMA per
//! block into a vector accumulator, one horizontal sum at the end.
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

/// The f16 at `p` as f32.
///
/// # Safety
/// `p` must be readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = read_unaligned(p.cast::<u16>());
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

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
        _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
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
                    *acc = _mm256_fmadd_ps($load(w.add($width * j)), _mm256_loadu_ps(a.add(j)), *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(w.add($width * i)), _mm256_loadu_ps(a.add(i)), acc[0]);
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

float_dot!(f32_f32, 4, |p: *const u8| _mm256_loadu_ps(p.cast()), |p: *const u8| f32_at(p));
float_dot!(
    f16_f32,
    2,
    |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
    |p: *const u8| f16_at(p)
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
// Legacy formats: one 32-element block per step.

/// Q4_0 (18-byte blocks) x Q8_0 (34-byte blocks).
///
/// # Safety
/// `w`, `a` readable for `nb` blocks each; AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let eight = _mm256_set1_epi8(8);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(18 * i), a.add(34 * i));
        let d = _mm256_set1_ps(f16_at(x) * f16_at(y));
        let sums = dot_u8_i8_offset(nibbles(x.add(2)), load(y.add(2)), eight);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc);
    }
    hsum_ps(acc)
}

/// Q4_1 (20-byte blocks) x Q8_1 (36-byte blocks): the min term `m * s` sums in a scalar.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0.0f32;
    for i in 0..nb {
        let (x, y) = (w.add(20 * i), a.add(36 * i));
        let d = _mm256_set1_ps(f16_at(x) * f16_at(y));
        mins += f16_at(x.add(2)) * f16_at(y.add(2));
        let sums = dot_u8_i8(nibbles(x.add(4)), load(y.add(4)));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc);
    }
    hsum_ps(acc) + mins
}

/// Q5_0 (22-byte blocks) x Q8_0: the fifth bits come from `qh` as 0x10 per byte.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let sixteen = _mm256_set1_epi8(16);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(22 * i), a.add(34 * i));
        let d = _mm256_set1_ps(f16_at(x) * f16_at(y));
        let high = _mm256_and_si256(bytes_from_bits(read_unaligned(x.add(2).cast::<u32>())), sixteen);
        let q = _mm256_or_si256(nibbles(x.add(6)), high);
        let sums = dot_u8_i8_offset(q, load(y.add(2)), sixteen);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc);
    }
    hsum_ps(acc)
}

/// Q8_0 x Q8_0: signed x signed through `|x| * (y with x's sign)`.
///
/// # Safety
/// As [`q4_0_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(34 * i), a.add(34 * i));
        let d = _mm256_set1_ps(f16_at(x) * f16_at(y));
        let (xv, yv) = (load(x.add(2)), load(y.add(2)));
        let sums = dot_u8_i8(_mm256_abs_epi8(xv), _mm256_sign_epi8(yv, xv));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc);
    }
    hsum_ps(acc)
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
        let dy = f32_at(y);
        let d = f16_at(x) * dy;
        let dmin = f16_at(x.add(2)) * dy;
        let unpacked = unpack_q4k_scales(&*x.add(4).cast::<[u8; 12]>());
        // i16 lanes: scales 0..8, then mins 0..8.
        let sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(unpacked.as_ptr().cast()));

        // Min term: mins . (activation sums of each 32), the sums from `bsums` pairs.
        let bsums = load(y.add(260));
        let sums32 = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256::<1>(bsums));
        let mprod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), sums32);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(mprod), acc_m);

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
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
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
        let d = f16_at(x.add(208)) * f32_at(y);
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
                let pick = _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                let p = _mm256_maddubs_epi16(q, load(y.add(4 + 128 * h + 32 * k)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}
