//! Vector math for the element-wise ops: an AVX-512 and an AVX2 `exp` and the SwiGLU / GeGLU
//! activations built on them, each beside its scalar definition in `ops` and chosen at run
//! time (`quant::active_simd`).
//!
//! The vector `exp` follows the classic Cephes `expf` scheme (range reduction by `ln 2` in two
//! parts, a degree-6 polynomial, the power of two by `vscalefps` or by building its exponent
//! bits), as in the SIMD `expf` of many BLAS / ML libraries; its error is ~2 ulp, like a libm
//! `expf`'s last bit. Both widths compute the same bits below 88.3.

use super::ops;
use crate::quant::{active_simd, cpu_simd, SimdLevel};

/// A gated activation's kernel: `gate[i] = f(gate[i], up[i])`, equal lengths.
type GatedFn = unsafe fn(&mut [f32], &[f32]);

/// Runs a gated activation with the kernel of `level`: `simd` = (AVX-512, AVX2) kernels,
/// `scalar` the definition.
fn gated_at(level: SimdLevel, gate: &mut [f32], up: &[f32], simd: Option<(GatedFn, GatedFn)>, scalar: fn(&mut [f32], &[f32])) {
    assert_eq!(gate.len(), up.len(), "gated activation: lengths");
    assert!(level <= cpu_simd(), "this CPU has no {} kernels", level.name());
    // SAFETY: the CPU has `level` (asserted), which has the kernel's features; the lengths
    // match.
    match (level, simd) {
        (SimdLevel::Avx512 | SimdLevel::Avx512Vnni, Some((wide, _))) => unsafe { wide(gate, up) },
        (SimdLevel::Avx2, Some((_, narrow))) => unsafe { narrow(gate, up) },
        _ => scalar(gate, up),
    }
}

/// The (AVX-512, AVX2) kernels of a gated activation, on x86-64.
macro_rules! simd_kernels {
    ($name:ident) => {{
        #[cfg(target_arch = "x86_64")]
        let kernels: Option<(GatedFn, GatedFn)> = Some((avx512::$name, avx2::$name));
        #[cfg(not(target_arch = "x86_64"))]
        let kernels: Option<(GatedFn, GatedFn)> = None;
        kernels
    }};
}

/// `gate = silu(gate) * up` (SwiGLU) at the active level; equals `ops::silu_mul` up to
/// `exp`'s last bit.
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_at(active_simd(), gate, up)
}

/// [`silu_mul`] with the kernels of `level` (one the CPU has).
pub fn silu_mul_at(level: SimdLevel, gate: &mut [f32], up: &[f32]) {
    gated_at(level, gate, up, simd_kernels!(silu_mul), ops::silu_mul)
}

/// `gate = gelu_tanh(gate) * up` (GeGLU, Gemma 3) at the active level; equals
/// `ops::gelu_tanh_mul` to ~1e-6 relative: `0.5 (1 + tanh(k))` is computed as
/// `1 / (1 + e^(-2k))`, the same function, so the vector `exp` serves (libm's `tanhf` cost a
/// quarter of Gemma 3's prefill).
#[inline]
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul_at(active_simd(), gate, up)
}

/// [`gelu_tanh_mul`] with the kernels of `level` (one the CPU has).
pub fn gelu_tanh_mul_at(level: SimdLevel, gate: &mut [f32], up: &[f32]) {
    gated_at(level, gate, up, simd_kernels!(gelu_tanh_mul), ops::gelu_tanh_mul)
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

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! AVX2 kernels (each requires AVX2 and FMA): the AVX-512 module's functions on 8 lanes.

    use std::arch::x86_64::*;

    /// `e^x` on 8 lanes (max error ~2 ulp; 0 below -87.5, saturated above 88.3, where the
    /// power of two still has an exponent field).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.5)), _mm256_set1_ps(88.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5_f32] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n from its exponent bits: n is in -126..=127 here.
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    /// `g / (1 + e^-g) * u` on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn silu8(g: __m256, u: __m256) -> __m256 {
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u)
    }

    /// GELU-tanh times `u` on 8 lanes (as the AVX-512 `gelu16`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu8(x: __m256, u: __m256) -> __m256 {
        const MINUS_TWO_SQRT_2_OVER_PI: f32 = -2.0 * 0.797_884_6;
        let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        let k = _mm256_fmadd_ps(_mm256_set1_ps(0.044715), x3, x);
        let e = exp(_mm256_mul_ps(_mm256_set1_ps(MINUS_TWO_SQRT_2_OVER_PI), k));
        _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u)
    }

    /// `gate[i] = $f(gate[i], up[i])` over whole slices, 8 lanes at a time; the tail goes
    /// through a zero-padded register.
    macro_rules! gated {
        ($name:ident, $f:ident) => {
            /// See the function of the same name in the parent module.
            ///
            /// # Safety
            /// AVX2 and FMA present; `gate.len() == up.len()`.
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn $name(gate: &mut [f32], up: &[f32]) {
                let n = gate.len();
                let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
                let mut i = 0;
                while i + 8 <= n {
                    _mm256_storeu_ps(g.add(i), $f(_mm256_loadu_ps(g.add(i)), _mm256_loadu_ps(u.add(i))));
                    i += 8;
                }
                if i < n {
                    let (mut tg, mut tu) = ([0f32; 8], [0f32; 8]);
                    tg[..n - i].copy_from_slice(&gate[i..]);
                    tu[..n - i].copy_from_slice(&up[i..]);
                    _mm256_storeu_ps(tg.as_mut_ptr(), $f(_mm256_loadu_ps(tg.as_ptr()), _mm256_loadu_ps(tu.as_ptr())));
                    gate[i..].copy_from_slice(&tg[..n - i]);
                }
            }
        };
    }
    gated!(silu_mul, silu8);
    gated!(gelu_tanh_mul, gelu8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_accurate() {
        if cpu_simd() < SimdLevel::Avx512 {
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_is_accurate_and_equals_the_avx512_one() {
        use std::arch::x86_64::*;
        if cpu_simd() < SimdLevel::Avx2 {
            return;
        }
        let mut worst = 0.0f64;
        for i in 0..20000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 20000.0;
            let mut out = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp(_mm256_set1_ps(x))) };
            let want = (x as f64).exp();
            worst = worst.max(((out[0] as f64 - want) / want).abs());
            if cpu_simd() >= SimdLevel::Avx512 {
                let mut wide = [0f32; 16];
                // SAFETY: the CPU has AVX-512 F.
                unsafe { _mm512_storeu_ps(wide.as_mut_ptr(), avx512::exp(_mm512_set1_ps(x))) };
                assert_eq!(wide[0].to_bits(), out[0].to_bits(), "exp({x})");
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn gelu_tanh_matches_reference() {
        for n in [1, 15, 16, 17, 100] {
            let g: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) * 0.23).collect();
            let u: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.01).collect();
            let mut a = g.clone();
            ops::gelu_tanh_mul(&mut a, &u);
            for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
                let mut b = g.clone();
                gelu_tanh_mul_at(level, &mut b, &u);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{level:?} n {n}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn silu_matches_reference() {
        for n in [1, 15, 16, 17, 100] {
            let g: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) * 0.37).collect();
            let u: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.01).collect();
            let mut a = g.clone();
            ops::silu_mul(&mut a, &u);
            for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
                let mut b = g.clone();
                silu_mul_at(level, &mut b, &u);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{level:?} n {n}: {x} vs {y}");
                }
            }
        }
    }
}
