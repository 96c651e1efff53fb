//! Tests of the repacked layouts and kernels: repacking is lossless (dequantization equals
//! the source type's), the scalar repacked reference equals the per-row reference dot, and
//! the SIMD kernels match the scalar reference for 1..4 tokens, partial groups and extremes.

use super::blocks::QK_K;
use super::repack::{repacked_fn_at, repacked_types, Repacked, RepackedKind, MAX_TOKENS, ROWS};
use super::*;
use crate::test_rng::TestRng;

/// |kernel - reference| <= this * sum |w_i a_i|: only the f32 summation order differs.
const REL_TOL: f32 = 1e-5;

fn quantized(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    if ty.block_len() == QK_K || ty == GgmlType::IQ4NL || ty == GgmlType::MXFP4 {
        return random_blocks(ty, x);
    }
    let mut out = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
    quantize_row(ty, x, &mut out).expect("quantizable");
    out
}

/// Rows of the types we have no quantizer for (k-quants, IQ4): random bytes seeded from `x`
/// (every quant and sub-block scale pattern), f16 scales from its magnitude (signed for the
/// types whose values are signed), so rows differ.
fn random_blocks(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut gen = TestRng::new(x.iter().fold(0x51u64, |h, v| h.rotate_left(5) ^ v.to_bits() as u64));
    let mut out = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
    out.iter_mut().for_each(|b| *b = gen.next_u64() as u8);
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    for block in out.chunks_exact_mut(ty.block_bytes()) {
        super::tests::set_scales(ty, block, &[amax / 500.0, amax / 900.0]);
    }
    out
}

/// Weights `rows x cols` of `ty` with rows of different magnitudes.
fn matrix(ty: GgmlType, rows: usize, cols: usize, gen: &mut TestRng) -> Vec<u8> {
    (0..rows)
        .flat_map(|r| {
            let scale = 0.01 * (1 + r % 7) as f32;
            quantized(ty, &gen.gaussians(cols).iter().map(|v| v * scale).collect::<Vec<_>>())
        })
        .collect()
}

/// sum |w_i a_i| of row `r` with activation row `a`, both dequantized.
fn abs_dot(ty: GgmlType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    let (mut wf, mut af) = (vec![0f32; cols], vec![0f32; cols]);
    dequantize_row(ty, w, &mut wf).expect("row");
    dequantize_row(GgmlType::A16, a, &mut af).expect("row");
    wf.iter().zip(&af).map(|(w, a)| (w * a).abs()).sum()
}

/// Checks every kernel level this CPU has on one matrix against the per-row reference.
fn check(ty: GgmlType, rows: usize, cols: usize, w: &[u8], acts: &[Vec<u8>]) {
    let rp = Repacked::new(ty, rows, cols, w).expect("repackable");
    let row_bytes = ty.row_bytes(cols).expect("whole blocks");
    let dot = reference::vec_dot_fn_ref(ty).expect("weight type");
    let kind = RepackedKind::for_type(ty).expect("repackable type");
    let mut levels = 0;
    for level in SimdLevel::ALL {
        let Some(kernel) = repacked_fn_at(kind, level) else { continue };
        levels += 1;
        for nt in 1..=MAX_TOKENS.min(acts.len()) {
            for chunk in acts.chunks(nt) {
                let a: Vec<&[u8]> = chunk.iter().map(|a| a.as_slice()).collect();
                let mut out = vec![[f32::NAN; ROWS]; a.len()];
                for g in 0..rp.groups() {
                    kernel(&rp, g, &a, &mut out);
                    for (t, (o, act)) in out.iter().zip(&a).enumerate() {
                        for (i, &got) in o.iter().enumerate() {
                            let r = g * ROWS + i;
                            if r >= rows {
                                assert_eq!(got, 0.0, "{ty} {level:?} padding row {r}");
                                continue;
                            }
                            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                            let want = dot(cols, wr, act);
                            let tol = REL_TOL * abs_dot(ty, wr, act, cols) + 1e-30;
                            assert!(
                                (got - want).abs() <= tol,
                                "{ty} {level:?} {rows}x{cols} row {r} token {t}/{nt}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
    let expected = SimdLevel::ALL.iter().filter(|&&l| l <= cpu_simd()).count();
    assert_eq!(levels, expected, "a kernel at every level the CPU has");
}

#[test]
fn repacking_is_lossless() {
    let mut gen = TestRng::new(0x9E37_79B9_7F4A_7C15);
    for ty in repacked_types() {
        let cols_of = |c: usize| if ty.block_len() == 256 { 256 * c.div_ceil(32) } else { c };
        for (rows, cols) in [(1, 32), (17, 64), (40, 96)].map(|(r, c)| (r, cols_of(c))) {
            let w = matrix(ty, rows, cols, &mut gen);
            let rp = Repacked::new(ty, rows, cols, &w).expect("repackable");
            let row_bytes = ty.row_bytes(cols).expect("whole blocks");
            for r in 0..rows {
                let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
                dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut want).expect("row");
                rp.dequantize_row(r, &mut got);
                assert_eq!(got, want, "{ty} row {r}");
            }
        }
    }
    assert!(Repacked::new(GgmlType::F16, 1, 32, &[0u8; 64]).is_none());
}

#[test]
fn repacked_kernels_match_the_row_reference() {
    let mut gen = TestRng::new(0x1234_5678_9ABC_DEF1);
    for ty in repacked_types() {
        let shapes: &[(usize, usize)] = if ty.block_len() == 256 {
            &[(16, 256), (15, 512), (33, 1024)]
        } else {
            &[(16, 32), (15, 64), (33, 576), (64, 160)]
        };
        for &(rows, cols) in shapes {
            let w = matrix(ty, rows, cols, &mut gen);
            let acts: Vec<Vec<u8>> = (0..7).map(|_| quantized(GgmlType::A16, &gen.gaussians(cols))).collect();
            check(ty, rows, cols, &w, &acts);
        }
    }
}

#[test]
fn repacked_kernels_at_extreme_quants() {
    // Every quant byte at an extreme, activations at +-32767: any i16/i32 overflow would show.
    for ty in repacked_types() {
        let (rows, cols) = (16, 256);
        for byte in [0x00u8, 0xFF, 0x80, 0x7F] {
            let mut w = vec![byte; rows * ty.row_bytes(cols).expect("whole blocks")];
            for block in w.chunks_exact_mut(ty.block_bytes()) {
                // The scale, then (where there is one) a negative min.
                super::tests::set_scales(ty, block, &[0.01, -0.05]);
            }
            let acts: Vec<Vec<u8>> = [1.0f32, -1.0]
                .iter()
                .map(|&sign| {
                    let x: Vec<f32> = (0..cols).map(|i| if i % 5 == 0 { -sign } else { sign }).collect();
                    quantized(GgmlType::A16, &x)
                })
                .collect();
            check(ty, rows, cols, &w, &acts);
        }
    }
}

#[test]
fn mxfp4_repacks_only_scales_f16_holds_exactly() {
    // 2^(e - 128) is exact in f16 for e in 104..=143; a block outside keeps the matrix as stored.
    let (rows, cols) = (16, 64);
    let mut gen = TestRng::new(39);
    let mut w = matrix(GgmlType::MXFP4, rows, cols, &mut gen);
    assert!(Repacked::new(GgmlType::MXFP4, rows, cols, &w).is_some());
    for e in [103u8, 144, 0, 255] {
        w[0] = e;
        assert!(Repacked::new(GgmlType::MXFP4, rows, cols, &w).is_none(), "e = {e}");
    }
}
