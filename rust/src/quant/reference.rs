//! Scalar reference kernels: dequantize, quantize and dot products for every supported type.
//! They define correct; the SIMD twins are tested against them.
//!
//! Followed: ggml/src/ggml-quants.c in ggml-org/llama.cpp (`dequantize_row_*`,
//! `quantize_row_*_ref`, `get_scale_min_k4`) for the exact arithmetic, so dequantization is
//! bit-exact with ggml and with gguf-py's numpy code, and quantization produces ggml's bytes.
//! Dot products sum integer products exactly within a block and scale in f32, as ggml's
//! generic `ggml_vec_dot_*` do; the float dots accumulate in f64.

use half::f16;

use super::blocks::{
    bf16_to_f32, f32_to_bf16, view_blocks, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ6K,
    BlockA16, BlockQ8K, BlockQ8_0, BlockQ8_1, F16Le, F32Le, I16Le, QK, QK_K,
};
use super::{check_dot, GgmlType, VecDotFn};

// ---------------------------------------------------------------------------------------------
// Unpacking shared by dequantize, dot and the SIMD kernels.

/// Unpacks Q4_K's 12 scale bytes into `[scales 0..8, mins 0..8]` (each 6 bits), as ggml's
/// `get_scale_min_k4` reads them, with four 32-bit operations (the `utmp` trick of ggml's
/// x86 kernels).
#[inline]
pub fn unpack_q4k_scales(packed: &[u8; 12]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let scales_lo = u0 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&scales_lo.to_le_bytes());
    out[4..8].copy_from_slice(&scales_hi.to_le_bytes());
    out[8..12].copy_from_slice(&mins_lo.to_le_bytes());
    out[12..16].copy_from_slice(&mins_hi.to_le_bytes());
    out
}

/// The 256 quants of a Q4_K block in element order (0..16 each).
#[inline]
pub(crate) fn q4k_quants(x: &BlockQ4K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            let byte = x.qs[32 * c + l];
            q[64 * c + l] = byte & 0x0F;
            q[64 * c + 32 + l] = byte >> 4;
        }
    }
    q
}

/// The 256 quants of a Q6_K block in element order, already minus 32 (-32..32).
#[inline]
pub(crate) fn q6k_quants(x: &BlockQ6K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for h in 0..2 {
        let (ql, qh) = (&x.ql[64 * h..64 * h + 64], &x.qh[32 * h..32 * h + 32]);
        let out = &mut q[128 * h..128 * h + 128];
        for l in 0..32 {
            out[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            out[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

/// The 32 quants of a Q5_0 block in element order (0..32, before subtracting 16).
#[inline]
pub(crate) fn q5_0_quants(x: &BlockQ5_0) -> [u8; QK] {
    let qh = u32::from_le_bytes(x.qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (x.qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (x.qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

// ---------------------------------------------------------------------------------------------
// Dequantize. Each takes exactly the blocks of one row; `dst` holds their elements.

/// F32 bytes (little-endian) to f32.
pub fn dequantize_row_f32_ref(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 4 * dst.len());
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// F16 bytes to f32 (exact).
pub fn dequantize_row_f16_ref(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len());
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *out = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// BF16 bytes to f32 (exact).
pub fn dequantize_row_bf16_ref(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len());
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *out = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

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

/// Q4_K: `(d * sc) * q - (dmin * m)` per sub-block of 32.
pub fn dequantize_row_q4_k_ref(src: &[BlockQ4K], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
        let sm = unpack_q4k_scales(&x.scales);
        let q = q4k_quants(x);
        for (j, (o, q)) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
            let (scale, min) = (d * sm[j] as f32, dmin * sm[8 + j] as f32);
            for (o, &q) in o.iter_mut().zip(q) {
                *o = scale * q as f32 - min;
            }
        }
    }
}

/// Q6_K: `(d * sc) * (q - 32)` per sub-block of 16.
pub fn dequantize_row_q6_k_ref(src: &[BlockQ6K], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = x.d.to_f32();
        let q = q6k_quants(x);
        for (g, (o, q)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let scale = d * x.scales[g] as f32;
            for (o, &q) in o.iter_mut().zip(q) {
                *o = scale * q as f32;
            }
        }
    }
}

/// Q8_K: `q * d`.
pub fn dequantize_row_q8_k_ref(src: &[BlockQ8K], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = x.d.get();
        for (o, &q) in out.iter_mut().zip(&x.qs) {
            *o = q as f32 * d;
        }
    }
}

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

// ---------------------------------------------------------------------------------------------
// Quantize (ggml's `quantize_row_*_ref`, bit for bit).

/// f32 to little-endian F32 bytes.
pub fn quantize_row_f32_ref(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), 4 * src.len());
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(4)) {
        out.copy_from_slice(&x.to_le_bytes());
    }
}

/// f32 to F16, round to nearest even.
pub fn quantize_row_f16_ref(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), 2 * src.len());
    for (&x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&F16Le::from_f32(x).0);
    }
}

/// f32 to BF16 as ggml rounds (nearest even; NaN stays a quiet NaN).
pub fn quantize_row_bf16_ref(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), 2 * src.len());
    for (&x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
    }
}

/// The element with the largest magnitude, keeping its sign (first one on ties).
#[inline]
fn signed_absmax(xs: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in xs {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

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

/// Q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize_row_q4_1_ref(src: &[f32], dst: &mut [BlockQ4_1]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in x {
            min = if v < min { v } else { min };
            max = if v > max { v } else { max };
        }
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

/// Q8_K: `iscale = -127 / max` (signed extreme), `q = min(127, round_even(iscale * x))`,
/// `d = 1 / iscale`, and the sums of each 16 quants.
pub fn quantize_row_q8_k_ref(src: &[f32], dst: &mut [BlockQ8K]) {
    assert_eq!(src.len(), dst.len() * QK_K);
    for (x, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let max = signed_absmax(x);
        if max == 0.0 {
            *y = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        fill_q8k_sums(y);
        y.d = F32Le::new(1.0 / iscale);
    }
}

/// A16: `d = amax / 32767`, `q = round_even(x / d)` (clamped to +-32767), `s = d * sum(q)`.
/// The SIMD quantizer in `activation` produces the same bytes.
pub fn quantize_row_a16_ref(src: &[f32], dst: &mut [BlockA16]) {
    assert_eq!(src.len(), dst.len() * QK);
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 32767.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            let r = (v * id).round_ties_even().clamp(-32767.0, 32767.0) as i16;
            *q = I16Le::new(r);
            sum += r as i32;
        }
        y.d = F32Le::new(d);
        y.s = F32Le::new(sum as f32 * d); // |sum| < 2^21: exact in f32
    }
}

/// Sets `bsums` from `qs`.
#[inline]
pub(crate) fn fill_q8k_sums(y: &mut BlockQ8K) {
    for (sum, qs) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *sum = I16Le::new(qs.iter().map(|&q| q as i16).sum());
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products, all with the `VecDotFn` signature.

/// Sum of `w[i] * a[i]` over a row, in f64, reading each element through `get`.
#[inline]
fn float_dot(n: usize, w: &[u8], a: &[u8], width: usize, get: impl Fn(&[u8]) -> f32) -> f32 {
    let mut sum = 0.0f64;
    for (wb, ab) in w.chunks_exact(width).zip(a.chunks_exact(4)).take(n) {
        let x = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        sum += get(wb) as f64 * x as f64;
    }
    sum as f32
}

/// F32 weights x F32 activations.
pub fn vec_dot_f32_f32_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::F32, n, w, a);
    float_dot(n, w, a, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// F16 weights x F32 activations.
pub fn vec_dot_f16_f32_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::F16, n, w, a);
    float_dot(n, w, a, 2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32())
}

/// BF16 weights x F32 activations.
pub fn vec_dot_bf16_f32_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::BF16, n, w, a);
    float_dot(n, w, a, 2, |b| {
        bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
    })
}

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

/// Q4_K x A16: per sub-block j of 32 (one A16 block each),
/// `d*sc_j * da_j * (q . a)_j - dmin*m_j * s_j`, summed in f32 per sub-block.
pub fn vec_dot_q4_k_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q4K, n, w, a);
    let (w, a) = (view_blocks::<BlockQ4K>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, ys) in w.iter().zip(a.chunks_exact(QK_K / QK)) {
        let sm = unpack_q4k_scales(&x.scales);
        let q = q4k_quants(x);
        let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
        for (j, (q, y)) in q.chunks_exact(QK).zip(ys).enumerate() {
            let dot: i32 = q.iter().zip(&y.qs).map(|(&q, a)| q as i32 * a.get() as i32).sum();
            sum += d * sm[j] as f32 * (y.d.get() * dot as f32) - dmin * sm[8 + j] as f32 * y.s.get();
        }
    }
    sum
}

/// Q6_K x A16: per group g of 16, `d * sc_g * da * ((q - 32) . a)_g`; the two groups of an
/// A16 block are combined in f32 (an i32 sum of `sc * dot` could overflow).
pub fn vec_dot_q6_k_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q6K, n, w, a);
    let (w, a) = (view_blocks::<BlockQ6K>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, ys) in w.iter().zip(a.chunks_exact(QK_K / QK)) {
        let q = q6k_quants(x);
        let d = x.d.to_f32();
        for (j, (q, y)) in q.chunks_exact(QK).zip(ys).enumerate() {
            let dot = |h: usize| -> f32 {
                let r = 16 * h..16 * h + 16;
                q[r.clone()].iter().zip(&y.qs[r]).map(|(&q, a)| q as i32 * a.get() as i32).sum::<i32>() as f32
            };
            let groups = x.scales[2 * j] as f32 * dot(0) + x.scales[2 * j + 1] as f32 * dot(1);
            sum += d * (y.d.get() * groups);
        }
    }
    sum
}

/// The scalar kernel for weights of type `ty`; `None` for the activation-only Q8_1, Q8_K, A16.
pub fn vec_dot_fn_ref(ty: GgmlType) -> Option<VecDotFn> {
    Some(match ty {
        GgmlType::F32 => vec_dot_f32_f32_ref,
        GgmlType::F16 => vec_dot_f16_f32_ref,
        GgmlType::BF16 => vec_dot_bf16_f32_ref,
        GgmlType::Q4_0 => vec_dot_q4_0_a16_ref,
        GgmlType::Q4_1 => vec_dot_q4_1_a16_ref,
        GgmlType::Q5_0 => vec_dot_q5_0_a16_ref,
        GgmlType::Q8_0 => vec_dot_q8_0_a16_ref,
        GgmlType::Q4K => vec_dot_q4_k_a16_ref,
        GgmlType::Q6K => vec_dot_q6_k_a16_ref,
        GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16 => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unpack_q4k_scales` against a literal transcription of ggml's `get_scale_min_k4`.
    #[test]
    fn q4k_scale_unpacking_matches_get_scale_min_k4() {
        let mut state = 0x1234_5678u32;
        for _ in 0..1000 {
            let mut packed = [0u8; 12];
            for b in &mut packed {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (state >> 24) as u8;
            }
            let sm = unpack_q4k_scales(&packed);
            for j in 0..8 {
                let (d, m) = if j < 4 {
                    (packed[j] & 63, packed[j + 4] & 63)
                } else {
                    (
                        (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
                        (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
                    )
                };
                assert_eq!((sm[j], sm[8 + j]), (d, m), "sub-block {j} of {packed:?}");
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

    #[test]
    fn q8_k_rounds_half_to_even_and_sums() {
        let mut x = [0.0f32; QK_K];
        x[0] = -127.0; // max = -127, iscale = 1
        x[1] = 2.5;
        x[2] = 3.5;
        let mut y = [BlockQ8K::default()];
        quantize_row_q8_k_ref(&x, &mut y);
        assert_eq!(&y[0].qs[..3], &[-127, 2, 4]);
        assert_eq!(y[0].bsums[0].get(), -127 + 2 + 4);
        assert_eq!(y[0].d.get(), 1.0);
    }
}
