//! Causal attention of one query head, with AVX-512 and AVX2 kernels chosen at run time.
//!
//! [`attend`] is the entry point: at the active level (`quant::active_simd`), the AVX-512
//! kernel for head widths that are a multiple of 16, the AVX2 kernel for multiples of 8 (up to
//! 256), else the scalar `ops::attend_ref`, the definition. The kernels keep the reference's
//! steps (scores `q.k * scale`, a max-subtracted softmax, the weighted sum of values) with
//! vector FMAs, a vector `exp` and the output accumulated in registers; only the f32
//! summation order and `exp`'s last bit (`fastmath`'s vector `exp`) differ from the
//! reference.

use super::ops;
use crate::quant::{active_simd, cpu_simd, SimdLevel};

/// Causal attention of one query head at the active level; arguments as `ops::attend_ref`
/// (which it equals to f32 rounding).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    first: usize,
    last: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_at(active_simd(), q, keys, values, stride, first, last, scale, scores, out)
}

/// [`attend`] with the kernels of `level` (one the CPU has).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attend_at(
    level: SimdLevel,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    first: usize,
    last: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    assert!(level <= cpu_simd(), "this CPU has no {} kernels", level.name());
    let hd = q.len();
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && hd > 0 && hd <= MAX_HD && hd.is_multiple_of(8) {
        assert!(
            out.len() == hd
                && scores.len() > last
                && first <= last
                && keys.len() >= last * stride + hd
                && values.len() >= last * stride + hd,
            "attend: shapes"
        );
        // SAFETY: the CPU has `level` (asserted): AVX-512 F (+ AVX2, FMA) for the wide kernel,
        // AVX2 and FMA for the narrow one; the lengths were checked above.
        unsafe {
            if level >= SimdLevel::Avx512 && hd.is_multiple_of(16) {
                avx512::attend(q, keys, values, stride, first, last, scale, scores, out)
            } else {
                avx2::attend(q, keys, values, stride, first, last, scale, scores, out)
            }
        }
        return;
    }
    ops::attend_ref(q, keys, values, stride, first, last, scale, scores, out)
}

/// Widest head the SIMD kernels take (their output registers).
pub const MAX_HD: usize = 256;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 attention kernel (requires AVX-512 F, AVX2, FMA).

    use std::arch::x86_64::*;

    use super::super::fastmath::avx512::exp;

    /// Lane `j` = the sum of the 16 lanes of `v[j]`: a transposing add tree (45
    /// shuffles and adds for 16 sums, against ~8 per sum reduced one at a time).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn hsum16(v: &[__m512; 16]) -> __m512 {
        // Pairs: per 128-bit block [a0+a2, b0+b2, a1+a3, b1+b3].
        let r: [__m512; 8] =
            std::array::from_fn(|j| _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1])));
        // Quads: per 128-bit block the partial sums of four vectors, in order.
        let s: [__m512; 4] = std::array::from_fn(|k| {
            let (x, y) = (r[2 * k], r[2 * k + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x, y), _mm512_shuffle_ps::<0b11_10_11_10>(x, y))
        });
        // Blocks: sum each quad's four 128-bit blocks into block k of the result.
        let w = |x: __m512, y: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
        };
        let (w01, w23) = (w(s[0], s[1]), w(s[2], s[3]));
        w(w01, w23)
    }

    /// See `super::attend`.
    ///
    /// # Safety
    /// AVX-512 F, AVX2, FMA present; `q.len() == out.len()` a multiple of 16 up to `MAX_HD`;
    /// `scores.len() > last >= first`; keys/values hold `last * stride + q.len()` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn attend(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        stride: usize,
        first: usize,
        last: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let nc = q.len() / 16;
        let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
        let sp = scores.as_mut_ptr();
        // Scores: sixteen positions at a time, their sums transposed into one register;
        // then four at a time for the rest (independent FMA chains, one reduction each).
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut p = first;
        while p + 16 <= last + 1 {
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in 0..nc {
                let qc = _mm512_loadu_ps(qp.add(16 * c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kp.add((p + j) * stride + 16 * c)), *acc);
                }
            }
            _mm512_storeu_ps(sp.add(p), _mm512_mul_ps(hsum16(&acc), _mm512_set1_ps(scale)));
            p += 16;
        }
        while p <= last {
            let n = (last + 1 - p).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in 0..nc {
                let qc = _mm512_loadu_ps(qp.add(16 * c));
                for (j, acc) in acc.iter_mut().enumerate().take(n) {
                    *acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kp.add((p + j) * stride + 16 * c)), *acc);
                }
            }
            for (j, acc) in acc.iter().enumerate().take(n) {
                *sp.add(p + j) = _mm512_reduce_add_ps(*acc) * scale;
            }
            p += n;
        }
        // Softmax over scores[first..=last].
        let len = last + 1 - first;
        let s = sp.add(first);
        let tail: __mmask16 = ((1u32 << (len % 16)) - 1) as u16;
        let full = len / 16;
        for i in 0..full {
            max = _mm512_max_ps(max, _mm512_loadu_ps(s.add(16 * i)));
        }
        if tail != 0 {
            max = _mm512_mask_max_ps(max, tail, max, _mm512_maskz_loadu_ps(tail, s.add(16 * full)));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        for i in 0..full {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(s.add(16 * i)), max));
            _mm512_storeu_ps(s.add(16 * i), e);
            sum = _mm512_add_ps(sum, e);
        }
        if tail != 0 {
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s.add(16 * full)), max));
            _mm512_mask_storeu_ps(s.add(16 * full), tail, e);
            sum = _mm512_mask_add_ps(sum, tail, sum, e);
        }
        let inv = 1.0 / _mm512_reduce_add_ps(sum);
        // Weighted sum of values, up to four output registers at a time.
        let op = out.as_mut_ptr();
        for c0 in (0..nc).step_by(4) {
            let m = (nc - c0).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            for p in first..=last {
                let w = _mm512_set1_ps(*sp.add(p));
                let v = vp.add(p * stride + 16 * c0);
                for (k, acc) in acc.iter_mut().enumerate().take(m) {
                    *acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(v.add(16 * k)), *acc);
                }
            }
            for (k, acc) in acc.iter().enumerate().take(m) {
                _mm512_storeu_ps(op.add(16 * (c0 + k)), _mm512_mul_ps(*acc, _mm512_set1_ps(inv)));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 attention kernel (requires AVX2 and FMA): the AVX-512 kernel's steps on 8
    //! lanes, the softmax tail through a padded register instead of masks.

    use std::arch::x86_64::*;

    use super::super::fastmath::avx2::exp;

    /// Lane `j` = the sum of the 8 lanes of `v[j]` (horizontal adds, then the two halves).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum8(v: &[__m256; 8]) -> __m256 {
        let s01 = _mm256_hadd_ps(v[0], v[1]);
        let s23 = _mm256_hadd_ps(v[2], v[3]);
        let s45 = _mm256_hadd_ps(v[4], v[5]);
        let s67 = _mm256_hadd_ps(v[6], v[7]);
        // Per 128-bit half: [v0, v1, v2, v3] and [v4, v5, v6, v7], partially summed.
        let (lo, hi) = (_mm256_hadd_ps(s01, s23), _mm256_hadd_ps(s45, s67));
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi))
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Largest of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }

    /// See `super::attend`.
    ///
    /// # Safety
    /// AVX2 and FMA present; `q.len() == out.len()` a multiple of 8 up to `MAX_HD`;
    /// `scores.len() > last >= first`; keys/values hold `last * stride + q.len()` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        stride: usize,
        first: usize,
        last: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let nc = q.len() / 8;
        let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
        let sp = scores.as_mut_ptr();
        // Scores: eight positions at a time, their sums transposed into one register; then
        // four at a time for the rest.
        let mut p = first;
        while p + 8 <= last + 1 {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..nc {
                let qc = _mm256_loadu_ps(qp.add(8 * c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kp.add((p + j) * stride + 8 * c)), *acc);
                }
            }
            _mm256_storeu_ps(sp.add(p), _mm256_mul_ps(hsum8(&acc), _mm256_set1_ps(scale)));
            p += 8;
        }
        while p <= last {
            let n = (last + 1 - p).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in 0..nc {
                let qc = _mm256_loadu_ps(qp.add(8 * c));
                for (j, acc) in acc.iter_mut().enumerate().take(n) {
                    *acc = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kp.add((p + j) * stride + 8 * c)), *acc);
                }
            }
            for (j, acc) in acc.iter().enumerate().take(n) {
                *sp.add(p + j) = hsum(*acc) * scale;
            }
            p += n;
        }
        // Softmax over scores[first..=last]; the tail is padded with -inf (exp gives 0).
        let s = &mut scores[first..=last];
        let (body, tail) = s.split_at_mut(s.len() / 8 * 8);
        let mut pad = [f32::NEG_INFINITY; 8];
        pad[..tail.len()].copy_from_slice(tail);
        let mut max = _mm256_loadu_ps(pad.as_ptr());
        for c in body.chunks_exact(8) {
            max = _mm256_max_ps(max, _mm256_loadu_ps(c.as_ptr()));
        }
        let max = _mm256_set1_ps(hmax(max));
        let mut sum = _mm256_setzero_ps();
        for c in body.chunks_exact_mut(8) {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), max));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(pad.as_ptr()), max));
        _mm256_storeu_ps(pad.as_mut_ptr(), e);
        sum = _mm256_add_ps(sum, e);
        let n_tail = tail.len();
        tail.copy_from_slice(&pad[..n_tail]);
        let inv = 1.0 / hsum(sum);
        // Weighted sum of values, up to four output registers at a time.
        let op = out.as_mut_ptr();
        for c0 in (0..nc).step_by(4) {
            let m = (nc - c0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for p in first..=last {
                let w = _mm256_set1_ps(*sp.add(p));
                let v = vp.add(p * stride + 8 * c0);
                for (k, acc) in acc.iter_mut().enumerate().take(m) {
                    *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(8 * k)), *acc);
                }
            }
            for (k, acc) in acc.iter().enumerate().take(m) {
                _mm256_storeu_ps(op.add(8 * (c0 + k)), _mm256_mul_ps(*acc, _mm256_set1_ps(inv)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_attention_matches_reference() {
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for hd in [16, 64, 80, 256, 48, 8, 24, 96] {
            let stride = 3 * hd;
            for (first, last) in [(0, 0), (0, 5), (3, 17), (0, 100), (10, 40)] {
                let keys: Vec<f32> = (0..(last + 1) * stride).map(|_| next()).collect();
                let values: Vec<f32> = (0..(last + 1) * stride).map(|_| next()).collect();
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                let (mut s1, mut s2) = (vec![0f32; last + 1], vec![0f32; last + 1]);
                let (mut o1, mut o2) = (vec![0f32; hd], vec![0f32; hd]);
                let off = hd; // second KV head
                ops::attend_ref(&q, &keys[off..], &values[off..], stride, first, last, 0.125, &mut s1, &mut o1);
                for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
                    attend_at(level, &q, &keys[off..], &values[off..], stride, first, last, 0.125, &mut s2, &mut o2);
                    for (a, b) in o1.iter().zip(&o2) {
                        assert!((a - b).abs() <= 2e-6 * (1.0 + a.abs()), "{level:?} hd {hd} {first}..={last}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
