"""Aggregate decode speed with several generations at once: 1, 4 and 8 concurrent greedy
streams on the End node's scheduler (the Python API) in one process and through a mesh of
workers on loopback, same machine, one run. The scheduler runs every stream's step in one
iteration; on the workers the entries of a request (and requests that arrive together) run
as one span call (one read of the weights for all); the workers' `Info` counters show it.

    python benches/bench_concurrency.py [--model smollm2] [--threads 2] [--workers 2] [--streams 1 4 8]
                                        [--lanes 1 2] [--pin]

`--lanes` sets how many batches the mesh End node keeps in flight (pipelining: while one
batch crosses the second worker the next crosses the first); `--pin` pins worker i to CPU i,
as if each worker had a machine of its own (the End node shares them).

Each stream prefills its own prompt (`--prompt-tokens`, a different slice of the benchmark
text per stream) and decodes `--decode-tokens` tokens; the figure is all streams' decoded
tokens over the wall time from the first prefill to the last token. Nothing here asserts a
speed. (Issue 11's own figures go through `meshpy serve` and the openai client; this isolates
the engine and the mesh.)
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine, prompt_ids  # noqa: E402
from meshpy.generation import GenerationStats, Model, model_path  # noqa: E402
from meshpy.mesh import connect  # noqa: E402
from meshpy.mesh.launcher import LocalMesh  # noqa: E402
from meshpy.mesh.placement import format_layers  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.pipeline import split_layers  # noqa: E402
from meshpy.sampling import Sampler  # noqa: E402


class _Count:
    """A TokenSink that counts tokens and says when its generation ended."""

    def __init__(self) -> None:
        self.n = 0
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def token(self, token: int, logprob: object = None) -> bool:
        self.n += 1
        return True

    def end(self, finish_reason: str | None, error: BaseException | None) -> None:
        self.error = error
        self.ended.set()

    def closed(self) -> None:
        pass


def run_streams(model: Model, prompts: list[list[int]], n_decode: int) -> float:
    """Decoded tokens per second of all `prompts` generated at once on the model's scheduler
    (greedy, no stop tokens, so every stream decodes `n_decode`)."""
    sinks = [_Count() for _ in prompts]
    t0 = time.perf_counter()
    for ids, sink in zip(prompts, sinks):
        model.scheduler.submit(ids, n_decode, Sampler(), frozenset(), sink, GenerationStats())
    for sink in sinks:
        sink.ended.wait()
        if sink.error is not None:
            raise sink.error
    return sum(s.n for s in sinks) / (time.perf_counter() - t0)


def row(label: str, model: Model, prompts: list[list[int]], streams: list[int], n_decode: int) -> list[float]:
    run_streams(model, prompts[:1], 8)  # warm-up
    rates = [run_streams(model, prompts[:n], n_decode) for n in streams]
    cells = "".join(f"{r:>10.1f} ({r / rates[0]:.1f}x)" for r in rates)
    print(f"{label:>32} {cells}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--transport", default="tcp", choices=("tcp", "quic"))
    parser.add_argument("--pin", action="store_true", help="pin worker i to CPU i (the End node floats)")
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 2],
                        help="batches the mesh End node keeps in flight (one row each)")
    args = parser.parse_args()

    path = model_path(args.model)
    n_layers = read_config(open_model_source(path)).n_layers
    local = Model.load(path, threads=args.threads)
    local.keep_prompts(0)  # every round prefills its prompts (the prompt cache would skip repeats)
    text = prompt_ids(local, args.prompt_tokens * max(args.streams) + args.prompt_tokens)
    prompts = [text[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(max(args.streams))]
    print(f"machine: {machine()}; commit {commit()}; model {path.name}; {args.threads} threads per process; "
          f"{args.prompt_tokens}-token prompts, {args.decode_tokens} decoded tokens per stream")
    print(f"{'aggregate tok/s':>32} " + "".join(f"{f'{n} stream' + ('s' if n > 1 else ''):>17}" for n in args.streams))
    row("one process", local, prompts, args.streams, args.decode_tokens)
    local.close()
    with LocalMesh(transport=args.transport) as mesh:
        mesh.start_bootstrap()
        for layers in split_layers(n_layers, args.workers):
            mesh.add_worker(path, layers=format_layers(layers), threads=args.threads, kv_budget="256MiB")
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            for i, worker in enumerate(mesh.workers):
                os.sched_setaffinity(worker.proc.pid, {cpus[i % len(cpus)]})
                for tid in os.listdir(f"/proc/{worker.proc.pid}/task"):  # threads started already
                    os.sched_setaffinity(int(tid), {cpus[i % len(cpus)]})
        for lanes in args.lanes:
            with connect(path, mesh.bootstrap_addr, threads=args.threads, transport=args.transport,
                         lanes=lanes) as model:
                model.keep_prompts(0)
                row(f"mesh, {args.workers} workers, {lanes} in flight", model, prompts, args.streams,
                    args.decode_tokens)
                pipeline = model.pipeline
                for provider in pipeline.providers:
                    info = pipeline.node.info(provider.peer_id)
                    if "span_calls" not in info:
                        continue  # a worker built before batching
                    print(f"  worker {provider.peer_id[-8:]} (layers {info['first_layer']}-{info['first_layer'] + info['n_layers'] - 1}): "
                          f"{info['span_entries']} session steps in {info['span_calls']} span calls, largest batch {info['largest_batch']}")


if __name__ == "__main__":
    main()
