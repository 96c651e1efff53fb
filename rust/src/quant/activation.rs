//! Activation quantization, once per matmul: f32 rows to Q8_0, Q8_1 or Q8_K, with AVX2
//! kernels that produce exactly the bytes of the scalar `quantize_row_*_ref`.
//!
//! Bit-identity holds because every step is the same IEEE operation: `d = amax / 127`,
//! `id = 1 / d`, `x * id`, then Q8_0/Q8_1's round-half-away-from-zero done as
//! `trunc(v) + (|v - trunc(v)| >= 0.5 ? sign(v) : 0)` (the subtraction is exact), and Q8_K's
//! round-half-even by `vcvtps2dq` in the default rounding mode. Followed:
//! ggml/src/ggml-cpu/arch/x86/quants.c (`quantize_row_q8_0`, `_q8_1`, `_q8_K`) for the
//! packing; ggml rounds half-to-even there, we keep the reference's rounding instead.

use super::blocks::view_blocks_mut;
use super::reference::{quantize_row_q8_0_ref, quantize_row_q8_1_ref, quantize_row_q8_k_ref};
use super::{GgmlType, SimdLevel};

/// Quantizes `src` into `dst` as `ty` (Q8_0, Q8_1 or Q8_K) with the best kernel up to
/// `level`. Panics on other types or lengths that do not fit (see
/// [`super::quantize_activations`]).
pub fn quantize_activations(level: SimdLevel, ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert!(
        matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8K),
        "quantize_activations: {ty} is not an activation type (Q8_0, Q8_1, Q8_K)"
    );
    let fits = ty
        .row_bytes(src.len())
        .is_ok_and(|bytes| bytes == dst.len());
    assert!(
        fits,
        "quantize_activations: {} elements do not fit {} bytes of {ty}",
        src.len(),
        dst.len()
    );

    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: `level` comes from `detected_simd()` (or a lower level), so AVX2, FMA and F16C
        // are present; the lengths were checked above.
        unsafe {
            match ty {
                GgmlType::Q8_0 => avx2::q8_0(src, view_blocks_mut(dst)),
                GgmlType::Q8_1 => avx2::q8_1(src, view_blocks_mut(dst)),
                _ => avx2::q8_k(src, view_blocks_mut(dst)),
            }
        }
        return;
    }
    let _ = level;
    match ty {
        GgmlType::Q8_0 => quantize_row_q8_0_ref(src, view_blocks_mut(dst)),
        GgmlType::Q8_1 => quantize_row_q8_1_ref(src, view_blocks_mut(dst)),
        _ => quantize_row_q8_k_ref(src, view_blocks_mut(dst)),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 activation quantizers; each requires AVX2, FMA and F16C.

    use std::arch::x86_64::*;

    use super::super::avx2::hsum_ps128;
    use super::super::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, F16Le, F32Le, QK, QK_K};
    use super::super::reference::{fill_q8k_sums, quantize_row_q8_k_ref};

    /// Largest lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }

    /// Smallest lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hmin(v: __m256) -> f32 {
        let s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_min_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)))
    }

    /// `roundf` on each lane (half away from zero), as i32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn round_away(v: __m256) -> __m256i {
        let sign = _mm256_set1_ps(-0.0);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
        let step = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0));
        _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)))
    }

    /// Packs 4 x 8 i32 (each in -127..=127) into 32 i8 in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pack(i: [__m256i; 4]) -> __m256i {
        // packs works per 128-bit lane; the final dword permute restores element order.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let bytes = _mm256_packs_epi16(p01, p23);
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// One Q8_0-style block: the rounded quants (stored to `qs`), `d`, and the quant sum.
    ///
    /// # Safety
    /// `x` readable for 32 f32, `qs` writable for 32 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_q8(x: *const f32, qs: *mut i8) -> (f32, i32) {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let abs = |v: __m256| _mm256_andnot_ps(sign, v);
        let amax = hmax(_mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        ));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|v| round_away(_mm256_mul_ps(v, id)));
        _mm256_storeu_si256(qs.cast(), pack(q));
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let sum = hsum_ps128(_mm_cvtepi32_ps(s)) as i32; // |sum| <= 32 * 127: exact in f32
        (d, sum)
    }

    /// Q8_0, bit-identical to `quantize_row_q8_0_ref`.
    ///
    /// # Safety
    /// AVX2, FMA, F16C present; `src.len() == 32 * dst.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0(src: &[f32], dst: &mut [BlockQ8_0]) {
        for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
            let (d, _) = block_q8(x.as_ptr(), y.qs.as_mut_ptr());
            y.d = F16Le::from_f32(d);
        }
    }

    /// Q8_1, bit-identical to `quantize_row_q8_1_ref`.
    ///
    /// # Safety
    /// As [`q8_0`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_1(src: &[f32], dst: &mut [BlockQ8_1]) {
        for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
            let (d, sum) = block_q8(x.as_ptr(), y.qs.as_mut_ptr());
            y.d = F16Le::from_f32(d);
            y.s = F16Le::from_f32(sum as f32 * d);
        }
    }

    /// Q8_K, bit-identical to `quantize_row_q8_k_ref`. A block where the largest magnitude
    /// occurs with both signs goes to the reference, which keeps the first one's sign.
    ///
    /// # Safety
    /// AVX2, FMA, F16C present; `src.len() == 256 * dst.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_k(src: &[f32], dst: &mut [BlockQ8K]) {
        for (x, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
            let p = x.as_ptr();
            let mut vmax = _mm256_loadu_ps(p);
            let mut vmin = vmax;
            for k in 1..QK_K / 8 {
                let v = _mm256_loadu_ps(p.add(8 * k));
                vmax = _mm256_max_ps(vmax, v);
                vmin = _mm256_min_ps(vmin, v);
            }
            let (hi, lo) = (hmax(vmax), hmin(vmin));
            if hi == -lo {
                // A tie of signs (or an all-zero block): the reference decides.
                quantize_row_q8_k_ref(x, std::slice::from_mut(y));
                continue;
            }
            let max = if hi > -lo { hi } else { lo };
            let iscale = -127.0 / max;
            let scale = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for c in 0..QK_K / 32 {
                let q: [__m256i; 4] = std::array::from_fn(|k| {
                    let v = _mm256_mul_ps(scale, _mm256_loadu_ps(p.add(32 * c + 8 * k)));
                    _mm256_min_epi32(_mm256_cvtps_epi32(v), top)
                });
                _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * c).cast(), pack(q));
            }
            fill_q8k_sums(y);
            y.d = F32Le::new(1.0 / iscale);
        }
    }
}
