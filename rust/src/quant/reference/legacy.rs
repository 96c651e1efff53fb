//! Scalar reference kernels of the legacy 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q8_1): dequantize and quantize bit-exact with ggml, dot products against A16 activations.
//!
//! Followed for Q5_1: `dequantize_row_q5_1` and `quantize_row_q5_1_ref` in
//! ggml/src/ggml-quants.c, `ggml_vec_dot_q5_1_q8_1_generic` in ggml/src/ggml-cpu/quants.c.

use super::signed_absmax;
use crate::quant::blocks::{
    view_blocks, BlockA16, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, F16Le,
    QK,
};
use crate::quant::{check_dot, GgmlType};

// ---------------------------------------------------------------------------------------------
// Unpacking shared by dequantize, dot and the SIMD kernels.

/// The 32 five-bit quants (0..32) of Q5_0's and Q5_1's `qh` and `qs`, in element order.
#[inline]
fn five_bit_quants(qh: &[u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(*qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// The 32 quants of a Q5_0 block in element order (0..32, before subtracting 16).
#[inline]
pub(crate) fn q5_0_quants(x: &BlockQ5_0) -> [u8; QK] {
    five_bit_quants(&x.qh, &x.qs)
}

/// The 32 quants of a Q5_1 block in element order (0..32; the value is `d * q + m`).
#[inline]
pub(crate) fn q5_1_quants(x: &BlockQ5_1) -> [u8; QK] {
    five_bit_quants(&x.qh, &x.qs)
}

// ---------------------------------------------------------------------------------------------
// Dequantize. Each takes exactly the blocks of one row; `dst` holds their elements.

/// Q4_0: `(q - 8) * d`.
pub fn dequantize_row_q4_0_ref(src: &[BlockQ4_0], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = x.d.to_f32();
        for j in 0..QK / 2 {
            out[j] = ((x.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            out[j + 16] = ((x.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: `q * d + m` (two roundings, no fused multiply-add, as ggml and numpy).
pub fn dequantize_row_q4_1_ref(src: &[BlockQ4_1], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (x.d.to_f32(), x.m.to_f32());
        for j in 0..QK / 2 {
            out[j] = (x.qs[j] & 0x0F) as f32 * d + m;
            out[j + 16] = (x.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// Q5_0: `(q - 16) * d`.
pub fn dequantize_row_q5_0_ref(src: &[BlockQ5_0], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = x.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&q5_0_quants(x)) {
            *o = (q as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: `q * d + m` (two roundings, as Q4_1).
pub fn dequantize_row_q5_1_ref(src: &[BlockQ5_1], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (x.d.to_f32(), x.m.to_f32());
        for (o, &q) in out.iter_mut().zip(&q5_1_quants(x)) {
            *o = q as f32 * d + m;
        }
    }
}

/// Q8_0: `q * d`.
pub fn dequantize_row_q8_0_ref(src: &[BlockQ8_0], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = x.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&x.qs) {
            *o = q as f32 * d;
        }
    }
}

/// Q8_1: `q * d` (the sum field is redundant).
pub fn dequantize_row_q8_1_ref(src: &[BlockQ8_1], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = x.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&x.qs) {
            *o = q as f32 * d;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantize (ggml's `quantize_row_*_ref`, bit for bit).

/// Q4_0: `d = max / -8` (signed extreme), `q = min(15, trunc(x / d + 8.5))`.
pub fn quantize_row_q4_0_ref(src: &[f32], dst: &mut [BlockQ4_0]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let d = signed_absmax(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        for j in 0..QK / 2 {
            let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// The smallest and largest element, as ggml's loops find them (NaNs never win).
#[inline]
fn min_max(xs: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in xs {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    (min, max)
}

/// Q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize_row_q4_1_ref(src: &[f32], dst: &mut [BlockQ4_1]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        y.m = F16Le::from_f32(min);
        for j in 0..QK / 2 {
            let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Q5_0: `d = max / -16` (signed extreme), `q = min(31, trunc(x / d + 16.5))`.
pub fn quantize_row_q5_0_ref(src: &[f32], dst: &mut [BlockQ5_0]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let d = signed_absmax(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
            y.qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
            qh |= ((q0 as u32 & 0x10) >> 4) << j;
            qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
        }
        y.qh = qh.to_le_bytes();
    }
}

/// Q5_1: `d = (max - min) / 31`, `m = min`, `q = trunc((x - min) / d + 0.5)`. No clamp, as
/// in ggml: `(x - min) / d` is at most 31 and a rounding, so `q` <= 31.
pub fn quantize_row_q5_1_ref(src: &[f32], dst: &mut [BlockQ5_1]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        y.m = F16Le::from_f32(min);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let q0 = ((x[j] - min) * id + 0.5) as u8;
            let q1 = ((x[j + 16] - min) * id + 0.5) as u8;
            y.qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
            qh |= ((q0 as u32 & 0x10) >> 4) << j;
            qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
        }
        y.qh = qh.to_le_bytes();
    }
}

/// Q8_0 scale and inverse scale of a block: `d = amax / 127`.
#[inline]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// Q8_0: `d = amax / 127`, `q = round(x / d)` (half away from zero).
pub fn quantize_row_q8_0_ref(src: &[f32], dst: &mut [BlockQ8_0]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (d, id) = q8_scale(x);
        y.d = F16Le::from_f32(d);
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Q8_1: as Q8_0, plus `s = d * sum(q)` with the unrounded `d`.
pub fn quantize_row_q8_1_ref(src: &[f32], dst: &mut [BlockQ8_1]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (d, id) = q8_scale(x);
        let mut sum = 0i32;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        y.d = F16Le::from_f32(d);
        y.s = F16Le::from_f32(sum as f32 * d);
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products, all with the `VecDotFn` signature.

/// Q4_0 x A16: `sum_b dw * da * sum_j (q_j - 8) * a_j`.
pub fn vec_dot_q4_0_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q4_0, n, w, a);
    let (w, a) = (view_blocks::<BlockQ4_0>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += ((x.qs[j] & 0x0F) as i32 - 8) * y.qs[j].get() as i32;
            isum += ((x.qs[j] >> 4) as i32 - 8) * y.qs[j + 16].get() as i32;
        }
        sum += x.d.to_f32() * (y.d.get() * isum as f32);
    }
    sum
}

/// Q4_1 x A16: `sum_b dw * da * sum_j q_j * a_j + m * s`.
pub fn vec_dot_q4_1_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q4_1, n, w, a);
    let (w, a) = (view_blocks::<BlockQ4_1>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += (x.qs[j] & 0x0F) as i32 * y.qs[j].get() as i32;
            isum += (x.qs[j] >> 4) as i32 * y.qs[j + 16].get() as i32;
        }
        sum += x.d.to_f32() * (y.d.get() * isum as f32) + x.m.to_f32() * y.s.get();
    }
    sum
}

/// Q5_0 x A16: `sum_b dw * da * sum_j (q_j - 16) * a_j`.
pub fn vec_dot_q5_0_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q5_0, n, w, a);
    let (w, a) = (view_blocks::<BlockQ5_0>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let q = q5_0_quants(x);
        let isum: i32 = q.iter().zip(&y.qs).map(|(&q, a)| (q as i32 - 16) * a.get() as i32).sum();
        sum += x.d.to_f32() * (y.d.get() * isum as f32);
    }
    sum
}

/// Q5_1 x A16: `sum_b dw * da * sum_j q_j * a_j + m * s` (|sum| <= 32 * 31 * 32767).
pub fn vec_dot_q5_1_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q5_1, n, w, a);
    let (w, a) = (view_blocks::<BlockQ5_1>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let q = q5_1_quants(x);
        let isum: i32 = q.iter().zip(&y.qs).map(|(&q, a)| q as i32 * a.get() as i32).sum();
        sum += x.d.to_f32() * (y.d.get() * isum as f32) + x.m.to_f32() * y.s.get();
    }
    sum
}

/// Q8_0 x A16: `sum_b dw * da * sum_j q_j * a_j` (|sum| <= 32 * 128 * 32767 fits i32).
pub fn vec_dot_q8_0_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q8_0, n, w, a);
    let (w, a) = (view_blocks::<BlockQ8_0>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let isum: i32 = x.qs.iter().zip(&y.qs).map(|(&q, a)| q as i32 * a.get() as i32).sum();
        sum += x.d.to_f32() * (y.d.get() * isum as f32);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::TestRng;

    /// `q5_1_quants` against a literal transcription of ggml's `dequantize_row_q5_1` bit
    /// assembly (`xh_0`, `xh_1`).
    #[test]
    fn q5_1_quants_match_ggml_bit_assembly() {
        let mut rng = TestRng::new(51);
        for _ in 0..1000 {
            let bytes = rng.bytes(24);
            let x: BlockQ5_1 = crate::quant::blocks::as_blocks(&bytes).expect("one block")[0];
            let qh = u32::from_le_bytes(x.qh);
            let q = q5_1_quants(&x);
            for j in 0..QK / 2 {
                let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
                let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
                assert_eq!(q[j], (x.qs[j] & 0x0F) | xh_0, "element {j}");
                assert_eq!(q[j + 16], (x.qs[j] >> 4) | xh_1, "element {}", j + 16);
            }
        }
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero() {
        // amax 127 gives d = 1, id = 1: the quants are the rounded inputs.
        let mut x = [0.0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49999997;
        let mut y = [BlockQ8_0::default()];
        quantize_row_q8_0_ref(&x, &mut y);
        assert_eq!(&y[0].qs[..4], &[127, 3, -3, 0]);
    }
}
