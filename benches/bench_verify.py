"""What verifying a draft costs (issue 19): one session's decode step with 1 row (plain
decoding) against steps of 2..9 rows (the next token plus 1..8 drafted ones), each through
every layer and the output head, in one process after load and warm-up.

    python benches/bench_verify.py [--model smollm2 | PATH.gguf] [--threads 2] [--context 256]
                                   [--rows 1 2 3 5 9] [--repeats 5]

Each step starts at the same position (`--context` positions already in the cache; the cache
is rewound after every step, as a rejected draft is); the figure is the best of `--repeats`
rounds of 5 steps per row count, rounds alternating between row counts. Decode of a large
model reads every weight once per step whatever the rows, so extra rows cost only their
multiplies: the ratio to one row is what a draft of that many tokens must win back. Nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import Model, model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    path = model_path(args.model)
    t0 = time.perf_counter()
    model = Model.load(path, threads=args.threads)
    load = time.perf_counter() - t0
    vocab = model.config.vocab_size
    session = model.pipeline.new_session()
    ids = [int(i) for i in np.random.default_rng(0).integers(3, vocab - 1, size=args.context)]
    model.prefill(session, ids)
    base = session.n_positions
    best = {n: float("inf") for n in args.rows}
    for r in range(args.repeats + 1):  # round 0 warms up
        for n in args.rows:
            step_ids = ids[:n]
            t0 = time.perf_counter()
            for _ in range(5):
                np.argmax(model.end.logits(model.pipeline.forward(session, model.end.embed(step_ids))), axis=1)
                model.pipeline.rewind(session, base)
            if r:
                best[n] = min(best[n], (time.perf_counter() - t0) / 5)
    model.close_session(session)
    print(f"machine: {machine()}; commit {commit()}; model {path.name} (loaded in {load:.1f} s); "
          f"{args.threads} threads; {args.context} positions in the cache; best of {args.repeats}")
    one = best[min(args.rows)]
    for n in args.rows:
        print(f"  {n} row{'s' if n > 1 else ' '} ({n - 1} drafted): {best[n] * 1e3:8.2f} ms per step, "
              f"{best[n] / one:.2f}x one row")


if __name__ == "__main__":
    main()
