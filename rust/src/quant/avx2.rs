//! AVX2 + FMA + F16C twins of the reference dot products, one row at a time, against A16
//! (16-bit) activations: weights unpacked to bytes, widened to i16, `vpmaddwd` against the
//! activations, one f32 FMA per 32-element block (per 16 for Q6_K) into a vector
//! accumulator, one horizontal sum at the end. These are also the per-row kernels of the
//! AVX-512 levels (the AVX-512 quantized work is in the repacked multi-row kernels).
//!
//! Followed: ggml/src/ggml-cpu/arch/x86/quants.c in ggml-org/llama.cpp (`ggml_vec_dot_*` AVX2
//! paths: nibble unpacking, `bytes_from_bits_32`, the Q6_K bit assembly), widened to i16.
//!
//! Every kernel here is reached only through [`vec_dot_fn`], which `super::vec_dot_fn_at`
//! calls only after `cpu_simd()` has found AVX2, FMA and F16C; that is the safety
//! argument of each wrapper. All loads are unaligned (`loadu`): blocks sit at any address.

use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::reference::unpack_q4k_scales;
use super::blocks::BlockA16;
use super::{check_dot, GgmlType, VecDotFn};

/// Bytes of one A16 activation block; its quants start at byte 8.
const A16: usize = std::mem::size_of::<BlockA16>();

/// The AVX2 kernel for weights of type `ty`; `None` for the activation-only types and the
/// types with only a scalar kernel (Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4).
pub(super) fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    Some(match ty {
        GgmlType::F32 => vec_dot_f32_f32_avx2,
        GgmlType::F16 => vec_dot_f16_f32_avx2,
        GgmlType::BF16 => vec_dot_bf16_f32_avx2,
        GgmlType::Q4_0 => vec_dot_q4_0_a16_avx2,
        GgmlType::Q4_1 => vec_dot_q4_1_a16_avx2,
        GgmlType::Q5_0 => vec_dot_q5_0_a16_avx2,
        GgmlType::Q8_0 => vec_dot_q8_0_a16_avx2,
        GgmlType::Q4K => vec_dot_q4_k_a16_avx2,
        GgmlType::Q6K => vec_dot_q6_k_a16_avx2,
        // No per-row SIMD twin yet: these run the scalar reference per row.
        GgmlType::Q5_1
        | GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q5K
        | GgmlType::IQ4NL
        | GgmlType::IQ4XS
        | GgmlType::MXFP4 => return None,
        GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16 => return None,
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
wrapper!(vec_dot_q4_0_a16_avx2, GgmlType::Q4_0, q4_0_a16);
wrapper!(vec_dot_q4_1_a16_avx2, GgmlType::Q4_1, q4_1_a16);
wrapper!(vec_dot_q5_0_a16_avx2, GgmlType::Q5_0, q5_0_a16);
wrapper!(vec_dot_q8_0_a16_avx2, GgmlType::Q8_0, q8_0_a16);
wrapper!(vec_dot_q4_k_a16_avx2, GgmlType::Q4K, q4_k_a16);
wrapper!(vec_dot_q6_k_a16_avx2, GgmlType::Q6K, q6_k_a16);

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
// Quantized weights x A16 activations: weights widened to i16, `vpmaddwd` against the i16
// activations (pairs of products fit i32: |q| <= 128, |a| <= 32767), one f32 FMA per block
// (per group of 16 for Q6_K) into a vector accumulator.

/// The f16 at `p` as f32 (a 16-bit integer load, then `vmovd` + `vcvtph2ps`).
///
/// # Safety
/// `p` must be readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = read_unaligned(p.cast::<u16>()) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// 8 i32 lanes summing to `w . a` over one A16 block, `w0` / `w1` its elements 0..16 / 16..32.
///
/// # Safety
/// `a` readable for one A16 block (76 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot32(w0: __m256i, w1: __m256i, a: *const u8) -> __m256i {
    let q = a.add(8);
    _mm256_add_epi32(_mm256_madd_epi16(w0, load(q)), _mm256_madd_epi16(w1, load(q.add(32))))
}

/// `acc + dot * scale` with the i32 lanes of `dot` converted to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fma_i32(acc: __m256, dot: __m256i, scale: f32) -> __m256 {
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc)
}

/// Low / high 16 bytes of `v` sign-extended to i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_i8(v: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)),
        _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(v)),
    )
}

/// Q4_0 (18-byte blocks) x A16 (76-byte blocks).
///
/// # Safety
/// `w`, `a` readable for `nb` blocks each; AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_a16(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let eight = _mm256_set1_epi8(8);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(18 * i), a.add(A16 * i));
        let (w0, w1) = widen_i8(_mm256_sub_epi8(nibbles(x.add(2)), eight));
        acc = fma_i32(acc, dot32(w0, w1, y), f16_at(x) * f32_at(y));
    }
    hsum_ps(acc)
}

/// Q4_1 (20-byte blocks) x A16: the mins meet the activation sums `s`.
///
/// # Safety
/// As [`q4_0_a16`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_a16(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0.0f32;
    for i in 0..nb {
        let (x, y) = (w.add(20 * i), a.add(A16 * i));
        let dm = f16_pair(x);
        let (w0, w1) = widen_i8(nibbles(x.add(4)));
        acc = fma_i32(acc, dot32(w0, w1, y), _mm_cvtss_f32(dm) * f32_at(y));
        mins += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * f32_at(y.add(4));
    }
    hsum_ps(acc) + mins
}

/// Q5_0 (22-byte blocks) x A16.
///
/// # Safety
/// As [`q4_0_a16`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_a16(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let (bit4, sixteen) = (_mm256_set1_epi8(0x10), _mm256_set1_epi8(16));
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(22 * i), a.add(A16 * i));
        let high = _mm256_and_si256(bytes_from_bits(read_unaligned(x.add(2).cast::<u32>())), bit4);
        let q = _mm256_sub_epi8(_mm256_or_si256(nibbles(x.add(6)), high), sixteen);
        let (w0, w1) = widen_i8(q);
        acc = fma_i32(acc, dot32(w0, w1, y), f16_at(x) * f32_at(y));
    }
    hsum_ps(acc)
}

/// Q8_0 (34-byte blocks) x A16.
///
/// # Safety
/// As [`q4_0_a16`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_a16(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(34 * i), a.add(A16 * i));
        let (w0, w1) = widen_i8(load(x.add(2)));
        acc = fma_i32(acc, dot32(w0, w1, y), f16_at(x) * f32_at(y));
    }
    hsum_ps(acc)
}

/// Q4_K (144-byte blocks) x A16 (eight blocks per super-block): sub-block scales applied in
/// f32 per A16 block, the mins against the activation sums.
///
/// # Safety
/// `w` readable for `nb` Q4_K blocks, `a` for `8 * nb` A16 blocks; AVX2, FMA, F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_a16(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0.0f32;
    for i in 0..nb {
        let x = w.add(144 * i);
        let ys = a.add(A16 * 8 * i);
        let dd = f16_pair(x);
        let (d, dmin) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
        let sm = unpack_q4k_scales(&*x.add(4).cast::<[u8; 12]>());
        let mut msum = 0.0f32;
        for c in 0..4 {
            let t = load(x.add(16 + 32 * c));
            let halves = [_mm256_and_si256(t, low4), _mm256_and_si256(_mm256_srli_epi16::<4>(t), low4)];
            for (h, q) in halves.into_iter().enumerate() {
                let j = 2 * c + h;
                let y = ys.add(A16 * j);
                let w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
                let w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q));
                acc = fma_i32(acc, dot32(w0, w1, y), d * sm[j] as f32 * f32_at(y));
                msum += sm[8 + j] as f32 * f32_at(y.add(4));
            }
        }
        mins += dmin * msum;
    }
    hsum_ps(acc) - mins
}

/// Q6_K (210-byte blocks) x A16 (eight blocks per super-block): each 16-element group's
/// products summed in i32, then scaled in f32 (an i32 sum of `sc * dot` could overflow).
///
/// # Safety
/// As [`q4_k_a16`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_a16(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let (low4, two, off) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let x = w.add(210 * i);
        let ys = a.add(A16 * 8 * i);
        let d = f16_at(x.add(208));
        let sc = x.add(192).cast::<i8>();
        for h in 0..2 {
            let (ql0, ql1) = (load(x.add(64 * h)), load(x.add(64 * h + 32)));
            let qh = load(x.add(128 + 32 * h));
            let high = |shift: __m128i| _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(qh, shift), two));
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, low4), high(_mm_cvtsi32_si128(0))),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), high(_mm_cvtsi32_si128(2))),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), high(_mm_cvtsi32_si128(4))),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4), high(_mm_cvtsi32_si128(6))),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let jb = 4 * h + k;
                let y = ys.add(A16 * jb);
                let (w0, w1) = widen_i8(_mm256_sub_epi8(q, off));
                let da = d * f32_at(y);
                let qa = y.add(8);
                acc = fma_i32(acc, _mm256_madd_epi16(w0, load(qa)), da * *sc.add(2 * jb) as f32);
                acc = fma_i32(acc, _mm256_madd_epi16(w1, load(qa.add(32))), da * *sc.add(2 * jb + 1) as f32);
            }
        }
    }
    hsum_ps(acc)
}
