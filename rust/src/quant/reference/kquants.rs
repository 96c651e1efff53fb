//! Scalar reference kernels of the 256-element k-quants (Q4_K, Q6_K; Q8_K, ggml's k-quant
//! activation format, for quantize / dequantize only): unpacking, dequantize, dot products
//! against A16 activations.

use super::signed_absmax;
use crate::quant::blocks::{
    view_blocks, BlockA16, BlockQ4K, BlockQ6K, BlockQ8K, F32Le, I16Le, QK, QK_K,
};
use crate::quant::{check_dot, GgmlType};

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

// ---------------------------------------------------------------------------------------------
// Dequantize. Each takes exactly the blocks of one row; `dst` holds their elements.

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

// ---------------------------------------------------------------------------------------------
// Quantize (ggml's `quantize_row_*_ref`, bit for bit).

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

/// Sets `bsums` from `qs`.
#[inline]
pub(crate) fn fill_q8k_sums(y: &mut BlockQ8K) {
    for (sum, qs) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *sum = I16Le::new(qs.iter().map(|&q| q as i16).sum());
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products, all with the `VecDotFn` signature.

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
