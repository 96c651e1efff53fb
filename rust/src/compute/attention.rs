//! Causal attention of one query head, with an AVX-512 kernel chosen at run time.
//!
//! [`attend`] is the entry point: the AVX-512 kernel for head widths that are a multiple of
//! 16 (up to 256), else the scalar `ops::attend_ref`, the definition. The kernel keeps the
//! reference's steps (scores `q.k * scale`, a max-subtracted softmax, the weighted sum of
//! values) with 16-lane FMAs, a vector `exp` and the output accumulated in registers; only
//! the f32 summation order and `exp`'s last bit (`fastmath`'s vector `exp`) differ from the
//! reference.

use super::ops;

/// Causal attention of one query head; arguments as `ops::attend_ref` (which it equals to
/// f32 rounding).
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
    #[cfg(target_arch = "x86_64")]
    if simd_ok(q.len()) {
        let hd = q.len();
        assert!(
            out.len() == hd
                && scores.len() > last
                && first <= last
                && keys.len() >= last * stride + hd
                && values.len() >= last * stride + hd,
            "attend: shapes"
        );
        // SAFETY: `simd_ok` found AVX-512 F (+ AVX2, FMA); the lengths were checked above.
        unsafe { avx512::attend(q, keys, values, stride, first, last, scale, scores, out) };
        return;
    }
    ops::attend_ref(q, keys, values, stride, first, last, scale, scores, out)
}

/// Whether the AVX-512 kernel runs heads of width `hd` on this CPU.
#[cfg(target_arch = "x86_64")]
fn simd_ok(hd: usize) -> bool {
    hd.is_multiple_of(16) && hd > 0 && hd <= avx512::MAX_HD && super::fastmath::avx512_ok()
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 attention kernel (requires AVX-512 F, AVX2, FMA).

    use std::arch::x86_64::*;

    use super::super::fastmath::avx512::exp;

    /// Widest head the kernel takes (its output registers).
    pub(super) const MAX_HD: usize = 256;

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
        for hd in [16, 64, 80, 256, 48] {
            let stride = 3 * hd;
            for (first, last) in [(0, 0), (0, 5), (3, 17), (0, 100), (10, 40)] {
                let keys: Vec<f32> = (0..(last + 1) * stride).map(|_| next()).collect();
                let values: Vec<f32> = (0..(last + 1) * stride).map(|_| next()).collect();
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                let (mut s1, mut s2) = (vec![0f32; last + 1], vec![0f32; last + 1]);
                let (mut o1, mut o2) = (vec![0f32; hd], vec![0f32; hd]);
                let off = hd; // second KV head
                ops::attend_ref(&q, &keys[off..], &values[off..], stride, first, last, 0.125, &mut s1, &mut o1);
                attend(&q, &keys[off..], &values[off..], stride, first, last, 0.125, &mut s2, &mut o2);
                for (a, b) in o1.iter().zip(&o2) {
                    assert!((a - b).abs() <= 2e-6 * (1.0 + a.abs()), "hd {hd} {first}..={last}: {a} vs {b}");
                }
            }
        }
    }
}
