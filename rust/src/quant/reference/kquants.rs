//! Scalar reference kernels of the 256-element k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; Q8_K,
//! ggml's k-quant activation format, for quantize / dequantize only): unpacking, dequantize,
//! dot products against A16 activations.
//!
//! Followed for Q2_K, Q3_K and Q5_K: `dequantize_row_q2_K`, `dequantize_row_q3_K` (its `aux`
//! scale shuffle) and `dequantize_row_q5_K` in ggml/src/ggml-quants.c, the generic
//! `ggml_vec_dot_q{2,3,5}_K_q8_K` in ggml/src/ggml-cpu/quants.c. Each dequantizer computes the
//! sub-block's f32 scale first (`d * sc`, `dmin * m`) and then `scale * q - min`, as ggml and
//! gguf-py do, so the results are bit-exact with both.

use super::signed_absmax;
use crate::quant::blocks::{
    view_blocks, BlockA16, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, F32Le,
    I16Le, QK, QK_K,
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

/// The 256 low nibbles of Q4_K's and Q5_K's `qs` in element order: 64-element chunk c in
/// bytes 32c..32c+32, low nibbles first.
#[inline]
fn nibble_quants(qs: &[u8; QK_K / 2]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            let byte = qs[32 * c + l];
            q[64 * c + l] = byte & 0x0F;
            q[64 * c + 32 + l] = byte >> 4;
        }
    }
    q
}

/// The 256 two-bit fields of Q2_K's and Q3_K's `qs` in element order (0..4): for half h,
/// byte 32h + l holds elements 128h + 32k + l at bits 2k..2k + 2.
#[inline]
fn two_bit_quants(qs: &[u8; QK_K / 4]) -> [u8; QK_K] {
    std::array::from_fn(|e| {
        let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
        (qs[32 * h + l] >> (2 * k)) & 3
    })
}

/// Bit `e / 32` of byte `e % 32` of a 32-byte mask, for each element e: Q3_K's `hmask` and
/// Q5_K's `qh` (0 or 1).
#[inline]
fn high_bits(mask: &[u8; QK_K / 8]) -> [u8; QK_K] {
    std::array::from_fn(|e| (mask[e % 32] >> (e / 32)) & 1)
}

/// The 256 quants of a Q2_K block in element order (0..4 each).
#[inline]
pub(crate) fn q2k_quants(x: &BlockQ2K) -> [u8; QK_K] {
    two_bit_quants(&x.qs)
}

/// Q2_K's sixteen sub-block scales and sixteen mins (0..16 each); sub-block j covers
/// elements 16j..16j + 16, its value is `d * scales[j] * q - dmin * mins[j]`.
#[inline]
pub(crate) fn q2k_scales(x: &BlockQ2K) -> ([u8; 16], [u8; 16]) {
    (x.scales.map(|b| b & 0x0F), x.scales.map(|b| b >> 4))
}

/// The 256 quants of a Q3_K block in element order, with `hmask` applied (-4..4): the two
/// low bits, minus 4 where the element's `hmask` bit is clear.
#[inline]
pub(crate) fn q3k_quants(x: &BlockQ3K) -> [i8; QK_K] {
    let (low, high) = (two_bit_quants(&x.qs), high_bits(&x.hmask));
    std::array::from_fn(|e| low[e] as i8 - if high[e] != 0 { 0 } else { 4 })
}

/// Q3_K's sixteen sub-block scales, already minus 32 (-32..32); sub-block j covers elements
/// 16j..16j + 16, its value is `d * scales[j] * q`.
#[inline]
pub(crate) fn q3k_scales(x: &BlockQ3K) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = (x.scales[j % 8] >> (4 * (j / 8))) & 0x0F;
        let high = (x.scales[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// The 256 quants of a Q4_K block in element order (0..16 each).
#[inline]
pub(crate) fn q4k_quants(x: &BlockQ4K) -> [u8; QK_K] {
    nibble_quants(&x.qs)
}

/// The 256 quants of a Q5_K block in element order (0..32 each). Its scales and mins are
/// packed as Q4_K's: [`unpack_q4k_scales`] unpacks them.
#[inline]
pub(crate) fn q5k_quants(x: &BlockQ5K) -> [u8; QK_K] {
    let (mut q, high) = (nibble_quants(&x.qs), high_bits(&x.qh));
    for (q, h) in q.iter_mut().zip(high) {
        *q |= h << 4;
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

/// Q2_K: `(d * sc) * q - (dmin * m)` per sub-block of 16.
pub fn dequantize_row_q2_k_ref(src: &[BlockQ2K], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
        let (sc, m) = q2k_scales(x);
        let q = q2k_quants(x);
        for (g, (o, q)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let (scale, min) = (d * sc[g] as f32, dmin * m[g] as f32);
            for (o, &q) in o.iter_mut().zip(q) {
                *o = scale * q as f32 - min;
            }
        }
    }
}

/// Q3_K: `(d * sc) * q` per sub-block of 16, `sc` and `q` with their offsets applied.
pub fn dequantize_row_q3_k_ref(src: &[BlockQ3K], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = x.d.to_f32();
        let sc = q3k_scales(x);
        let q = q3k_quants(x);
        for (g, (o, q)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let scale = d * sc[g] as f32;
            for (o, &q) in o.iter_mut().zip(q) {
                *o = scale * q as f32;
            }
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

/// Q5_K: `(d * sc) * q - (dmin * m)` per sub-block of 32.
pub fn dequantize_row_q5_k_ref(src: &[BlockQ5K], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_K);
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
        let sm = unpack_q4k_scales(&x.scales);
        let q = q5k_quants(x);
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

/// `(q . a)` and `sum(a)` over one 16-element group, exactly (|dot| <= 16 * 4 * 32767).
#[inline]
fn group_dot<Q: Copy + Into<i32>>(q: &[Q], a: &[I16Le]) -> (i32, i32) {
    q.iter().zip(a).fold((0, 0), |(dot, sum), (&q, a)| {
        (dot + q.into() * a.get() as i32, sum + a.get() as i32)
    })
}

/// Q2_K x A16: per A16 block (sub-blocks 2j, 2j + 1 of 16), `d * da * sum_g sc_g (q . a)_g -
/// dmin * da * sum_g m_g sum(a)_g`, the two groups combined exactly in i32 (4-bit scales and
/// mins: |sum| < 2^26).
pub fn vec_dot_q2_k_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q2K, n, w, a);
    let (w, a) = (view_blocks::<BlockQ2K>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, ys) in w.iter().zip(a.chunks_exact(QK_K / QK)) {
        let q = q2k_quants(x);
        let (sc, m) = q2k_scales(x);
        let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
        for (j, (q, y)) in q.chunks_exact(QK).zip(ys).enumerate() {
            let (dot0, sum0) = group_dot(&q[..16], &y.qs[..16]);
            let (dot1, sum1) = group_dot(&q[16..], &y.qs[16..]);
            let (g0, g1) = (2 * j, 2 * j + 1);
            let scaled = sc[g0] as i32 * dot0 + sc[g1] as i32 * dot1;
            let mins = m[g0] as i32 * sum0 + m[g1] as i32 * sum1;
            sum += d * (y.d.get() * scaled as f32) - dmin * (y.d.get() * mins as f32);
        }
    }
    sum
}

/// Q3_K x A16: per A16 block (sub-blocks 2j, 2j + 1 of 16), `d * da * sum_g sc_g (q . a)_g`,
/// the two groups combined exactly in i32 (|sc| <= 32, |q| <= 4: |sum| < 2^28).
pub fn vec_dot_q3_k_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q3K, n, w, a);
    let (w, a) = (view_blocks::<BlockQ3K>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, ys) in w.iter().zip(a.chunks_exact(QK_K / QK)) {
        let q = q3k_quants(x);
        let sc = q3k_scales(x);
        let d = x.d.to_f32();
        for (j, (q, y)) in q.chunks_exact(QK).zip(ys).enumerate() {
            let (dot0, _) = group_dot(&q[..16], &y.qs[..16]);
            let (dot1, _) = group_dot(&q[16..], &y.qs[16..]);
            let scaled = sc[2 * j] as i32 * dot0 + sc[2 * j + 1] as i32 * dot1;
            sum += d * (y.d.get() * scaled as f32);
        }
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

/// Q5_K x A16: as Q4_K, per sub-block j of 32 (one A16 block each),
/// `d*sc_j * da_j * (q . a)_j - dmin*m_j * s_j` (|dot| <= 32 * 31 * 32767).
pub fn vec_dot_q5_k_a16_ref(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q5K, n, w, a);
    let (w, a) = (view_blocks::<BlockQ5K>(w), view_blocks::<BlockA16>(a));
    let mut sum = 0.0f32;
    for (x, ys) in w.iter().zip(a.chunks_exact(QK_K / QK)) {
        let sm = unpack_q4k_scales(&x.scales);
        let q = q5k_quants(x);
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
    use crate::quant::blocks::{as_blocks, Block};
    use crate::test_rng::TestRng;

    /// A block of random bytes (every field a random bit pattern).
    fn random_block<B: Block>(rng: &mut TestRng) -> B {
        as_blocks::<B>(&rng.bytes(std::mem::size_of::<B>())).expect("one block")[0]
    }

    /// `q2k_quants` and `q2k_scales` against a literal transcription of the loops of ggml's
    /// `dequantize_row_q2_K`: `(element, quant, scale, min)` in the order ggml writes them.
    #[test]
    fn q2k_unpacking_matches_ggml_loops() {
        let mut rng = TestRng::new(21);
        for _ in 0..300 {
            let x: BlockQ2K = random_block(&mut rng);
            let (q, (sc, m)) = (q2k_quants(&x), q2k_scales(&x));
            let (mut e, mut is) = (0, 0);
            for n in 0..2 {
                let qs = &x.qs[32 * n..];
                for j in 0..4 {
                    let shift = 2 * j;
                    for half in 0..2 {
                        let byte = x.scales[is];
                        for l in 0..16 {
                            let want = (qs[l + 16 * half] >> shift) & 3;
                            assert_eq!(q[e], want, "element {e}");
                            assert_eq!((sc[e / 16], m[e / 16]), (byte & 0x0F, byte >> 4), "element {e}");
                            e += 1;
                        }
                        is += 1;
                    }
                }
            }
            assert_eq!((e, is), (QK_K, 16));
        }
    }

    /// `q3k_quants` and `q3k_scales` against a literal transcription of ggml's
    /// `dequantize_row_q3_K`: the `aux` / `kmask` scale shuffle and the `hm[l] & m` loop.
    #[test]
    fn q3k_unpacking_matches_ggml_loops() {
        const KMASK1: u32 = 0x0303_0303;
        const KMASK2: u32 = 0x0f0f_0f0f;
        let mut rng = TestRng::new(31);
        for _ in 0..300 {
            let x: BlockQ3K = random_block(&mut rng);
            let mut aux = [0u32; 4];
            for (i, word) in aux.iter_mut().take(3).enumerate() {
                *word = u32::from_le_bytes(x.scales[4 * i..4 * i + 4].try_into().expect("4 bytes"));
            }
            let tmp = aux[2];
            aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
            aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
            aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
            aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
            let scales: Vec<i8> = aux.iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8).collect();
            let (q, sc) = (q3k_quants(&x), q3k_scales(&x));
            let (mut e, mut is, mut m) = (0, 0, 1u8);
            for n in 0..2 {
                let qs = &x.qs[32 * n..];
                for j in 0..4 {
                    let shift = 2 * j;
                    for half in 0..2 {
                        assert_eq!(sc[is] as i32, scales[is] as i32 - 32, "scale {is}");
                        for l in 0..16 {
                            let low = ((qs[l + 16 * half] >> shift) & 3) as i8;
                            let want = low - if x.hmask[l + 16 * half] & m != 0 { 0 } else { 4 };
                            assert_eq!(q[e], want, "element {e}");
                            e += 1;
                        }
                        is += 1;
                    }
                    m <<= 1;
                }
            }
            assert_eq!((e, is), (QK_K, 16));
        }
    }

    /// `q5k_quants` against a literal transcription of ggml's `dequantize_row_q5_K` (the `u1`,
    /// `u2` masks walking `qh`).
    #[test]
    fn q5k_quants_match_ggml_loops() {
        let mut rng = TestRng::new(51);
        for _ in 0..300 {
            let x: BlockQ5K = random_block(&mut rng);
            let q = q5k_quants(&x);
            let (mut e, mut u1, mut u2) = (0, 1u8, 2u8);
            for c in 0..4 {
                let ql = &x.qs[32 * c..32 * c + 32];
                for (&l, &h) in ql.iter().zip(&x.qh) {
                    assert_eq!(q[e], (l & 0x0F) + if h & u1 != 0 { 16 } else { 0 }, "{e}");
                    e += 1;
                }
                for (&l, &h) in ql.iter().zip(&x.qh) {
                    assert_eq!(q[e], (l >> 4) + if h & u2 != 0 { 16 } else { 0 }, "{e}");
                    e += 1;
                }
                u1 <<= 2;
                u2 <<= 2;
            }
        }
    }

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
