//! Activation quantization, once per matmul: f32 rows to A16 (16-bit blocks of 32, see
//! [`super::blocks::BlockA16`]), with an AVX2 kernel that produces exactly the bytes of the
//! scalar `quantize_row_a16_ref`.
//!
//! Bit-identity holds because every step is the same IEEE operation: `amax` (a max, exact
//! in any order), `d = amax / 32767`, `id = 1 / d`, `x * id`, then round-half-even by
//! `vcvtps2dq` in the default rounding mode (the reference's `round_ties_even`), a clamp to
//! +-32767, and the integer sum of the quants (exact). Packing follows the shape of ggml's
//! `quantize_row_q8_0` AVX2 path (ggml/src/ggml-cpu/arch/x86/quants.c), widened to i16.

use super::blocks::view_blocks_mut;
use super::reference::quantize_row_a16_ref;
use super::{GgmlType, SimdLevel};

/// Quantizes `src` into `dst` as A16 with the best kernel up to `level`. Panics on other
/// types or lengths that do not fit (see [`super::quantize_activations`]).
pub fn quantize_activations(level: SimdLevel, ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert!(ty == GgmlType::A16, "quantize_activations: {ty} is not the activation type A16");
    let fits = ty.row_bytes(src.len()).is_ok_and(|bytes| bytes == dst.len());
    assert!(
        fits,
        "quantize_activations: {} elements do not fit {} bytes of {ty}",
        src.len(),
        dst.len()
    );

    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: `level` is at most `cpu_simd()`, so AVX2, FMA and F16C
        // are present; the lengths were checked above.
        unsafe { avx2::a16(src, view_blocks_mut(dst)) };
        return;
    }
    let _ = level;
    quantize_row_a16_ref(src, view_blocks_mut(dst));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 activation quantizer; requires AVX2, FMA and F16C.

    use std::arch::x86_64::*;

    use super::super::blocks::{BlockA16, F32Le, QK};

    /// Largest lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }

    /// Sum of the 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_epi32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// A16, bit-identical to `quantize_row_a16_ref`.
    ///
    /// # Safety
    /// AVX2, FMA, F16C present; `src.len() == 32 * dst.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn a16(src: &[f32], dst: &mut [BlockA16]) {
        let sign = _mm256_set1_ps(-0.0);
        let (lo, hi) = (_mm256_set1_epi32(-32767), _mm256_set1_epi32(32767));
        for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
            let p = x.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let abs = |v: __m256| _mm256_andnot_ps(sign, v);
            let amax = hmax(_mm256_max_ps(
                _mm256_max_ps(abs(v[0]), abs(v[1])),
                _mm256_max_ps(abs(v[2]), abs(v[3])),
            ));
            let d = amax / 32767.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q = v.map(|v| {
                let r = _mm256_cvtps_epi32(_mm256_mul_ps(v, id));
                _mm256_min_epi32(_mm256_max_epi32(r, lo), hi)
            });
            // packs works per 128-bit lane; the qword permute restores element order.
            let p01 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
            let p23 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
            let qs = y.qs.as_mut_ptr().cast::<__m256i>();
            _mm256_storeu_si256(qs, p01);
            _mm256_storeu_si256(qs.add(1), p23);
            let (lo, hi) = (hsum_epi32(_mm256_add_epi32(q[0], q[1])), hsum_epi32(_mm256_add_epi32(q[2], q[3])));
            y.d = F32Le::new(d);
            y.s = F32Le::new((lo + hi) as f32 * d);
            y.s_hi = F32Le::new(hi as f32 * d);
        }
    }
}
