"""What honest-worker checks cost and how fast they catch a liar (issue 12 part 3), on a
loopback mesh of real processes: SmolLM2's layers 0-14 on three workers and 15-29 on two (1
thread each, on this machine's 2 cores; the bootstrap node is a process too).

    python benches/bench_checks.py [--model smollm2] [--rates 0 0.1 0.5 1] [--sessions 6]
                                   [--tokens 16] [--liar-rate 0.5] [--trials 3]

1. Cost: for each `--rates` value a fresh End node (`connect(verify=rate)`) runs `--sessions`
   greedy generations of `--tokens` tokens one after another on the honest mesh: decode
   tokens/s over them all (prefill included), verified sessions, and hop checks. A verified
   session runs each hop on two providers at once, hop by hop from the End node.
2. Catch: one of the three providers of layers 0-14 is replaced by a liar (the test adversary
   `MESHPY_TEST_LIAR`, negating its outputs on `--liar-rate` of its steps); for `--trials`
   fresh End nodes at `--verify 0.1`, sessions run until the liar is banned: decode steps the
   End node took before the ban, sessions whose tokens differed from one process's (the
   liar's damage before it was caught), and sessions run.

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import Model, model_path  # noqa: E402
from meshpy.mesh import connect  # noqa: E402
from meshpy.mesh.launcher import LocalMesh  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of a paperclip.",
    "What is the capital of France, and why is it famous?",
]


def greedy(model: Model, prompt: str, n: int, after_step=None) -> list[int]:  # noqa: ANN001
    """`n` greedy tokens; `after_step()` runs after each forward (prefill and decode) and may
    return True to stop early."""
    import numpy as np

    session = model.new_session()
    try:
        logits = model.prefill(session, model.encode(prompt))
        out: list[int] = []
        while len(out) < n:
            if after_step is not None and after_step():
                break
            out.append(int(np.argmax(model.end.samplable(logits))))
            logits = model.step(session, out[-1])
        return out
    finally:
        model.close_session(session)


def cost(bootstrap: str, path: Path, rates: list[float], sessions: int, tokens: int, want: dict[str, list[int]]) -> None:
    print("| verify | tokens/s | vs 0 | verified sessions | hop checks | mismatches | tokens right |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    base = None
    for rate in rates:
        with connect(path, bootstrap, threads=1, route_timeout=60, verify=rate) as model:
            greedy(model, PROMPTS[0], 4)  # warm-up
            pipeline = model.pipeline
            before = dict(pipeline.verify_counts)
            right, n = True, 0
            t0 = time.perf_counter()
            for i in range(sessions):
                prompt = PROMPTS[i % len(PROMPTS)]
                got = greedy(model, prompt, tokens)
                right &= got == want[prompt]
                n += len(got)
            rate_tps = n / (time.perf_counter() - t0)
            base = base or rate_tps
            counts = {k: pipeline.verify_counts[k] - before[k] for k in before}
            print(f"| {rate:g} | {rate_tps:.1f} | {rate_tps / base:.2f}x | {counts['sessions']} | {counts['hop_checks']} "
                  f"| {counts['mismatches']} | {'yes' if right else 'NO'} |", flush=True)


def catch(bootstrap: str, path: Path, trials: int, tokens: int, want: dict[str, list[int]], rate: float = 0.1) -> None:
    print(f"\n| trial (verify {rate:g}) | steps before the ban | sessions run | sessions with wrong tokens | caught |")
    print("|---:|---:|---:|---:|:---:|")
    for trial in range(trials):
        with connect(path, bootstrap, threads=1, route_timeout=60, verify=rate) as model:
            pipeline = model.pipeline
            steps, sessions, wrong = 0, 0, 0

            def count() -> bool:
                nonlocal steps
                steps += 1
                return False

            while not pipeline.bans.reasons() and sessions < 200:
                prompt = PROMPTS[sessions % len(PROMPTS)]
                got = greedy(model, prompt, tokens, count)
                sessions += 1
                wrong += got != want[prompt]
            caught = bool(pipeline.bans.reasons())
            print(f"| {trial + 1} | {steps} | {sessions} | {wrong} | {'yes' if caught else 'no'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--liar-rate", type=float, default=0.5)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    path = model_path(args.model)
    print(f"machine: {machine()}; commit {commit()}; model {path.name}")
    local = Model.load(path, threads=1)
    want = {p: greedy(local, p, args.tokens) for p in PROMPTS}
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        for layers in ("0-14", "0-14", "15-29", "15-29"):
            mesh.add_worker(path, layers=layers, threads=1)
        honest_third = mesh.add_worker(path, layers="0-14", threads=1)
        print(f"\nhonest mesh: layers 0-14 on 3 workers, 15-29 on 2; {args.sessions} sessions of {args.tokens} tokens")
        cost(mesh.bootstrap_addr, path, args.rates, args.sessions, args.tokens, want)
        honest_third.stop()
        mesh.add_worker(path, layers="0-14", threads=1, env={"MESHPY_TEST_LIAR": str(args.liar_rate)})
        # The stopped worker's records linger until they expire; discovery skips it (no Info).
        print(f"\none provider of layers 0-14 lies on {args.liar_rate:.0%} of its steps")
        catch(mesh.bootstrap_addr, path, args.trials, args.tokens, want)


if __name__ == "__main__":
    main()
