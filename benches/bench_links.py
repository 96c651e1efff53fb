"""Decode speed through a 3-worker loopback mesh at emulated link round trips (issue 19):
plain decoding against speculative decoding by prompt lookup, on a prompt whose reply quotes
it (lookup hits) and on free text (it mostly misses).

    python benches/bench_links.py [--model smollm2] [--rtt 0 5 20 50] [--max-tokens 64]
                                  [--draft-model PATH]

This machine's kernel has no netem, so link latency is emulated in user space:
`MESHPY_EMULATED_RTT_MS` makes every request a node sends wait that long first (see
`NodeConfig::emulated_rtt`; tests and benchmarks only). Here only the End node (this process)
sends tensor requests, one per hop (the star route), so each hop costs one emulated round
trip; the figure printed beside each setting is the measured one (median of 20 pings to each
worker). Workers (1 thread each, layers split evenly) and the bootstrap node are processes
of their own on the same 2 cores.

With `--draft-model`, drafts come from that model run on the End node (sharing the
tokenizer) instead of prompt lookup.

For each round trip and prompt: decode tokens/s (after the prefill, `GenerationStats`),
plain and speculative (adaptive draft length), tokens per traversal of the route, and whether
the tokens are identical. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from benches.bench_speculation import PROMPTS  # noqa: E402
from meshpy import _native  # noqa: E402
from meshpy.generation import GenerationStats, model_path  # noqa: E402
from meshpy.mesh import connect  # noqa: E402
from meshpy.mesh.launcher import LocalMesh  # noqa: E402
from meshpy.mesh.placement import format_layers  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.pipeline import split_layers  # noqa: E402

RTT_ENV = "MESHPY_EMULATED_RTT_MS"


def measured_rtt_ms(model) -> float:  # noqa: ANN001
    """Median round trip of a ping to each worker of the route, in ms."""
    node = model.pipeline.node
    times = []
    for hop in model.pipeline.route():
        for i in range(20):
            t0 = time.perf_counter()
            node.request(hop.provider.peer_id, _native.encode_ping(i))
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rtt", type=float, nargs="+", default=[0, 5, 20, 50], help="emulated round trips, ms")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--draft-model", help="draft with this local model instead of prompt lookup")
    args = ap.parse_args()
    path = model_path(args.model)
    config = read_config(open_model_source(path))
    print(f"machine: {machine()}; commit {commit()}; model {path.name}; {args.workers} workers on loopback "
          f"(1 thread each), star route; up to {args.max_tokens} greedy tokens; drafts from "
          f"{args.draft_model or 'prompt lookup'}")
    print(f"{'RTT ms (measured)':>18} {'prompt':>8} {'plain tok/s':>12} {'drafts tok/s':>13} {'speed-up':>9} "
          f"{'tokens/traversal':>17} {'same tokens':>12}")
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        for layers in split_layers(config.n_layers, args.workers):
            mesh.add_worker(path, layers=format_layers(layers), threads=1)
        for rtt in args.rtt:
            os.environ[RTT_ENV] = str(rtt)  # read when the End node's node starts
            try:
                with connect(path, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
                    if args.draft_model:
                        model.use_draft_model(model_path(args.draft_model), threads=1)
                    measured = measured_rtt_ms(model)
                    for name, prompt in PROMPTS.items():
                        ids = model.encode(prompt, raw=True)
                        runs = {}
                        for speculate in (False, True):
                            model.speculation = speculate
                            stats = GenerationStats(prompt_tokens=len(ids))
                            out = list(model.generate_ids(ids, args.max_tokens, stats=stats))
                            runs[speculate] = (out, stats)
                        (plain, ps), (spec, ss) = runs[False], runs[True]
                        traversals = max(ss.decode_steps - ss.accepted_draft_tokens, 1)
                        rate_p, rate_s = ps.decode_tokens_per_second, ss.decode_tokens_per_second
                        print(f"{rtt:>8.0f} ({measured:6.2f}) {name:>8} {rate_p:>12.1f} {rate_s:>13.1f} "
                              f"{rate_s / rate_p:>8.2f}x {ss.decode_steps / traversals:>17.2f} "
                              f"{'yes' if plain == spec else 'NO':>12}")
            finally:
                os.environ.pop(RTT_ENV, None)


if __name__ == "__main__":
    main()
