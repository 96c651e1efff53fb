"""What the mesh costs: decode and prefill speed through a bootstrap node and 2 or 3 worker
processes on loopback, against the same model in one process, same machine, one run.

    python benches/bench_mesh.py [--model smollm2] [--threads 2] [--workers 2 3] [--transport tcp]

Each worker hosts an equal share of the layers (given with --layers) and runs `--threads`
compute threads, as does the single process and the End node; the mesh's pipeline runs one
span at a time, so every stage has the whole machine while it works. Timings are the median
of several repeats; the ratio mesh/one-process is the figure of merit (issue 3 target: 0.85x
for decode). Each worker's peak RSS is printed beside its layers. Nothing here asserts a
speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for benches.bench_generate helpers and the benchmark text

from benches.bench_generate import commit, machine, prompt_ids  # noqa: E402
from meshpy.generation import Model, model_path  # noqa: E402
from meshpy.mesh import connect  # noqa: E402
from meshpy.mesh.launcher import LocalMesh  # noqa: E402
from meshpy.mesh.placement import format_layers  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.pipeline import split_layers  # noqa: E402


def timed(model: Model, ids: list[int], n_decode: int, repeats: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s over `repeats` sessions (greedy, fixed length)."""
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        session = model.new_session()
        try:
            t0 = time.perf_counter()
            logits = model.prefill(session, ids)
            t1 = time.perf_counter()
            token = int(logits.argmax())
            for _ in range(n_decode):
                token = int(model.step(session, token).argmax())
            t2 = time.perf_counter()
        finally:
            model.close_session(session)
        prefill.append(len(ids) / (t1 - t0))
        decode.append(n_decode / (t2 - t1))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--transport", default="tcp", choices=("tcp", "quic"))
    parser.add_argument("--wire-dtype", default="f32", choices=("f32", "bf16", "f16"))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker-timeout", type=float, default=600.0, help="seconds a worker may take to load")
    args = parser.parse_args()

    path = model_path(args.model)
    n_layers = read_config(open_model_source(path)).n_layers
    local = Model.load(path, threads=args.threads)
    ids = prompt_ids(local, args.prompt_tokens)
    print(f"machine: {machine()}; commit {commit()}; model {path.name}; {args.threads} threads per process; "
          f"transport {args.transport}, wire {args.wire_dtype}; prompt {len(ids)} tokens, decode {args.decode_tokens}")
    base_prefill, base_decode = timed(local, ids, args.decode_tokens, args.repeats)
    del local
    print(f"{'':>22} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9} {'decode vs one process':>22}")
    print(f"{'one process':>22} {base_prefill:>14.1f} {base_decode:>13.1f} {1000 / base_decode:>9.2f} {'1.00x':>22}")
    for n_workers in args.workers:
        with LocalMesh(transport=args.transport) as mesh:
            mesh.start_bootstrap()
            workers = [
                mesh.add_worker(path, layers=format_layers(layers), threads=args.threads, kv_budget="256MiB",
                                timeout=args.worker_timeout)
                for layers in split_layers(n_layers, n_workers)
            ]
            with connect(path, mesh.bootstrap_addr, threads=args.threads, transport=args.transport,
                         wire_dtype=args.wire_dtype) as model:
                prefill, decode = timed(model, ids, args.decode_tokens, args.repeats)
            rss = [(format_layers(w.layers), w.rss_bytes(peak=True)) for w in workers]
        label = f"mesh, {n_workers} workers"
        print(f"{label:>22} {prefill:>14.1f} {decode:>13.1f} {1000 / decode:>9.2f} {decode / base_decode:>21.2f}x")
        print(f"{'':>22} worker peak RSS: " + ", ".join(f"layers {layers} {b / 2**30:.2f} GiB" for layers, b in rss))


if __name__ == "__main__":
    main()
