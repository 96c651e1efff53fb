//! Scalar reference of meshpy's A16 activation blocks: quantize (the definition the SIMD
//! activation quantizer matches bit for bit) and dequantize.

use crate::quant::blocks::{BlockA16, F32Le, I16Le, QK};

/// A16 to f32: `d * q`.
pub fn dequantize_row_a16_ref(src: &[BlockA16], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = x.d.get();
        for (o, q) in out.iter_mut().zip(&x.qs) {
            *o = q.get() as f32 * d;
        }
    }
}

/// A16: `d = amax / 32767`, `q = round_even(x / d)` (clamped to +-32767), `s = d * sum(q)`,
/// `s_hi = d * sum(q[16..32])`.
/// The SIMD quantizer in `activation` produces the same bytes.
pub fn quantize_row_a16_ref(src: &[f32], dst: &mut [BlockA16]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 32767.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (mut sum, mut sum_hi) = (0i32, 0i32);
        for (i, (q, &v)) in y.qs.iter_mut().zip(x).enumerate() {
            let r = (v * id).round_ties_even().clamp(-32767.0, 32767.0) as i16;
            *q = I16Le::new(r);
            sum += r as i32;
            if i >= QK / 2 {
                sum_hi += r as i32;
            }
        }
        y.d = F32Le::new(d);
        y.s = F32Le::new(sum as f32 * d); // |sum| < 2^21: exact in f32
        y.s_hi = F32Le::new(sum_hi as f32 * d);
    }
}
