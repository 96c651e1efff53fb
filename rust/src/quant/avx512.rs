//! AVX-512 twins of the reference dot products, one row at a time: the float types (F32,
//! F16, BF16 weights x f32 activations), one build for both AVX-512 levels. Quantized weights
//! use the AVX2 per-row kernels here (see `avx2`): at AVX-512 their hot path is the
//! repacked multi-row kernels of `avx512_repacked`, which work on 16 rows at once.
//!
//! Every kernel is reached only through [`vec_dot_fn`], which `super::vec_dot_fn_at` calls
//! only after `cpu_simd()` found AVX-512 F/BW/VL with AVX2, FMA and F16C. All loads are
//! unaligned or masked.

use std::arch::x86_64::*;

use super::{check_dot, GgmlType, VecDotFn};

/// The AVX-512 per-row kernel for weights of type `ty`; `None` for the activation-only types.
/// Quantized types get the AVX2 kernels (the same at both AVX-512 levels), so `None` too for
/// the types with only a scalar kernel.
pub(super) fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    Some(match ty {
        GgmlType::F32 => vec_dot_f32_f32_avx512,
        GgmlType::F16 => vec_dot_f16_f32_avx512,
        GgmlType::BF16 => vec_dot_bf16_f32_avx512,
        _ => return super::avx2::vec_dot_fn(ty),
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

