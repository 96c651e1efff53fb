//! Scalar reference kernels of the float types (F32, F16, BF16): conversion both ways and
//! dot products against f32 activations, accumulated in f64.

use half::f16;

use crate::quant::blocks::{bf16_to_f32, f32_to_bf16, F16Le};
use crate::quant::{check_dot, GgmlType};

// ---------------------------------------------------------------------------------------------
// Dequantize.

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

// ---------------------------------------------------------------------------------------------
// Quantize.

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
