//! Element-wise and per-row ops of a transformer block, in f32 on one row at a time. The
//! forward pass splits rows between threads; these functions are single-threaded.
//! Semantics follow transformers' modeling_llama.py (LlamaRMSNorm, apply_rotary_pos_emb,
//! eager_attention_forward) so that f32 checkpoints match it to rounding.

use super::attention::KvElem;

/// `out = x / sqrt(mean(x^2) + eps) * weight` (RMSNorm).
#[inline]
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let sum_sq: f32 = sum_squares(x);
    let scale = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Sum of squares with 8 independent accumulators, so the compiler vectorises it.
#[inline]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in tail {
        s += v * v;
    }
    s
}

/// Cosines and sines of the rotary angles `position * inv_freq[i]` (`inv_freq.len()` pairs).
pub fn rope_table(position: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for (i, &f) in inv_freq.iter().enumerate() {
        // The angle is formed in f32 as transformers does; cos/sin are then rounded once.
        let angle = (position as f32 * f) as f64;
        cos[i] = angle.cos() as f32;
        sin[i] = angle.sin() as f32;
    }
}

/// Rotates one head vector in place by the table's angles. `interleaved` rotates pairs
/// `(2i, 2i+1)` (llama.cpp's normal mode, used by GGUF Llama whose q/k rows were permuted
/// at conversion); otherwise pairs `(i, i + n_rot/2)` (transformers' `rotate_half`). Only the
/// first `2 * cos.len()` dimensions rotate (partial rotary embeddings).
#[inline]
pub fn rope_apply(v: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for i in 0..half {
            let (x0, x1) = (v[2 * i], v[2 * i + 1]);
            v[2 * i] = x0 * cos[i] - x1 * sin[i];
            v[2 * i + 1] = x1 * cos[i] + x0 * sin[i];
        }
    } else {
        for i in 0..half {
            let (x0, x1) = (v[i], v[i + half]);
            v[i] = x0 * cos[i] - x1 * sin[i];
            v[i + half] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

/// Dot product with 8 independent accumulators.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

/// In-place softmax.
#[inline]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `gate = silu(gate) * up` (SwiGLU).
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu_tanh(gate) * up` (GeGLU, Gemma 3's `gelu_pytorch_tanh`): PyTorch's
/// `gelu(x, approximate="tanh")`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
#[inline]
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()) * u;
    }
}

/// Causal attention of one query head against keys/values `0..=last` of its KV head.
/// `keys`/`values` are the cache rows laid out `(position, n_kv_heads, head_dim)` with
/// `stride = n_kv_heads * head_dim` and this head's offset already applied; positions
/// before `first` are outside the sliding window. `scores` is scratch of `last + 1` floats.
/// The scalar reference; the forward pass calls `compute::attention::attend`. Keys and values
/// are f32 or f16 (widened exactly).
#[allow(clippy::too_many_arguments)]
pub fn attend_ref<E: KvElem>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    stride: usize,
    first: usize,
    last: usize,
    scale: f32,
    sink: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let scores = &mut scores[first..=last];
    for (j, s) in scores.iter_mut().enumerate() {
        let p = first + j;
        *s = E::dot(q, &keys[p * stride..p * stride + hd]) * scale;
    }
    match sink {
        None => softmax(scores),
        Some(sink) => {
            // The sink's logit joins the softmax; its probability is dropped.
            let max = scores.iter().copied().fold(sink, f32::max);
            let mut sum = (sink - max).exp();
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            scores.iter_mut().for_each(|s| *s /= sum);
        }
    }
    out.fill(0.0);
    for (j, &s) in scores.iter().enumerate() {
        let p = first + j;
        E::axpy(s, &values[p * stride..p * stride + hd], out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_mul_matches_torch() {
        // torch.nn.functional.gelu(x, approximate="tanh") for x = -2, -0.5, 0, 1, 3.
        let mut g = [-2.0f32, -0.5, 0.0, 1.0, 3.0];
        let want = [-0.045_402_3f32, -0.154_285_8, 0.0, 0.841_192, 2.996_363_5];
        gelu_tanh_mul(&mut g, &[2.0; 5]);
        for (got, w) in g.iter().zip(want) {
            assert!((got - 2.0 * w).abs() < 1e-5, "{got} vs {}", 2.0 * w);
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-6, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        let s = 1.0 / (ms + 1e-6f32).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] * s * w[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotations_preserve_norm_and_agree_between_layouts() {
        let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
        let (mut c, mut s) = (vec![0f32; 4], vec![0f32; 4]);
        rope_table(7, &inv, &mut c, &mut s);
        let v: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut a = v.clone();
        rope_apply(&mut a, &c, &s, false);
        // The interleaved layout of the same vector: pair i is (v[i], v[i+4]).
        let mut b: Vec<f32> = (0..4).flat_map(|i| [v[i], v[i + 4]]).collect();
        rope_apply(&mut b, &c, &s, true);
        for i in 0..4 {
            assert!((a[i] - b[2 * i]).abs() < 1e-6 && (a[i + 4] - b[2 * i + 1]).abs() < 1e-6);
        }
        let n0: f32 = v.iter().map(|x| x * x).sum();
        let n1: f32 = a.iter().map(|x| x * x).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let q = [1.0f32, 0.0];
        let k = [0.5f32, 0.5];
        let v = [3.0f32, -1.0];
        let mut scores = [0f32; 1];
        let mut out = [0f32; 2];
        attend_ref(&q, &k, &v, 2, 0, 0, 1.0, None, &mut scores, &mut out);
        assert_eq!(out, [3.0, -1.0]);
    }
}
