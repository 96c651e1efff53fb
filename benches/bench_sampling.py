"""Time per sampled token over a large vocabulary (Gemma 3's 262,144 entries).

    python benches/bench_sampling.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from meshpy.sampling import Sampler, SamplingParams

VOCAB = 262_144


def main() -> None:
    logits = np.random.default_rng(9).normal(0, 3, VOCAB).astype(np.float32)
    cases = {
        "greedy": SamplingParams(),
        "top_k=40": SamplingParams(temperature=0.8, top_k=40, seed=0),
        "top_p=0.9": SamplingParams(temperature=0.8, top_p=0.9, seed=0),
        "full softmax": SamplingParams(temperature=0.8, seed=0),
    }
    print(f"vocabulary {VOCAB}")
    for name, params in cases.items():
        sampler = Sampler(params)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            sampler.sample(logits)
            times.append(time.perf_counter() - t0)
        print(f"{name:14} {statistics.median(times) * 1e3:7.3f} ms/token")


if __name__ == "__main__":
    main()
