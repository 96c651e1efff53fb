//! Scalar reference kernels of the 4-bit table formats: IQ4_NL (blocks of 32) and IQ4_XS
//! (super-blocks of 256 with 6-bit sub-block scales), whose fields index the fixed table
//! [`KVALUES_IQ4NL`], and MXFP4 (blocks of 32 with a power-of-two scale), whose fields index
//! [`KVALUES_MXFP4`]. Unpacking, dequantize, dot products against A16 activations.
//!
//! Followed: `kvalues_iq4nl` and `kvalues_mxfp4` in ggml/src/ggml-common.h,
//! `dequantize_row_iq4_nl`, `dequantize_row_iq4_xs` and `dequantize_row_mxfp4` in
//! ggml/src/ggml-quants.c (`d * table[i]`, `(d * (ls - 32)) * table[i]`,
//! `ggml_e8m0_to_fp32_half(e) * table[i]`), the generic `ggml_vec_dot_{iq4_nl,iq4_xs,mxfp4}_q8_*`
//! in ggml/src/ggml-cpu/quants.c.

use crate::quant::blocks::{view_blocks, BlockA16, BlockIQ4NL, BlockIQ4XS, BlockMXFP4, QK, QK_K};
use crate::quant::{check_dot, GgmlType};

/// The 16 values a 4-bit IQ4_NL / IQ4_XS field stands for (ggml's `kvalues_iq4nl`), before
/// the block's scale; denser near zero, where weights are.
pub const KVALUES_IQ4NL: [i8; 16] =
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// The 16 values a 4-bit MXFP4 field stands for (ggml's `kvalues_mxfp4`): E2M1's values
/// (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) doubled, so integers; the block scale
/// halves them back (`e8m0_to_f32_half`).
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half the power of two an E8M0 exponent stands for, `2^(e - 128)` (ggml's
/// `ggml_e8m0_to_fp32_half`: a subnormal for e < 2).
#[inline]
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    f32::from_bits(if e < 2 { 0x0020_0000u32 << e } else { (u32::from(e) - 1) << 23 })
}

// ---------------------------------------------------------------------------------------------
// Unpacking shared by dequantize, dot and the repacking code.

/// The 32 nibbles of 16 bytes in element order: byte j holds element j (low nibble) and
/// element j + 16 (high nibble).
#[inline]
fn nibbles_32(qs: &[u8]) -> [u8; QK] {
    std::array::from_fn(|e| (qs[e % 16] >> (4 * (e / 16))) & 0x0F)
}

/// The 32 table indices of an IQ4_NL block in element order (0..16 each; the value is
/// `d * KVALUES_IQ4NL[i]`).
#[inline]
pub(crate) fn iq4nl_indices(x: &BlockIQ4NL) -> [u8; QK] {
    nibbles_32(&x.qs)
}

/// The 32 table indices of an MXFP4 block in element order (the value is
/// `e8m0_to_f32_half(e) * KVALUES_MXFP4[i]`).
#[inline]
pub(crate) fn mxfp4_indices(x: &BlockMXFP4) -> [u8; QK] {
    nibbles_32(&x.qs)
}

/// The 256 table indices of an IQ4_XS block in element order (0..16 each; the value is
/// `d * scales[e / 32] * KVALUES_IQ4NL[i]`).
#[inline]
pub(crate) fn iq4xs_indices(x: &BlockIQ4XS) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (out, qs) in q.chunks_exact_mut(QK).zip(x.qs.chunks_exact(QK / 2)) {
        out.copy_from_slice(&nibbles_32(qs));
    }
    q
}

/// IQ4_XS's eight sub-block scales, already minus 32 (-32..32): sub-block j covers elements
/// 32j..32j + 32.
#[inline]
pub(crate) fn iq4xs_scales(x: &BlockIQ4XS) -> [i8; QK_K / QK] {
    let high = u16::from_le_bytes(x.scales_h);
    std::array::from_fn(|j| {
        let low = (x.scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
        (low | ((((high >> (2 * j)) & 3) as u8) << 4)) as i8 - 32
    })
}

// ---------------------------------------------------------------------------------------------
// Dequantize. Each takes exactly the blocks of one row; `dst` holds their elements.

/// IQ4_NL: `d * table[i]`.
pub fn dequantize_row_iq4_nl_ref(src: &[BlockIQ4NL], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = x.d.to_f32();
        for (o, &i) in out.iter_mut().zip(&iq4nl_indices(x)) {
            *o = d * KVALUES_IQ4NL[i as usize] as f32;
        }
    }
}

/// MXFP4: `2^(e - 128) * table[i]`.
pub fn dequantize_row_mxfp4_ref(src: &[BlockMXFP4], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = e8m0_to_f32_half(x.e);
        for (o, &i) in out.iter_mut().zip(&mxfp4_indices(x)) {
            *o = d * KVALUES_MXFP4[i as usize] as f32;
        }
    }
}

/// IQ4_XS: `(d * ls) * table[i]` per sub-block of 32, `ls` already minus 32.
pub fn dequantize_row_iq4_xs_ref(src: &[BlockIQ4XS], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = x.d.to_f32();
        let ls = iq4xs_scales(x);
        let q = iq4xs_indices(x);
        for (j, (o, q)) in out.chunks_exact_mut(QK).zip(q.chunks_exact(QK)).enumerate() {
            let scale = d * ls[j] as f32;
            for (o, &i) in o.iter_mut().zip(q) {
                *o = scale * KVALUES_IQ4NL[i as usize] as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products, all with the `VecDotFn` signature.

/// `sum_j table[i_j] * a_j` over 32 elements, exactly (|sum| <= 32 * 127 * 32767 < 2^28).
#[inline]
fn table_dot(table: &[i8; 16], indices: &[u8], a: &BlockA16) -> i32 {
    indices
        .iter()
        .zip(&a.qs)
        .map(|(&i, a)| table[i as usize] as i32 * a.get() as i32)
        .sum()
}

/// IQ4_NL x A16: `sum_b d * da * sum_j table[i_j] * a_j`.
pub fn vec_dot_iq4_nl_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::IQ4NL, n, w, a);
    let (w, a) = (view_blocks::<BlockIQ4NL>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        sum += x.d.to_f32() * (y.d.get() * table_dot(&KVALUES_IQ4NL, &iq4nl_indices(x), y) as f32);
    }
    sum
}

/// MXFP4 x A16: `sum_b 2^(e - 128) * da * sum_j table[i_j] * a_j`.
pub fn vec_dot_mxfp4_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::MXFP4, n, w, a);
    let (w, a) = (view_blocks::<BlockMXFP4>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        sum += e8m0_to_f32_half(x.e) * (y.d.get() * table_dot(&KVALUES_MXFP4, &mxfp4_indices(x), y) as f32);
    }
    sum
}

/// IQ4_XS x A16: per sub-block j of 32 (one A16 block each), `d*ls_j * da_j * (table[i] . a)_j`.
pub fn vec_dot_iq4_xs_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::IQ4XS, n, w, a);
    let (w, a) = (view_blocks::<BlockIQ4XS>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, ys) in w.iter().zip(a.chunks_exact(QK_K / QK)) {
        let (ls, q) = (iq4xs_scales(x), iq4xs_indices(x));
        let d = x.d.to_f32();
        for (j, (q, y)) in q.chunks_exact(QK).zip(ys).enumerate() {
            sum += d * ls[j] as f32 * (y.d.get() * table_dot(&KVALUES_IQ4NL, q, y) as f32);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blocks::as_blocks;
    use crate::test_rng::TestRng;

    /// `iq4nl_indices` against ggml's `qs[j] & 0xf`, `qs[j] >> 4` (`dequantize_row_iq4_nl`).
    #[test]
    fn iq4nl_indices_match_ggml_loop() {
        let mut rng = TestRng::new(20);
        for _ in 0..300 {
            let x: BlockIQ4NL = as_blocks(&rng.bytes(18)).expect("one block")[0];
            let q = iq4nl_indices(&x);
            for j in 0..QK / 2 {
                assert_eq!((q[j], q[j + 16]), (x.qs[j] & 0x0F, x.qs[j] >> 4), "byte {j}");
            }
        }
    }

    /// `iq4xs_indices` and `iq4xs_scales` against a literal transcription of ggml's
    /// `dequantize_row_iq4_xs` (`ls` from `scales_l` and `scales_h`, `qs` advancing by 16).
    #[test]
    fn iq4xs_unpacking_matches_ggml_loop() {
        let mut rng = TestRng::new(23);
        for _ in 0..300 {
            let x: BlockIQ4XS = as_blocks(&rng.bytes(136)).expect("one block")[0];
            let (q, ls) = (iq4xs_indices(&x), iq4xs_scales(&x));
            let scales_h = u16::from_le_bytes(x.scales_h) as i32;
            for ib in 0..QK_K / 32 {
                let want = ((x.scales_l[ib / 2] as i32 >> (4 * (ib % 2))) & 0xf)
                    | (((scales_h >> (2 * ib)) & 3) << 4);
                assert_eq!(ls[ib] as i32, want - 32, "sub-block {ib}");
                let qs = &x.qs[16 * ib..16 * ib + 16];
                for j in 0..16 {
                    assert_eq!(q[32 * ib + j], qs[j] & 0xf, "sub-block {ib} element {j}");
                    assert_eq!(q[32 * ib + j + 16], qs[j] >> 4, "sub-block {ib} element {}", j + 16);
                }
            }
        }
    }
}
