//! AVX-512 twins of the reference dot products, in two builds from one source: `base`
//! (F, BW, VL: `vpmaddubsw` + `vpmaddwd`) and `vnni` (adds VNNI: `vpdpbusd` / `vpdpwssd`
//! fuse the multiply, pair-sum and accumulate).
//!
//! Legacy formats run four 32-element blocks per step: two 512-bit registers of two blocks
//! each; the f16 scales come in by masked loads and one `vpermt2w`, are converted by
//! `vcvtph2ps` and spread to the lanes of their block by `vpermps`. A last step of fewer than four blocks runs on a zero-padded copy (a
//! zero scale contributes nothing). k-quants run one 256-element super-block per step with
//! i32 accumulation across it and one FMA at its end.
//!
//! Followed: ggml/src/ggml-cpu/arch/x86/quants.c (AVX2/AVX-512 `ggml_vec_dot_*`, the bsums
//! trick for the Q4_K mins and Q6_K's offset) and the repack idea in repack.cpp of
//! ggml-org/llama.cpp; the register layouts here are our own.
//!
//! Every kernel is reached only through [`vec_dot_fn`], which `super::vec_dot_fn_at` calls
//! only after `detected_simd()` found the matching level (AVX-512 F/BW/VL with AVX2, FMA and
//! F16C; plus VNNI for the `vnni` build). All loads are unaligned or masked.

use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::avx2::{by_fours, f16_pair, f32_at, hsum_ps};
use super::reference::unpack_q4k_scales;
use super::{check_dot, GgmlType, VecDotFn};

/// The AVX-512 kernel for weights of type `ty` (the VNNI build when `vnni`); `None` for the
/// activation-only types. The float types have one kernel for both builds.
pub(super) fn vec_dot_fn(ty: GgmlType, vnni: bool) -> Option<VecDotFn> {
    Some(match (ty, vnni) {
        (GgmlType::F32, _) => vec_dot_f32_f32_avx512,
        (GgmlType::F16, _) => vec_dot_f16_f32_avx512,
        (GgmlType::BF16, _) => vec_dot_bf16_f32_avx512,
        (GgmlType::Q4_0, false) => base::vec_dot_q4_0_q8_0,
        (GgmlType::Q4_1, false) => base::vec_dot_q4_1_q8_1,
        (GgmlType::Q5_0, false) => base::vec_dot_q5_0_q8_0,
        (GgmlType::Q8_0, false) => base::vec_dot_q8_0_q8_0,
        (GgmlType::Q4K, false) => base::vec_dot_q4_k_q8_k,
        (GgmlType::Q6K, false) => base::vec_dot_q6_k_q8_k,
        (GgmlType::Q4_0, true) => vnni::vec_dot_q4_0_q8_0,
        (GgmlType::Q4_1, true) => vnni::vec_dot_q4_1_q8_1,
        (GgmlType::Q5_0, true) => vnni::vec_dot_q5_0_q8_0,
        (GgmlType::Q8_0, true) => vnni::vec_dot_q8_0_q8_0,
        (GgmlType::Q4K, true) => vnni::vec_dot_q4_k_q8_k,
        (GgmlType::Q6K, true) => vnni::vec_dot_q6_k_q8_k,
        (GgmlType::Q8_1 | GgmlType::Q8K, _) => return None,
    })
}

/// A safe `VecDotFn` wrapper: checks lengths, then runs the `unsafe` kernel on pointers.
macro_rules! wrapper {
    ($name:ident, $ty:expr, $kernel:ident) => {
        pub(super) fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let blocks = check_dot($ty, n, w, a);
            // SAFETY: handed out only after the CPU was found to have the features this
            // kernel enables (module doc); `check_dot` proved both rows hold `blocks` blocks.
            unsafe { $kernel(blocks, w.as_ptr(), a.as_ptr()) }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Float weights x f32 activations (no integer work: one build serves both levels).

/// 64 elements per step in four accumulators, then 16 at a time, then one masked step.
/// `$load(p)` / `$masked(m, p)` turn the weights at element pointer `p` into 16 f32.
macro_rules! float_dot {
    ($name:ident, $width:expr, |$p:ident| $load:expr, |$m:ident, $q:ident| $masked:expr) => {
        /// # Safety
        /// `w` and `a` readable for `n` elements; AVX-512 F/BW/VL, AVX2, FMA, F16C present.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $name(n: usize, w: *const u8, a: *const u8) -> f32 {
            let a = a.cast::<f32>();
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 16 * k;
                    let $p = w.add($width * j);
                    *acc = _mm512_fmadd_ps($load, _mm512_loadu_ps(a.add(j)), *acc);
                }
                i += 64;
            }
            while i + 16 <= n {
                let $p = w.add($width * i);
                acc[0] = _mm512_fmadd_ps($load, _mm512_loadu_ps(a.add(i)), acc[0]);
                i += 16;
            }
            if i < n {
                // Masked loads read only the `n - i` live lanes and zero the rest.
                let $m: __mmask16 = (1u16 << (n - i)) - 1;
                let $q = w.add($width * i);
                acc[1] = _mm512_fmadd_ps($masked, _mm512_maskz_loadu_ps($m, a.add(i)), acc[1]);
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            _mm512_reduce_add_ps(sum)
        }
    };
}

float_dot!(f32_f32, 4, |p| _mm512_loadu_ps(p.cast()), |m, p| {
    _mm512_maskz_loadu_ps(m, p.cast())
});
float_dot!(
    f16_f32,
    2,
    |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
    |m, p| _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))
);
float_dot!(
    bf16_f32,
    2,
    |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256(p.cast())
    ))),
    |m, p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(m, p.cast())
    )))
);

wrapper!(vec_dot_f32_f32_avx512, GgmlType::F32, f32_f32);
wrapper!(vec_dot_f16_f32_avx512, GgmlType::F16, f16_f32);
wrapper!(vec_dot_bf16_f32_avx512, GgmlType::BF16, bf16_f32);

// ---------------------------------------------------------------------------------------------
// Helpers shared by both builds (base features, so both can inline them).

/// Where the f16 scales of four consecutive blocks lie in the 128 bytes from their start:
/// masked 16-bit loads fetch only those halves (`lo` from the first 64 bytes, `hi` from the
/// next 64), and `vpermt2w` with `idx` moves them to the low lanes: lanes 0..4 the `d` of each
/// block or, for `pairs`, lanes 2k and 2k + 1 the adjacent `d, m` / `d, s` of block k.
///
/// Masked loads read nothing past the halves they name (so no read leaves the four blocks),
/// and they keep the compiler from rebuilding the quant loads out of a wide scale load.
struct ScaleGather {
    idx: [i16; 32],
    lo: u32,
    hi: u32,
}

const fn scale_gather(stride: usize, pairs: bool) -> ScaleGather {
    let mut g = ScaleGather {
        idx: [0; 32],
        lo: 0,
        hi: 0,
    };
    let per_block = if pairs { 2 } else { 1 };
    let mut k = 0;
    while k < 4 {
        let mut j = 0;
        while j < per_block {
            let half = k * stride / 2 + j;
            if half < 32 {
                g.lo |= 1 << half;
            } else {
                g.hi |= 1 << (half - 32);
            }
            // vpermt2w numbers the halves of both sources 0..64, as in memory.
            g.idx[per_block * k + j] = half as i16;
            j += 1;
        }
        k += 1;
    }
    g
}

const SCALES_18: ScaleGather = scale_gather(18, false);
const SCALES_22: ScaleGather = scale_gather(22, false);
const SCALES_34: ScaleGather = scale_gather(34, false);
const PAIRS_20: ScaleGather = scale_gather(20, true);
const PAIRS_36: ScaleGather = scale_gather(36, true);

/// The halves named by `g` from the four blocks at `p`, in the low lanes.
///
/// # Safety
/// The named halves must be readable (they lie inside the four blocks).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn halves(p: *const u8, g: &ScaleGather) -> __m128i {
    let idx = _mm512_loadu_si512(g.idx.as_ptr().cast());
    let lo = _mm512_maskz_loadu_epi16(g.lo, p.cast());
    let hi = _mm512_maskz_loadu_epi16(g.hi, p.add(64).cast());
    _mm512_castsi512_si128(_mm512_permutex2var_epi16(lo, idx, hi))
}

/// The four block scales `f16(w.d) * f16(a.d)` in lanes 0..4.
///
/// # Safety
/// Four blocks readable at `w` and at `a`, laid out as `wg` and `ag` describe.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn scales4(w: *const u8, wg: &ScaleGather, a: *const u8, ag: &ScaleGather) -> __m512 {
    _mm512_castps128_ps512(_mm_mul_ps(
        _mm_cvtph_ps(halves(w, wg)),
        _mm_cvtph_ps(halves(a, ag)),
    ))
}

/// Spreads lanes `i` and `j` of `s` over the two 8-lane halves of a register: the scale of
/// each i32 lane of a two-block product.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn spread(s: __m512, i: i32, j: i32) -> __m512 {
    let idx = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(i), _mm512_set1_epi32(j));
    _mm512_permutexvar_ps(idx, s)
}

/// The 64 quants of two 16-byte nibble arrays in element order: block at `p0` (elements 0..16
/// from the low nibbles, 16..32 from the high), then the block at `p1`.
///
/// # Safety
/// 16 bytes readable at `p0` and at `p1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn nibbles2(p0: *const u8, p1: *const u8) -> __m512i {
    let both = _mm256_loadu2_m128i(p1.cast(), p0.cast());
    // qwords [0,1,0,1,2,3,2,3]: each block twice; the second copy shifted down a nibble.
    let twice = _mm512_permutexvar_epi64(
        _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0),
        _mm512_castsi256_si512(both),
    );
    let shifted = _mm512_srlv_epi64(twice, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
}

/// 32 bytes at `p0` then 32 bytes at `p1`.
///
/// # Safety
/// 32 bytes readable at `p0` and at `p1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load2(p0: *const u8, p1: *const u8) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_loadu_si256(p0.cast())),
        _mm256_loadu_si256(p1.cast()),
    )
}

/// `[i16; 32]` with lane `l` = `l / width`.
const fn lane_groups(width: usize) -> [i16; 32] {
    let mut out = [0i16; 32];
    let mut l = 0;
    while l < 32 {
        out[l] = (l / width) as i16;
        l += 1;
    }
    out
}
/// Lane `l` = `l / 16`: picks one of two i16 values per half register.
static HALVES: [i16; 32] = lane_groups(16);
/// Lane `l` = `l / 8`: picks one of four i16 values per quarter register.
static QUARTERS: [i16; 32] = lane_groups(8);

// ---------------------------------------------------------------------------------------------
// The integer primitives that differ between the builds.

mod ops_base {
    //! Without VNNI: `vpmaddubsw` (u8 x i8 pairs to i16) then `vpmaddwd`.
    use std::arch::x86_64::*;

    /// 16 i32 lanes, each the sum of four `u8 * i8` products.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub fn dot_u8_i8(x: __m512i, y: __m512i) -> __m512i {
        _mm512_madd_epi16(_mm512_maddubs_epi16(x, y), _mm512_set1_epi16(1))
    }

    /// As [`dot_u8_i8`] for `(x - k) * y`, `k` broadcast in `offset`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub fn dot_u8_i8_offset(x: __m512i, y: __m512i, offset: __m512i) -> __m512i {
        let p = _mm512_sub_epi16(_mm512_maddubs_epi16(x, y), _mm512_maddubs_epi16(offset, y));
        _mm512_madd_epi16(p, _mm512_set1_epi16(1))
    }

    /// `acc + sum of pairs of (x . y)_i16 * scales_i16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub fn dot_scaled(acc: __m512i, x: __m512i, y: __m512i, scales: __m512i) -> __m512i {
        _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(x, y), scales))
    }
}

mod ops_vnni {
    //! With VNNI: `vpdpbusd` (u8 x i8, four per i32 lane) and `vpdpwssd` (i16 pairs).
    use std::arch::x86_64::*;

    /// 16 i32 lanes, each the sum of four `u8 * i8` products.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn dot_u8_i8(x: __m512i, y: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, y)
    }

    /// As [`dot_u8_i8`] for `(x - k) * y`, `k` broadcast in `offset`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn dot_u8_i8_offset(x: __m512i, y: __m512i, offset: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        _mm512_sub_epi32(
            _mm512_dpbusd_epi32(zero, x, y),
            _mm512_dpbusd_epi32(zero, offset, y),
        )
    }

    /// `acc + sum of pairs of (x . y)_i16 * scales_i16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn dot_scaled(acc: __m512i, x: __m512i, y: __m512i, scales: __m512i) -> __m512i {
        _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(x, y), scales)
    }
}

// ---------------------------------------------------------------------------------------------
// The quantized kernels, instantiated once per build.

macro_rules! quant_kernels {
    ($features:literal, $ops:ident) => {
        use std::arch::x86_64::*;

        use super::$ops::{dot_scaled, dot_u8_i8, dot_u8_i8_offset};
        use super::*;

        wrapper!(vec_dot_q4_0_q8_0, GgmlType::Q4_0, q4_0_q8_0);
        wrapper!(vec_dot_q4_1_q8_1, GgmlType::Q4_1, q4_1_q8_1);
        wrapper!(vec_dot_q5_0_q8_0, GgmlType::Q5_0, q5_0_q8_0);
        wrapper!(vec_dot_q8_0_q8_0, GgmlType::Q8_0, q8_0_q8_0);
        wrapper!(vec_dot_q4_k_q8_k, GgmlType::Q4K, q4_k_q8_k);
        wrapper!(vec_dot_q6_k_q8_k, GgmlType::Q6K, q6_k_q8_k);

        /// Q4_0 (18-byte blocks) x Q8_0 (34-byte blocks).
        ///
        /// # Safety
        /// `nb` blocks readable at `w` and `a`; the build's features present.
        #[target_feature(enable = $features)]
        unsafe fn q4_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
            let eight = _mm512_set1_epi8(8);
            let mut acc = [_mm512_setzero_ps(); 2];
            by_fours!(nb, w, a, 18, 34, |x, y| {
                let s = scales4(x, &SCALES_18, y, &SCALES_34);
                let i01 = dot_u8_i8_offset(
                    nibbles2(x.add(2), x.add(20)),
                    load2(y.add(2), y.add(36)),
                    eight,
                );
                let i23 = dot_u8_i8_offset(
                    nibbles2(x.add(38), x.add(56)),
                    load2(y.add(70), y.add(104)),
                    eight,
                );
                acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01), spread(s, 0, 1), acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i23), spread(s, 2, 3), acc[1]);
            });
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }

        /// Q4_1 (20-byte blocks) x Q8_1 (36-byte blocks). `d, m` and `d, s` are adjacent, so
        /// one 32-bit read per block fetches both halves; the `m * s` products sum in the odd
        /// lanes of `acc_m`.
        ///
        /// # Safety
        /// As [`q4_0_q8_0`].
        #[target_feature(enable = $features)]
        unsafe fn q4_1_q8_1(nb: usize, w: *const u8, a: *const u8) -> f32 {
            let mut acc = [_mm512_setzero_ps(); 2];
            let mut acc_m = _mm256_setzero_ps();
            by_fours!(nb, w, a, 20, 36, |x, y| {
                // [d0*da0, m0*s0, d1*da1, m1*s1, ...]
                let p = _mm256_mul_ps(
                    _mm256_cvtph_ps(halves(x, &PAIRS_20)),
                    _mm256_cvtph_ps(halves(y, &PAIRS_36)),
                );
                acc_m = _mm256_add_ps(acc_m, p);
                let p = _mm512_castps256_ps512(p);
                let i01 = dot_u8_i8(nibbles2(x.add(4), x.add(24)), load2(y.add(4), y.add(40)));
                let i23 = dot_u8_i8(nibbles2(x.add(44), x.add(64)), load2(y.add(76), y.add(112)));
                acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01), spread(p, 0, 2), acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i23), spread(p, 4, 6), acc[1]);
            });
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
                + hsum_ps(_mm256_maskz_mov_ps(0xAA, acc_m))
        }

        /// Q5_0 (22-byte blocks) x Q8_0: the fifth bits of two blocks form one 64-bit byte
        /// mask (bit k is byte k of the register, both in element order).
        ///
        /// # Safety
        /// As [`q4_0_q8_0`].
        #[target_feature(enable = $features)]
        unsafe fn q5_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
            let sixteen = _mm512_set1_epi8(16);
            let mut acc = [_mm512_setzero_ps(); 2];
            let quants = |x: *const u8| {
                let high = read_unaligned(x.add(2).cast::<u32>()) as u64
                    | (read_unaligned(x.add(24).cast::<u32>()) as u64) << 32;
                let q = nibbles2(x.add(6), x.add(28));
                _mm512_mask_add_epi8(q, high, q, sixteen)
            };
            by_fours!(nb, w, a, 22, 34, |x, y| {
                let s = scales4(x, &SCALES_22, y, &SCALES_34);
                let i01 = dot_u8_i8_offset(quants(x), load2(y.add(2), y.add(36)), sixteen);
                let i23 =
                    dot_u8_i8_offset(quants(x.add(44)), load2(y.add(70), y.add(104)), sixteen);
                acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01), spread(s, 0, 1), acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i23), spread(s, 2, 3), acc[1]);
            });
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }

        /// Q8_0 x Q8_0: signed x signed as `|x| * (y negated where x < 0)`. Activations must
        /// lie in -127..=127 (the quantizers guarantee it) so no product pair saturates.
        ///
        /// # Safety
        /// As [`q4_0_q8_0`].
        #[target_feature(enable = $features)]
        unsafe fn q8_0_q8_0(nb: usize, w: *const u8, a: *const u8) -> f32 {
            let mut acc = [_mm512_setzero_ps(); 2];
            let dot = |xv: __m512i, yv: __m512i| {
                let negate = _mm512_movepi8_mask(xv);
                let yv = _mm512_mask_sub_epi8(yv, negate, _mm512_setzero_si512(), yv);
                dot_u8_i8(_mm512_abs_epi8(xv), yv)
            };
            by_fours!(nb, w, a, 34, 34, |x, y| {
                let s = scales4(x, &SCALES_34, y, &SCALES_34);
                let i01 = dot(load2(x.add(2), x.add(36)), load2(y.add(2), y.add(36)));
                let i23 = dot(load2(x.add(70), x.add(104)), load2(y.add(70), y.add(104)));
                acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01), spread(s, 0, 1), acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i23), spread(s, 2, 3), acc[1]);
            });
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }

        /// Q4_K (144-byte blocks) x Q8_K (292-byte blocks). Each 64-element chunk is one
        /// register: 32 low nibbles (sub-block 2c) then 32 high nibbles (2c + 1), scaled per
        /// i16 pair lane by `dot_scaled`; the mins meet the `bsums` in one `vpmaddwd`.
        ///
        /// # Safety
        /// As [`q4_0_q8_0`].
        #[target_feature(enable = $features)]
        unsafe fn q4_k_q8_k(nb: usize, w: *const u8, a: *const u8) -> f32 {
            let low4 = _mm512_set1_epi8(0x0F);
            let nibble_shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
            let halves = _mm512_loadu_si512(HALVES.as_ptr().cast());
            // i16 lanes [8, 8, 9, 9, ..., 15, 15]: each min twice, against two bsums.
            let min_pairs = _mm256_add_epi16(
                _mm256_srli_epi16::<1>(_mm256_setr_epi16(
                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                )),
                _mm256_set1_epi16(8),
            );
            let mut acc = _mm512_setzero_ps();
            let mut acc_m = _mm256_setzero_ps();
            for i in 0..nb {
                let (x, y) = (w.add(144 * i), a.add(292 * i));
                // [d * dy, dmin * dy]
                let dd = _mm_mul_ps(f16_pair(x), _mm_set1_ps(f32_at(y)));
                let unpacked = unpack_q4k_scales(&*x.add(4).cast::<[u8; 12]>());
                // i16 lanes: scales 0..8, then mins 0..8.
                let sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(unpacked.as_ptr().cast()));
                let mprod = _mm256_madd_epi16(
                    _mm256_loadu_si256(y.add(260).cast()),
                    _mm256_permutexvar_epi16(min_pairs, sm),
                );
                let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
                acc_m = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(mprod), acc_m);

                let sm = _mm512_castsi256_si512(sm);
                let mut sumi = _mm512_setzero_si512();
                for c in 0..4 {
                    let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(16 + 32 * c).cast()));
                    let q = _mm512_and_si512(_mm512_srlv_epi64(q, nibble_shift), low4);
                    let pick = _mm512_add_epi16(halves, _mm512_set1_epi16(2 * c as i16));
                    let scales = _mm512_permutexvar_epi16(pick, sm);
                    sumi = dot_scaled(
                        sumi,
                        q,
                        _mm512_loadu_si512(y.add(4 + 64 * c).cast()),
                        scales,
                    );
                }
                acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dd), _mm512_cvtepi32_ps(sumi), acc);
            }
            _mm512_reduce_add_ps(acc) - hsum_ps(acc_m)
        }

        /// Q6_K (210-byte blocks) x Q8_K. Per 128-element half: one 64-byte `ql` load gives
        /// elements 0..64 (low nibbles) and 64..128 (high nibbles); the 32 `qh` bytes, loaded
        /// twice side by side, are shifted per 64-bit lane so bits 4..6 of each byte hold the
        /// right pair. Quants stay unsigned; `32 * sum(sc * bsums)` is subtracted once.
        ///
        /// # Safety
        /// As [`q4_0_q8_0`].
        #[target_feature(enable = $features)]
        unsafe fn q6_k_q8_k(nb: usize, w: *const u8, a: *const u8) -> f32 {
            let low4 = _mm512_set1_epi8(0x0F);
            let bits45 = _mm512_set1_epi8(0x30);
            let shift_lo = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4); // left: bits 0-1 / 2-3 -> 4-5
            let shift_hi = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0); // right: bits 4-5 / 6-7 -> 4-5
            let quarters = _mm512_loadu_si512(QUARTERS.as_ptr().cast());
            let mut acc = _mm512_setzero_ps();
            for i in 0..nb {
                let (x, y) = (w.add(210 * i), a.add(292 * i));
                // The 32-bit read at 206 ends with `d` (lane 1); lane 0 is two scale bytes.
                let d = _mm_cvtss_f32(_mm_movehdup_ps(f16_pair(x.add(206)))) * f32_at(y);
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192).cast()));
                let corr = _mm256_madd_epi16(_mm256_loadu_si256(y.add(260).cast()), sc);
                let sc = _mm512_castsi256_si512(sc);
                let mut sumi = _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(corr)),
                );
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(x.add(64 * h).cast());
                    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(128 + 32 * h).cast()));
                    let high_lo = _mm512_and_si512(_mm512_sllv_epi64(qh, shift_lo), bits45);
                    let high_hi = _mm512_and_si512(_mm512_srlv_epi64(qh, shift_hi), bits45);
                    let q_lo = _mm512_or_si512(_mm512_and_si512(ql, low4), high_lo);
                    let q_hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                        high_hi,
                    );
                    let g = 8 * h as i16;
                    let s_lo = _mm512_permutexvar_epi16(
                        _mm512_add_epi16(quarters, _mm512_set1_epi16(g)),
                        sc,
                    );
                    let s_hi = _mm512_permutexvar_epi16(
                        _mm512_add_epi16(quarters, _mm512_set1_epi16(g + 4)),
                        sc,
                    );
                    let y_lo = _mm512_loadu_si512(y.add(4 + 128 * h).cast());
                    let y_hi = _mm512_loadu_si512(y.add(68 + 128 * h).cast());
                    sumi = dot_scaled(sumi, q_lo, y_lo, s_lo);
                    sumi = dot_scaled(sumi, q_hi, y_hi, s_hi);
                }
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
            }
            _mm512_reduce_add_ps(acc)
        }
    };
}

mod base {
    //! AVX-512 F/BW/VL kernels.
    quant_kernels!("avx512f,avx512bw,avx512vl,avx2,fma,f16c", ops_base);
}

mod vnni {
    //! AVX-512 VNNI kernels.
    quant_kernels!(
        "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
        ops_vnni
    );
}
