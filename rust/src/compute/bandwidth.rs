//! The machine's memory read bandwidth as the compute pool sees it: the yardstick of decode,
//! which reads every weight once per token. Benchmarks report each engine's share of it.

use std::hint::black_box;
use std::time::Instant;

use super::{SharedMut, ThreadPool};

/// Bytes per second at which `pool`'s threads read a fresh `n_bytes` buffer (each thread a
/// contiguous share, as the products split weight rows), best of `repeats` passes. The
/// buffer is written first, so its pages exist; make it larger than the last-level cache.
pub fn read_bandwidth(pool: &ThreadPool, n_bytes: usize, repeats: usize) -> f64 {
    // The pages the weights get (huge where the OS gives them), written so they exist.
    let mut map = super::pages::huge_zeroed(n_bytes.max(64));
    map.fill(1);
    // SAFETY: the map is page-aligned, so u64-aligned, and holds `len / 8` whole words.
    let words: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast(), map.len() / 8) };
    let n = words.len();
    let shared = SharedMut::new(words);
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        pool.run(|ctx| {
            // SAFETY: nothing writes the buffer during the job.
            let mine = unsafe { shared.slice(ctx.split(n)) };
            black_box(sum_words(mine));
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best
}

/// A wrapping sum of `words` in independent lanes, so the loop is bound by loads, not by an
/// add chain; with AVX2, 32-byte loads (the widest the weights' kernels use).
fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu_simd() >= crate::quant::SimdLevel::Avx2 {
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_words_avx2(words) };
    }
    let mut acc = [0u64; 8];
    for chunk in words.chunks_exact(8) {
        for (a, &w) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(0, |s, &a| s.wrapping_add(a))
}

/// [`sum_words`] with four 256-bit accumulators (the tail of fewer than 16 words is skipped:
/// it is noise in a bandwidth measurement).
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    for chunk in words.chunks_exact(16) {
        let p = chunk.as_ptr().cast::<__m256i>();
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(i)));
        }
    }
    let mut lanes = [0u64; 4];
    let sum = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sum);
    lanes.iter().fold(0, |s, &a| s.wrapping_add(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_finite() {
        let pool = ThreadPool::new(2);
        let bw = read_bandwidth(&pool, 1 << 20, 2);
        assert!(bw.is_finite() && bw > 1e6, "{bw} bytes/s");
    }
}
