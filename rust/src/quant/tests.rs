//! Tests across the quant modules: SIMD against scalar for every type and level this CPU
//! has, quantization error bounds, activation quantizers bit-identical to the reference,
//! error paths, and (ignored by default) the throughput table of every dot kernel.
//!
//! Error bounds are measured on gaussian data (n = 4096, several seeds) and set with margin;
//! the measured values are in the comments beside each constant.

use crate::test_rng::TestRng;
use super::blocks::{BlockQ4K, BlockQ6K, F16Le, QK_K};
use super::reference::dequantize_row_q4_k_ref;
use super::*;

/// Weight types with a dot product.
const WEIGHT_TYPES: [GgmlType; 16] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::IQ4NL,
    GgmlType::IQ4XS,
    GgmlType::MXFP4,
];

/// Weight types with only the scalar per-row kernel: no AVX2 / AVX-512 per-row twin (their
/// SIMD is the repacked multi-row kind, written separately).
const SCALAR_ONLY: [GgmlType; 7] = [
    GgmlType::Q5_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q5K,
    GgmlType::IQ4NL,
    GgmlType::IQ4XS,
    GgmlType::MXFP4,
];

/// Quantized weight types without a quantizer here (ggml searches for their scales): tests
/// build their rows from random well-formed blocks.
const NO_QUANTIZER: [GgmlType; 6] =
    [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q5K, GgmlType::IQ4NL, GgmlType::IQ4XS, GgmlType::MXFP4];

/// SIMD dot vs scalar dot: |simd - scalar| <= this * sum |w_i * a_i| (dequantized values).
/// Both sum exact integer products per block; only the f32 accumulation order differs.
const SIMD_REL_TOL: f32 = 1e-5;

/// Gaussian rows per error-bound check (the bounds were set from 300).
const DOT_SEEDS: u64 = 32;

// Round trip: RMS(dequantize(quantize(x)) - x) / RMS(x) on gaussian rows of n = 4096.
// Measured: the worst of 300 rows, in the comment; it varies little from row to row, so the
// bounds sit ~10-20% above it (and the test also fails if a bound is 4x too loose).
/// Q4_0 round-trip relative RMS error (measured 0.0895).
const MAX_RMSE_Q4_0: f64 = 0.10;
/// Q4_1 round-trip relative RMS error (measured 0.0808).
const MAX_RMSE_Q4_1: f64 = 0.09;
/// Q5_0 round-trip relative RMS error (measured 0.0442).
const MAX_RMSE_Q5_0: f64 = 0.05;
/// Q5_1 round-trip relative RMS error (measured 0.0390).
const MAX_RMSE_Q5_1: f64 = 0.045;
/// Q8_0 round-trip relative RMS error (measured 0.00558).
const MAX_RMSE_Q8_0: f64 = 0.0065;
/// Q8_1 round-trip relative RMS error (measured 0.00558, the quants are Q8_0's).
const MAX_RMSE_Q8_1: f64 = 0.0065;
/// Q8_K round-trip relative RMS error (measured 0.00768).
const MAX_RMSE_Q8_K: f64 = 0.0088;
/// A16 round-trip relative RMS error (measured 2.14e-5; 16-bit quants).
const MAX_RMSE_A16: f64 = 2.5e-5;
/// Q4_K round-trip relative RMS error, with the simple test quantizer below (measured 0.0809).
const MAX_RMSE_Q4_K: f64 = 0.09;
/// Q6_K round-trip relative RMS error, with the simple test quantizer below (measured 0.0200).
const MAX_RMSE_Q6_K: f64 = 0.023;
/// F16 round-trip relative RMS error (measured 2.1e-4; half rounding is at most 2^-11).
const MAX_RMSE_F16: f64 = 2.5e-4;
/// BF16 round-trip relative RMS error (measured 1.73e-3; at most 2^-8).
const MAX_RMSE_BF16: f64 = 2.0e-3;

// Quantized dot vs the exact (f64) dot of the original f32 rows, relative to sum |w_i * x_i|,
// with weights quantized to the type and activations to its activation type, n = 4096.
// Measured: the worst of 300 row pairs, in the comment; bounds ~1.5x that.
/// Q4_0 x A16 dot error (measured 4.99e-3; 6.8e-3 with 8-bit activations).
const MAX_DOT_ERROR_Q4_0: f64 = 7.0e-3;
/// Q4_1 x A16 dot error (measured 4.26e-3; 6.8e-3 with Q8_1).
const MAX_DOT_ERROR_Q4_1: f64 = 6.0e-3;
/// Q5_0 x A16 dot error (measured 2.63e-3; 3.1e-3 with Q8_0).
const MAX_DOT_ERROR_Q5_0: f64 = 3.8e-3;
/// Q5_1 x A16 dot error (measured 2.55e-3).
const MAX_DOT_ERROR_Q5_1: f64 = 3.8e-3;
/// Q8_0 x A16 dot error (measured 3.35e-4; 5.6e-4 with Q8_0).
const MAX_DOT_ERROR_Q8_0: f64 = 4.8e-4;
/// Q4_K x A16 dot error, test quantizer (measured 3.28e-3; 5.7e-3 with Q8_K).
const MAX_DOT_ERROR_Q4_K: f64 = 4.8e-3;
/// Q6_K x A16 dot error, test quantizer (measured 1.01e-3; 1.2e-3 with Q8_K).
const MAX_DOT_ERROR_Q6_K: f64 = 1.5e-3;
/// Quantized weights x A16 activations against the exact dot of the *dequantized* weights:
/// the error the activation format adds (measured 1.38e-6 worst over the types; ggml's
/// 8-bit Q8_0/Q8_1/Q8_K activations measured ~1e-3 on the same data).
const MAX_A16_DOT_ERROR: f64 = 2.0e-6;
/// As MAX_A16_DOT_ERROR, with random well-formed weight blocks (random quants, sub-block
/// scales and mins) instead of quantized gaussian rows (measured 2.06e-6, Q5_K; 1.65e-6 to
/// 1.95e-6 for Q2_K, Q3_K, IQ4_NL, IQ4_XS).
const MAX_A16_DOT_ERROR_RANDOM_BLOCKS: f64 = 3.0e-6;
/// F16 x F32 dot error (measured 1.4e-5).
const MAX_DOT_ERROR_F16: f64 = 2.0e-5;
/// BF16 x F32 dot error (measured 1.2e-4).
const MAX_DOT_ERROR_BF16: f64 = 1.8e-4;
/// F32 x F32 dot error: f32 accumulation only (measured 1.0e-8).
const MAX_DOT_ERROR_F32: f64 = 5.0e-8;

// ---------------------------------------------------------------------------------------------
// Data.


/// Quantizes a weight row to `ty`: `quantize_row` where it supports `ty`, else the simple
/// test quantizers below (Q4_K, Q6_K).
fn quantize_weights(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::Q4K => quantize_q4k_for_tests(x),
        GgmlType::Q6K => quantize_q6k_for_tests(x),
        _ => {
            let mut out = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
            quantize_row(ty, x, &mut out).expect("supported target");
            out
        }
    }
}

/// Dequantizes a row of `n` elements.
fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    dequantize_row(ty, bytes, &mut out).expect("valid row");
    out
}

/// Activations for weights of type `ty`, as the forward pass makes them.
fn activations(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let at = ty.activation_type();
    if at == GgmlType::F32 {
        return x.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    let mut out = vec![0u8; at.row_bytes(x.len()).expect("whole blocks")];
    quantize_activations(at, x, &mut out);
    out
}

/// A simple Q4_K quantizer for test data (no search for optimal scales, unlike ggml's
/// `make_qkx2_quants`): sub-block range to a 6-bit scale and min, then nearest quants.
fn quantize_q4k_for_tests(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for xb in x.chunks_exact(QK_K) {
        let mut scale = [0.0f32; 8];
        let mut min = [0.0f32; 8];
        for (j, sub) in xb.chunks_exact(32).enumerate() {
            let lo = sub.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = sub.iter().fold(f32::MIN, |m, &v| m.max(v));
            scale[j] = (hi - lo) / 15.0;
            min[j] = -lo;
        }
        let d = scale.iter().fold(0.0f32, |m, &v| m.max(v)) / 63.0;
        let dmin = min.iter().fold(0.0f32, |m, &v| m.max(v)) / 63.0;
        let (d16, dmin16) = (F16Le::from_f32(d), F16Le::from_f32(dmin));
        let q6 = |v: f32, unit: f32| {
            if unit > 0.0 {
                (v / unit).round().clamp(0.0, 63.0) as u8
            } else {
                0
            }
        };
        let sc: [u8; 8] = std::array::from_fn(|j| q6(scale[j], d16.to_f32()));
        let mn: [u8; 8] = std::array::from_fn(|j| q6(min[j], dmin16.to_f32()));
        let mut block = BlockQ4K {
            d: d16,
            dmin: dmin16,
            ..BlockQ4K::default()
        };
        for j in 0..4 {
            block.scales[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
            block.scales[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
            block.scales[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        let mut q = [0u8; QK_K];
        for (j, sub) in xb.chunks_exact(32).enumerate() {
            let step = d16.to_f32() * sc[j] as f32;
            let offset = dmin16.to_f32() * mn[j] as f32;
            for (l, &v) in sub.iter().enumerate() {
                q[32 * j + l] = if step > 0.0 {
                    ((v + offset) / step).round().clamp(0.0, 15.0) as u8
                } else {
                    0
                };
            }
        }
        for c in 0..4 {
            for l in 0..32 {
                block.qs[32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
            }
        }
        out.extend_from_slice(blocks::block_bytes(std::slice::from_ref(&block)));
    }
    out
}

/// A simple Q6_K quantizer for test data: per-16 absmax scales (8-bit), nearest quants.
fn quantize_q6k_for_tests(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for xb in x.chunks_exact(QK_K) {
        let scale: [f32; 16] = std::array::from_fn(|g| {
            xb[16 * g..16 * g + 16]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()))
                / 31.0
        });
        let d = scale.iter().fold(0.0f32, |m, &v| m.max(v)) / 127.0;
        let d16 = F16Le::from_f32(d);
        let mut block = BlockQ6K {
            d: d16,
            ..BlockQ6K::default()
        };
        for (sc, &s) in block.scales.iter_mut().zip(&scale) {
            *sc = if d16.to_f32() > 0.0 {
                (s / d16.to_f32()).round().clamp(-128.0, 127.0) as i8
            } else {
                0
            };
        }
        for (e, &v) in xb.iter().enumerate() {
            let step = d16.to_f32() * block.scales[e / 16] as f32;
            let q = if step != 0.0 {
                (v / step).round().clamp(-32.0, 31.0) as i32 + 32
            } else {
                32
            } as u8;
            let (h, r) = (e / 128, e % 128);
            let (byte, nibble_shift) = (64 * h + r % 64, 4 * (r / 64));
            block.ql[byte] |= (q & 0x0F) << nibble_shift;
            block.qh[32 * h + r % 32] |= (q >> 4) << (2 * (r / 32));
        }
        out.extend_from_slice(blocks::block_bytes(std::slice::from_ref(&block)));
    }
    out
}

/// Byte offsets of the f16 scales (`d`, and `m` or `dmin` where the type has one) in a block
/// of quantized weight type `ty`: the fields random bytes must not fill with NaN or infinity.
pub(super) fn f16_scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4NL | GgmlType::IQ4XS => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        GgmlType::MXFP4 => &[], // its scale is an exponent byte (`set_scales`)
        _ => unreachable!("{ty} is not a quantized weight type"),
    }
}

/// Sets the scales of a block of quantized weight type `ty` to `values` (`d`, then the min
/// or `dmin` where the type has one): its f16 fields, or MXFP4's E8M0 exponent (the power of
/// two nearest |d|, kept where f16 holds it exactly, so the block repacks).
pub(super) fn set_scales(ty: GgmlType, block: &mut [u8], values: &[f32]) {
    if ty == GgmlType::MXFP4 {
        let exponent = values[0].abs().max(f32::MIN_POSITIVE).log2().round() as i32 + 128;
        block[0] = exponent.clamp(104, 143) as u8;
        return;
    }
    for (&at, &v) in f16_scale_offsets(ty).iter().zip(values) {
        block[at..at + 2].copy_from_slice(&F16Le::from_f32(v).0);
    }
}

/// Random weight bytes for `n` elements of `ty`: every quant and sub-block scale bit
/// pattern, finite f16 scales.
fn random_weights(ty: GgmlType, n: usize, rng: &mut TestRng) -> Vec<u8> {
    let mut bytes = rng.bytes(ty.row_bytes(n).expect("whole blocks"));
    let scale = |rng: &mut TestRng| (rng.uniform() as f32 - 0.5) * 0.2;
    let size = ty.block_bytes();
    for block in bytes.chunks_exact_mut(size) {
        match ty {
            GgmlType::F32 => block.copy_from_slice(&rng.gaussian().to_le_bytes()),
            GgmlType::F16 => block.copy_from_slice(&F16Le::from_f32(rng.gaussian()).0),
            GgmlType::BF16 => {
                block.copy_from_slice(&blocks::f32_to_bf16(rng.gaussian()).to_le_bytes())
            }
            GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16 => unreachable!("not a weight type"),
            _ => {
                let values = [scale(rng), scale(rng)];
                set_scales(ty, block, &values);
            }
        }
    }
    bytes
}

/// sum |w_i * a_i| over the dequantized rows: the scale of a dot product's rounding error.
fn abs_dot(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> f64 {
    let wf = dequantize(ty, w, n);
    let af = dequantize(ty.activation_type(), a, n);
    wf.iter()
        .zip(&af)
        .map(|(&w, &a)| (w as f64 * a as f64).abs())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// SIMD against scalar.

#[test]
fn every_level_the_cpu_has_offers_every_weight_type() {
    // Every weight type has a kernel at every level the CPU has, except that the scalar-only
    // types have one at the scalar level alone.
    for level in SimdLevel::ALL {
        for ty in WEIGHT_TYPES {
            let expected = level <= cpu_simd()
                && (level == SimdLevel::Scalar || !SCALAR_ONLY.contains(&ty));
            assert_eq!(vec_dot_fn_at(ty, level).is_some(), expected, "{ty} at {level:?}");
        }
        assert!(vec_dot_fn_at(GgmlType::Q8_1, level).is_none());
        assert!(vec_dot_fn_at(GgmlType::Q8K, level).is_none());
    }
}

#[test]
fn scalar_only_types_dispatch_to_the_scalar_reference() {
    // `vec_dot_fn` walks down the levels to the scalar kernel: the same bits as calling it.
    let mut rng = TestRng::new(4);
    for ty in SCALAR_ONLY {
        let n = 3 * ty.block_len().max(QK_K);
        let w = random_weights(ty, n, &mut rng);
        let a = activations(ty, &rng.gaussians(n));
        let scalar = reference::vec_dot_fn_ref(ty).expect("weight type")(n, &w, &a);
        assert_eq!(vec_dot_fn(ty)(n, &w, &a).to_bits(), scalar.to_bits(), "{ty}");
        assert_eq!(vec_dot(ty, n, &w, &a).expect("valid").to_bits(), scalar.to_bits(), "{ty}");
    }
}

#[test]
fn simd_dots_match_scalar_on_random_blocks() {
    let mut rng = TestRng::new(1);
    for ty in WEIGHT_TYPES {
        let bl = ty.block_len();
        // Odd block counts exercise the AVX-512 zero-padded tail (1..3 leftover blocks) and,
        // for the float types, the 32/16/8-lane steps and the scalar or masked tails.
        let counts: &[usize] = if bl == 1 {
            &[1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 257, 576]
        } else {
            &[1, 2, 3, 4, 5, 6, 7, 9, 18, 33]
        };
        for &count in counts {
            let n = count * bl;
            let w = random_weights(ty, n, &mut rng);
            let a = activations(ty, &rng.gaussians(n));
            let reference = vec_dot_fn_at(ty, SimdLevel::Scalar).expect("scalar kernel")(n, &w, &a);
            let scale = abs_dot(ty, &w, &a, n) as f32;
            for level in [SimdLevel::Avx2, SimdLevel::Avx512, SimdLevel::Avx512Vnni] {
                let Some(kernel) = vec_dot_fn_at(ty, level) else {
                    continue;
                };
                let got = kernel(n, &w, &a);
                assert!(
                    (got - reference).abs() <= SIMD_REL_TOL * scale + 1e-30,
                    "{ty} {level:?} n={n}: {got} vs scalar {reference} (scale {scale})"
                );
            }
        }
    }
}

/// Weight bytes of `ty` for `n` elements with every byte `byte` except the f16 scales, set
/// to `scale`.
fn constant_weights(ty: GgmlType, n: usize, byte: u8, scale: f32) -> Vec<u8> {
    let mut w = vec![byte; ty.row_bytes(n).expect("whole blocks")];
    for block in w.chunks_exact_mut(ty.block_bytes()) {
        set_scales(ty, block, &[scale, scale]);
    }
    w
}

/// The exact (f64) dot of a weight row and an activation row, both dequantized, and
/// sum |w_i * a_i|.
fn dequantized_dot(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> (f64, f64) {
    let (wf, af) = (dequantize(ty, w, n), dequantize(ty.activation_type(), a, n));
    let exact = wf.iter().zip(&af).map(|(&w, &a)| w as f64 * a as f64).sum();
    (exact, abs_dot(ty, w, a, n))
}

#[test]
fn scalar_dots_equal_the_dequantized_dot_on_random_blocks() {
    // The scalar kernel against the exact dot of what it dequantizes to: only its f32
    // scaling and summation round, so far inside MAX_A16_DOT_ERROR. Covers every quant and
    // sub-block scale bit pattern, the types without a quantizer included.
    let mut rng = TestRng::new(6);
    for ty in WEIGHT_TYPES.into_iter().filter(|t| t.activation_type() == GgmlType::A16) {
        for count in [1, 2, 5, 16] {
            let n = count * ty.block_len();
            let w = random_weights(ty, n, &mut rng);
            let a = activations(ty, &rng.gaussians(n));
            let got = reference::vec_dot_fn_ref(ty).expect("weight type")(n, &w, &a) as f64;
            let (exact, scale) = dequantized_dot(ty, &w, &a, n);
            assert!(
                (got - exact).abs() <= SIMD_REL_TOL as f64 * scale + 1e-30,
                "{ty} n={n}: {got} vs {exact} (scale {scale})"
            );
        }
    }
}

#[test]
fn scalar_dots_equal_the_dequantized_dot_at_extreme_quants() {
    // Largest products (every byte at an extreme, activations at +-32767): an i32 overflow
    // in a scalar kernel's exact sums would show here.
    for ty in WEIGHT_TYPES.into_iter().filter(|t| t.activation_type() == GgmlType::A16) {
        let n = 8 * ty.block_len();
        for (byte, sign) in [(0xFFu8, 1.0f32), (0x00, 1.0), (0x80, -1.0), (0x7F, -1.0), (0xAA, 1.0)] {
            let w = constant_weights(ty, n, byte, 0.01);
            let x: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { sign } else { -sign }).collect();
            let a = activations(ty, &x);
            let got = reference::vec_dot_fn_ref(ty).expect("weight type")(n, &w, &a) as f64;
            let (exact, scale) = dequantized_dot(ty, &w, &a, n);
            assert!(
                (got - exact).abs() <= SIMD_REL_TOL as f64 * scale + 1e-30,
                "{ty} byte {byte:#x}: {got} vs {exact}"
            );
        }
    }
}

#[test]
fn simd_dots_match_scalar_at_extreme_quants() {
    // Largest products: every quant at its extreme, activations at +-32767 (Q8_0 weights also
    // at -128), so any i16 saturation or i32 overflow in the SIMD paths would show.
    for ty in WEIGHT_TYPES.into_iter().filter(|t| !SCALAR_ONLY.contains(t) && t.block_len() > 1) {
        let n = 8 * ty.block_len();
        for (wbyte, sign) in [(0xFFu8, 1.0f32), (0x00, 1.0), (0x80, -1.0), (0xFF, -1.0)] {
            // Finite scales over the constant quant bytes.
            let w = constant_weights(ty, n, wbyte, 0.01);
            let x: Vec<f32> = (0..n)
                .map(|i| if i % 3 == 0 { sign } else { -sign })
                .collect();
            let a = activations(ty, &x);
            let reference = vec_dot_fn_at(ty, SimdLevel::Scalar).expect("scalar kernel")(n, &w, &a);
            let scale = abs_dot(ty, &w, &a, n) as f32;
            for level in [SimdLevel::Avx2, SimdLevel::Avx512, SimdLevel::Avx512Vnni] {
                let Some(kernel) = vec_dot_fn_at(ty, level) else {
                    continue;
                };
                let got = kernel(n, &w, &a);
                assert!(
                    (got - reference).abs() <= SIMD_REL_TOL * scale + 1e-30,
                    "{ty} {level:?} byte {wbyte:#x}: {got} vs scalar {reference}"
                );
            }
        }
    }
}

#[test]
fn kernels_read_unaligned_rows() {
    // Rows at odd addresses, as inside a memory-mapped file.
    let mut rng = TestRng::new(2);
    for ty in WEIGHT_TYPES {
        let n = 5 * ty.block_len().max(32);
        let w = random_weights(ty, n, &mut rng);
        let a = activations(ty, &rng.gaussians(n));
        let mut wbuf = vec![0u8; w.len() + 1];
        wbuf[1..].copy_from_slice(&w);
        let mut abuf = vec![0u8; a.len() + 3];
        abuf[3..].copy_from_slice(&a);
        let expected = vec_dot_fn_at(ty, SimdLevel::Scalar).expect("scalar")(n, &w, &a);
        for level in SimdLevel::ALL {
            let Some(kernel) = vec_dot_fn_at(ty, level) else {
                continue;
            };
            let got = kernel(n, &wbuf[1..], &abuf[3..]);
            let scale = abs_dot(ty, &w, &a, n) as f32;
            assert!(
                (got - expected).abs() <= SIMD_REL_TOL * scale,
                "{ty} {level:?}"
            );
        }
    }
}

#[test]
fn simd_activation_quantizers_are_bit_identical_to_reference() {
    let mut rng = TestRng::new(3);
    let mut inputs: Vec<Vec<f32>> = (0..6).map(|_| rng.gaussians(4 * QK_K)).collect();
    // Edge cases: zeros, exact halves after scaling, +-amax ties, a lone extreme, denormals.
    let mut edge = vec![0.0f32; 4 * QK_K];
    for (i, v) in edge.iter_mut().enumerate().skip(QK_K) {
        *v = ((i % 255) as f32 - 127.0) * 0.5;
    }
    edge[2 * QK_K] = -7.0;
    edge[2 * QK_K + 100] = 7.0;
    edge[3 * QK_K + 5] = 1e-40;
    inputs.push(edge);
    inputs.push((0..4 * QK_K).map(|i| (i as f32 - 300.0) * 0.25).collect());
    for x in &inputs {
        for ty in [GgmlType::A16] {
            let mut reference = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
            quantize_row(ty, x, &mut reference).expect("activation type");
            for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
                let mut got = vec![0u8; reference.len()];
                activation::quantize_activations(level, ty, x, &mut got);
                assert_eq!(got, reference, "{ty} at {level:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Error bounds.

/// RMS(dequantize(quantize(x)) - x) / RMS(x), the worst of 8 gaussian rows of 4096.
fn worst_round_trip_error(ty: GgmlType) -> f64 {
    (0..DOT_SEEDS)
        .map(|seed| {
            let x = TestRng::new(100 + seed).gaussians(4096);
            let y = dequantize(ty, &quantize_weights(ty, &x), x.len());
            let err: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum();
            let norm: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
            (err / norm).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn round_trip_errors_are_within_bounds() {
    let bounds = [
        (GgmlType::Q4_0, MAX_RMSE_Q4_0),
        (GgmlType::Q4_1, MAX_RMSE_Q4_1),
        (GgmlType::Q5_0, MAX_RMSE_Q5_0),
        (GgmlType::Q5_1, MAX_RMSE_Q5_1),
        (GgmlType::Q8_0, MAX_RMSE_Q8_0),
        (GgmlType::Q8_1, MAX_RMSE_Q8_1),
        (GgmlType::Q8K, MAX_RMSE_Q8_K),
        (GgmlType::A16, MAX_RMSE_A16),
        (GgmlType::Q4K, MAX_RMSE_Q4_K),
        (GgmlType::Q6K, MAX_RMSE_Q6_K),
        (GgmlType::F16, MAX_RMSE_F16),
        (GgmlType::BF16, MAX_RMSE_BF16),
    ];
    for (ty, bound) in bounds {
        let err = worst_round_trip_error(ty);
        println!("round trip {ty}: {err:.5} (bound {bound})");
        assert!(err <= bound, "{ty}: round-trip error {err} over {bound}");
        // A bound far above the measurement would not catch a regression.
        assert!(
            err > bound / 4.0,
            "{ty}: round-trip error {err} far under {bound}: tighten it"
        );
    }
    let x = TestRng::new(7).gaussians(4096);
    assert_eq!(
        dequantize(GgmlType::F32, &quantize_weights(GgmlType::F32, &x), x.len()),
        x
    );
}

#[test]
fn quantized_dots_are_within_bounds_of_the_f32_dot() {
    let bounds = [
        (GgmlType::Q4_0, MAX_DOT_ERROR_Q4_0),
        (GgmlType::Q4_1, MAX_DOT_ERROR_Q4_1),
        (GgmlType::Q5_0, MAX_DOT_ERROR_Q5_0),
        (GgmlType::Q5_1, MAX_DOT_ERROR_Q5_1),
        (GgmlType::Q8_0, MAX_DOT_ERROR_Q8_0),
        (GgmlType::Q4K, MAX_DOT_ERROR_Q4_K),
        (GgmlType::Q6K, MAX_DOT_ERROR_Q6_K),
        (GgmlType::F16, MAX_DOT_ERROR_F16),
        (GgmlType::BF16, MAX_DOT_ERROR_BF16),
        (GgmlType::F32, MAX_DOT_ERROR_F32),
    ];
    for (ty, bound) in bounds {
        let (mut worst, mut worst_act) = (0.0f64, 0.0f64);
        for seed in 0..DOT_SEEDS {
            let mut rng = TestRng::new(200 + seed);
            let (w, x) = (rng.gaussians(4096), rng.gaussians(4096));
            let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = w
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let wq = quantize_weights(ty, &w);
            let got = vec_dot_fn(ty)(w.len(), &wq, &activations(ty, &x));
            worst = worst.max((got as f64 - exact).abs() / scale);
            // The activations' share alone: against the exact dot of the dequantized weights.
            let wd = dequantize(ty, &wq, w.len());
            let exact_deq: f64 = wd.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale_deq: f64 = wd.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            worst_act = worst_act.max((got as f64 - exact_deq).abs() / scale_deq);
        }
        println!("dot {ty}: {worst:.2e} (bound {bound:.1e}); activations alone {worst_act:.2e}");
        assert!(worst <= bound, "{ty}: dot error {worst} over {bound}");
        let act_bound = if ty.activation_type() == GgmlType::A16 { MAX_A16_DOT_ERROR } else { bound };
        assert!(worst_act <= act_bound, "{ty}: activation dot error {worst_act} over {act_bound}");
    }
}

#[test]
fn dots_without_a_quantizer_are_within_the_activation_bound() {
    // The types with no quantizer here: weights are random well-formed blocks, so the
    // measurable error is the activations' share, against the exact dot of the dequantized
    // weights with the f32 activations (the second half of the test above).
    for ty in NO_QUANTIZER {
        let mut worst = 0.0f64;
        for seed in 0..DOT_SEEDS {
            let mut rng = TestRng::new(300 + seed);
            let n = 4096;
            let wq = random_weights(ty, n, &mut rng);
            let x = rng.gaussians(n);
            let got = vec_dot_fn(ty)(n, &wq, &activations(ty, &x));
            let wd = dequantize(ty, &wq, n);
            let exact: f64 = wd.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = wd.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            worst = worst.max((got as f64 - exact).abs() / scale);
        }
        println!("dot {ty}, activations alone: {worst:.2e} (bound {MAX_A16_DOT_ERROR_RANDOM_BLOCKS:.1e})");
        assert!(worst <= MAX_A16_DOT_ERROR_RANDOM_BLOCKS, "{ty}: activation dot error {worst}");
    }
}

#[test]
fn q4k_test_quantizer_agrees_with_reference_decoding() {
    // The packing of the test quantizer must be what the reference decodes: a constant
    // sub-block decodes to (nearly) itself.
    let x: Vec<f32> = (0..QK_K).map(|i| (i / 32) as f32 - 3.5).collect();
    let bytes = quantize_q4k_for_tests(&x);
    let mut y = vec![0.0f32; QK_K];
    dequantize_row_q4_k_ref(blocks::as_blocks(&bytes).expect("one block"), &mut y);
    for (a, b) in x.iter().zip(&y) {
        assert!((a - b).abs() < 0.1, "{a} vs {b}");
    }
}

// ---------------------------------------------------------------------------------------------
// Types and errors.

#[test]
fn ids_names_and_sizes() {
    let expected = [
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
        (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
        (GgmlType::Q2K, 10, "Q2_K", 256, 84),
        (GgmlType::Q3K, 11, "Q3_K", 256, 110),
        (GgmlType::Q4K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6K, 14, "Q6_K", 256, 210),
        (GgmlType::Q8K, 15, "Q8_K", 256, 292),
        (GgmlType::IQ4NL, 20, "IQ4_NL", 32, 18),
        (GgmlType::IQ4XS, 23, "IQ4_XS", 256, 136),
        (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
        (GgmlType::BF16, 30, "BF16", 1, 2),
    ];
    for (ty, id, name, len, bytes) in expected {
        assert_eq!(GgmlType::from_ggml_id(id).expect("supported"), ty);
        assert_eq!(
            (ty.ggml_id(), ty.name(), ty.block_len(), ty.block_bytes()),
            (id, name, len, bytes)
        );
        assert_eq!(GgmlType::from_name(name).expect("known"), ty);
        assert_eq!(
            GgmlType::from_name(&name.to_lowercase()).expect("case-insensitive"),
            ty
        );
    }
    for (name, ty) in [
        ("q2k", GgmlType::Q2K),
        ("Q3K", GgmlType::Q3K),
        ("q4k", GgmlType::Q4K),
        ("q5k", GgmlType::Q5K),
        ("q6k", GgmlType::Q6K),
    ] {
        assert_eq!(GgmlType::from_name(name).expect("k-quant without underscore"), ty);
    }
    for ty in WEIGHT_TYPES.into_iter().filter(|t| t.block_len() > 1) {
        assert_eq!(ty.activation_type(), GgmlType::A16, "{ty}");
    }
    let a16 = GgmlType::A16;
    assert_eq!((a16.name(), a16.block_len(), a16.block_bytes()), ("A16", 32, 76));
    assert_eq!(GgmlType::from_name("a16").expect("A16 by name"), a16);
    assert!(GgmlType::from_ggml_id(a16.ggml_id()).is_err(), "A16 is not a ggml type");
    assert!(a16.is_activation_only() && a16.activation_type() == a16);
    assert_eq!(GgmlType::BF16.activation_type(), GgmlType::F32);
}

#[test]
fn unsupported_types_are_named() {
    let named = |r: Result<GgmlType>| match r {
        Err(Error::UnsupportedType { name, supported }) => {
            for ty in ["Q4_K", "Q5_1", "Q2_K", "IQ4_NL", "IQ4_XS"] {
                assert!(supported.split(", ").any(|s| s == ty), "{ty} not in {supported}");
            }
            name
        }
        other => panic!("expected UnsupportedType, got {other:?}"),
    };
    assert_eq!(named(GgmlType::from_ggml_id(16)), "IQ2_XXS");
    assert_eq!(named(GgmlType::from_ggml_id(17)), "IQ2_XS");
    assert_eq!(named(GgmlType::from_name("iq2_xxs")), "IQ2_XXS");
    assert_eq!(named(GgmlType::from_ggml_id(1000)), "ggml type id 1000");
    assert_eq!(named(GgmlType::from_name("iq2_xs")), "IQ2_XS");
    assert_eq!(named(GgmlType::from_name("float8")), "float8");
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    assert!(matches!(GgmlType::Q4_0.row_bytes(33), Err(Error::Shape(_))));
    assert_eq!(GgmlType::Q4_0.row_bytes(64).expect("two blocks"), 36);
    let mut out = vec![0.0f32; 64];
    assert!(matches!(
        dequantize_row(GgmlType::Q4_0, &[0u8; 35], &mut out),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        dequantize_row(GgmlType::Q4_0, &[0u8; 37], &mut out),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        dequantize_row(GgmlType::Q4K, &[0u8; 144], &mut out),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        dequantize_row(GgmlType::F16, &[0u8; 127], &mut out),
        Err(Error::Shape(_))
    ));
    let x = vec![0.5f32; 64];
    assert!(matches!(
        quantize_row(GgmlType::Q8_0, &x, &mut [0u8; 67]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q8_0, &x[..40], &mut [0u8; 68]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q4K, &[0.0; 256], &mut [0u8; 144]),
        Err(Error::UnsupportedType { .. })
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q6K, &[0.0; 256], &mut [0u8; 210]),
        Err(Error::UnsupportedType { .. })
    ));
    for ty in NO_QUANTIZER {
        let mut out = vec![0u8; ty.row_bytes(256).expect("whole blocks")];
        match quantize_row(ty, &[0.0; 256], &mut out) {
            Err(Error::UnsupportedType { supported, .. }) => {
                assert!(supported.contains("Q5_1") && !supported.contains(ty.name()), "{supported}");
            }
            other => panic!("{ty}: expected UnsupportedType, got {other:?}"),
        }
    }
    assert!(matches!(
        vec_dot(GgmlType::Q4_0, 64, &[0u8; 36], &[0u8; 151]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        vec_dot(GgmlType::Q4_0, 60, &[0u8; 36], &[0u8; 152]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        vec_dot(GgmlType::Q8K, 256, &[0u8; 292], &[0u8; 292]),
        Err(Error::UnsupportedType { .. })
    ));
    assert_eq!(
        vec_dot(GgmlType::Q4_0, 64, &[0u8; 36], &[0u8; 152]).expect("valid"),
        0.0
    );
}

#[test]
#[should_panic(expected = "vec_dot Q4_1")]
fn vec_dot_fn_panics_on_a_short_row() {
    vec_dot_fn(GgmlType::Q4_1)(64, &[0u8; 39], &[0u8; 144]);
}

#[test]
#[should_panic(expected = "activation-only")]
fn vec_dot_fn_panics_for_activation_only_types() {
    vec_dot_fn(GgmlType::Q8K);
}
