//! Vector math for the element-wise ops: an AVX-512 `exp` and the SwiGLU / GeGLU
//! activations built on it, each beside its scalar definition in `ops` and chosen at run time.
//!
//! The vector `exp` follows the classic Cephes `expf` scheme (range reduction by `ln 2` in two
//! parts, a degree-6 polynomial, `vscalefps` for the power of two), as in the SIMD `expf` of
//! many BLAS / ML libraries; its error is ~2 ulp, like a libm `expf`'s last bit.

use super::ops;

/// Whether the AVX-512 kernels of this module (and of `attention`) run on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_ok() -> bool {
    use crate::quant::{detected_simd, SimdLevel};
    detected_simd() >= SimdLevel::Avx512
}

/// `gate = silu(gate) * up` (SwiGLU); equals `ops::silu_mul` up to `exp`'s last bit.
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths");
    #[cfg(target_arch = "x86_64")]
    if avx512_ok() {
        // SAFETY: AVX-512 F present; the lengths match.
        unsafe { avx512::silu_mul(gate, up) };
        return;
    }
    ops::silu_mul(gate, up)
}

/// `gate = gelu_tanh(gate) * up` (GeGLU, Gemma 3); equals `ops::gelu_tanh_mul` to ~1e-6
/// relative: `0.5 (1 + tanh(k))` is computed as `1 / (1 + e^(-2k))`, the same function, so
/// the vector `exp` serves (libm's `tanhf` cost a quarter of Gemma 3's prefill).
#[inline]
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_tanh_mul: lengths");
    #[cfg(target_arch = "x86_64")]
    if avx512_ok() {
        // SAFETY: AVX-512 F present; the lengths match.
        unsafe { avx512::gelu_tanh_mul(gate, up) };
        return;
    }
    ops::gelu_tanh_mul(gate, up)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    //! AVX-512 kernels (each requires AVX-512 F, AVX2, FMA).

    use std::arch::x86_64::*;

    /// `e^x` on 16 lanes (max error ~2 ulp; 0 below -87.5, saturated above 88.7).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.5)), _mm512_set1_ps(88.7));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5_f32] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(p, n)
    }

    /// `g / (1 + e^-g) * u` on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn silu16(g: __m512, u: __m512) -> __m512 {
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e)), u)
    }

    /// `x / (1 + e^(-2 sqrt(2/pi) (x + 0.044715 x^3))) * u` on 16 lanes: GELU-tanh times `u`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn gelu16(x: __m512, u: __m512) -> __m512 {
        const MINUS_TWO_SQRT_2_OVER_PI: f32 = -2.0 * 0.797_884_6;
        let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        let k = _mm512_fmadd_ps(_mm512_set1_ps(0.044715), x3, x);
        let e = exp(_mm512_mul_ps(_mm512_set1_ps(MINUS_TWO_SQRT_2_OVER_PI), k));
        _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e)), u)
    }

    /// `gate[i] = $f(gate[i], up[i])` over whole slices, 16 lanes at a time, the tail masked.
    macro_rules! gated {
        ($name:ident, $f:ident) => {
            /// See the function of the same name in the parent module.
            ///
            /// # Safety
            /// AVX-512 F, AVX2, FMA present; `gate.len() == up.len()`.
            #[target_feature(enable = "avx512f,avx2,fma")]
            pub(super) unsafe fn $name(gate: &mut [f32], up: &[f32]) {
                let n = gate.len();
                let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
                let mut i = 0;
                while i + 16 <= n {
                    _mm512_storeu_ps(g.add(i), $f(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i))));
                    i += 16;
                }
                if i < n {
                    let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
                    let y = $f(_mm512_maskz_loadu_ps(m, g.add(i)), _mm512_maskz_loadu_ps(m, u.add(i)));
                    _mm512_mask_storeu_ps(g.add(i), m, y);
                }
            }
        };
    }
    gated!(silu_mul, silu16);
    gated!(gelu_tanh_mul, gelu16);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_accurate() {
        if !avx512_ok() {
            return;
        }
        use std::arch::x86_64::*;
        let mut worst = 0.0f64;
        for i in 0..20000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 20000.0;
            let mut out = [0f32; 16];
            // SAFETY: avx512_ok found AVX-512 F.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), avx512::exp(_mm512_set1_ps(x))) };
            let want = (x as f64).exp();
            worst = worst.max(((out[0] as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn gelu_tanh_matches_reference() {
        for n in [1, 15, 16, 17, 100] {
            let g: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) * 0.23).collect();
            let u: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.01).collect();
            let (mut a, mut b) = (g.clone(), g.clone());
            ops::gelu_tanh_mul(&mut a, &u);
            gelu_tanh_mul(&mut b, &u);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "n {n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn silu_matches_reference() {
        for n in [1, 15, 16, 17, 100] {
            let g: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) * 0.37).collect();
            let u: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.01).collect();
            let (mut a, mut b) = (g.clone(), g.clone());
            ops::silu_mul(&mut a, &u);
            silu_mul(&mut b, &u);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "n {n}: {x} vs {y}");
            }
        }
    }
}
