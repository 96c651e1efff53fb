//! Throughput of the quantized matrix-vector and matrix-matrix kernels, one thread: GB/s of
//! weights read per type, for the per-row kernels (scalar and the active SIMD level) and the
//! repacked 16-row kernels (one token, and four tokens per call as in prefill), on a matrix
//! that fits L2 and on one that streams from DRAM (larger than a 32 MB L3), beside a plain
//! read of as many bytes.
//!
//!     cargo bench --bench kernels              # the CPU's best level
//!     MESHPY_ISA=avx2 cargo bench --bench kernels
//!
//! Timings are the best of several repeats; the machine may be shared, so compare columns
//! of one run rather than runs.

use std::hint::black_box;
use std::time::Instant;

use meshpy_native::quant::blocks::F16Le;
use meshpy_native::quant::repack::{repacked_fn, repacked_types, Repacked, RepackedKind, MAX_TOKENS, ROWS};
use meshpy_native::quant::{active_simd, quantize_row, vec_dot_fn, vec_dot_fn_at, GgmlType, SimdLevel};

/// Deterministic pseudo-random numbers (xorshift).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn normal(&mut self) -> f32 {
        (0..4).map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32).sum::<f32>() * 1.7 - 3.4
    }
}

/// `rows x cols` weights of `ty`: quantized from noise where we have a quantizer, else
/// random bytes with small f16 scales (the k-quants and IQ4 types; the byte offsets of their
/// f16 fields are ggml's block layouts).
fn weights(ty: GgmlType, rows: usize, cols: usize, gen: &mut Gen) -> Vec<u8> {
    let row_bytes = ty.row_bytes(cols).expect("whole blocks");
    let mut out = vec![0u8; rows * row_bytes];
    let mut x = vec![0f32; cols];
    let f16_fields: &[usize] = match ty {
        GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        GgmlType::IQ4NL | GgmlType::IQ4XS => &[0],
        _ => &[],
    };
    for row in out.chunks_exact_mut(row_bytes) {
        if f16_fields.is_empty() {
            x.iter_mut().for_each(|v| *v = gen.normal() * 0.02);
            quantize_row(ty, &x, row).expect("quantizable");
            continue;
        }
        row.iter_mut().for_each(|b| *b = gen.next() as u8);
        for block in row.chunks_exact_mut(ty.block_bytes()) {
            for &at in f16_fields {
                block[at..at + 2].copy_from_slice(&F16Le::from_f32(0.01).0);
            }
        }
    }
    out
}

/// Best seconds of `reps` runs of `f`.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let types = repacked_types();
    let mut gen = Gen(0x2545_F491_4F6C_DD1D);
    println!("one thread, {} kernels; GB/s of weights (x tokens for the N-token column, N = {MAX_TOKENS})", active_simd().name());
    for (label, rows, cols, reps) in [("L2", 576usize, 1536usize, 200usize), ("DRAM", 16384, 4096, 5)] {
        println!("\n{label}: {rows} x {cols}");
        println!(
            "{:<6} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}",
            "type", "MB", "scalar", "per-row", "repacked x1", "repacked xN", "read"
        );
        for &ty in &types {
            let w = weights(ty, rows, cols, &mut gen);
            let row_bytes = ty.row_bytes(cols).expect("whole blocks");
            let at = ty.activation_type();
            let nt_bench: usize = std::env::var("NT").ok().and_then(|v| v.parse().ok()).unwrap_or(MAX_TOKENS);
            let acts: Vec<Vec<u8>> = (0..nt_bench)
                .map(|_| {
                    let x: Vec<f32> = (0..cols).map(|_| gen.normal()).collect();
                    let mut a = vec![0u8; at.row_bytes(cols).expect("whole blocks")];
                    quantize_row(at, &x, &mut a).expect("activation type");
                    a
                })
                .collect();
            let gbs = |secs: f64, tokens: usize| format!("{:.1}", (w.len() * tokens) as f64 / secs / 1e9);
            let mut out = vec![0f32; rows];
            let per_row = |dot: fn(usize, &[u8], &[u8]) -> f32, out: &mut [f32]| {
                for (o, wr) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                    *o = dot(cols, wr, &acts[0]);
                }
                black_box(&out);
            };
            let scalar = vec_dot_fn_at(ty, SimdLevel::Scalar).expect("scalar kernel");
            let t_scalar = best(if label == "L2" { 5 } else { 1 }, || per_row(scalar, &mut out));
            let t_row = best(reps, || per_row(vec_dot_fn(ty), &mut out));
            let repacked = RepackedKind::for_type(ty).and_then(|kind| {
                Some((repacked_fn(kind)?, Repacked::new(ty, rows, cols, &w)?))
            });
            let (x1, x4) = match repacked {
                Some((kernel, rp)) => {
                    let mut buf = vec![[0f32; ROWS]; nt_bench];
                    let a: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
                    let t1 = best(reps, || {
                        for g in 0..rp.groups() {
                            kernel(&rp, g, &a[..1], &mut buf[..1]);
                        }
                        black_box(&buf);
                    });
                    let t4 = best(reps, || {
                        for g in 0..rp.groups() {
                            kernel(&rp, g, &a, &mut buf);
                        }
                        black_box(&buf);
                    });
                    (gbs(t1, 1), gbs(t4, nt_bench))
                }
                None => ("-".into(), "-".into()),
            };
            // The yardstick: a plain read of as many bytes (eight independent sums).
            let words: Vec<u64> = w.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
            let t_read = best(reps, || {
                let mut acc = [0u64; 8];
                for chunk in words.chunks_exact(8) {
                    for (a, &x) in acc.iter_mut().zip(chunk) {
                        *a = a.wrapping_add(x);
                    }
                }
                black_box(acc);
            });
            println!(
                "{:<6} {:>10.1} {:>10} {:>10} {:>12} {:>12} {:>10}",
                ty.name(),
                w.len() as f64 / 1e6,
                gbs(t_scalar, 1),
                gbs(t_row, 1),
                x1,
                x4,
                gbs(t_read, 1)
            );
        }
    }
}
