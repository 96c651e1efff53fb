//! The machine's memory read bandwidth as the compute pool sees it: the yardstick of decode,
//! which reads every weight once per token. Benchmarks report each engine's share of it.

use std::hint::black_box;
use std::time::Instant;

use super::{SharedMut, ThreadPool};

/// Bytes per second at which `pool`'s threads read a fresh `n_bytes` buffer (each thread a
/// contiguous share, as the products split weight rows), best of `repeats` passes. The
/// buffer is written first, so its pages exist; make it larger than the last-level cache.
pub fn read_bandwidth(pool: &ThreadPool, n_bytes: usize, repeats: usize) -> f64 {
    let mut words = vec![1u64; (n_bytes / 8).max(8)];
    let n = words.len();
    let shared = SharedMut::new(&mut words);
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        pool.run(|ctx| {
            // SAFETY: nothing writes the buffer during the job.
            let mine = unsafe { shared.slice(ctx.split(n)) };
            // Eight independent sums: the loop is bound by loads, not by an add chain.
            let mut acc = [0u64; 8];
            for chunk in mine.chunks_exact(8) {
                for (a, &w) in acc.iter_mut().zip(chunk) {
                    *a = a.wrapping_add(w);
                }
            }
            black_box(acc);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best
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
