"""Decode and prefill speed of meshpy against llama.cpp, same GGUF, same threads, one run.

    python benches/bench_generate.py [--model smollm2] [--threads 2] [--prompt-tokens 512]
        [--isa avx2] [--llama-cpp DIR]

Prints tokens/s and ms/token for meshpy and for llama.cpp (`llama-cpp-python`, when
installed; build it from source with CMAKE_ARGS="-DGGML_NATIVE=ON"), and their ratio,
with the machine, model, quantization, threads, kernel level and commit. Decode reads
every weight once per token, so it also prints the weight bytes per token, the machine's
read bandwidth measured with the same thread count, and each engine's share of it; and
meshpy's peak RSS beside its weights and KV cache (meshpy runs first, then llama.cpp).
Timings are the median of several repeats; nothing here asserts a speed.

`--isa` forces meshpy's kernels (as MESHPY_ISA does); `--llama-cpp DIR` imports llama_cpp
from DIR first, e.g. a build for AVX2 only (`pip install --target DIR` with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
-DGGML_AVX512=OFF"), to compare AVX2 paths on an AVX-512 machine.
A random-weight model of any size: `python benches/make_gguf.py` (Llama-3-8B shapes, or
`--qwen3-30b-a3b` for a mixture of experts).

`--separate` runs each engine in its own process, one after the other (the rounds then do not
alternate): for a model only one engine's copy fits in memory at a time (a 17 GB
Qwen3-30B-A3B on a 24 GiB machine).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.fixtures (the benchmark text)

from meshpy import _native  # noqa: E402
from meshpy.generation import Model  # noqa: E402
from meshpy.models.packaged import PACKAGED_MODELS, resolve_packaged  # noqa: E402
from tests.fixtures.smollm2_reference import TEXT  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prompt_ids(model: Model, n: int) -> list[int]:
    ids = model.encode(TEXT, raw=True)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


class MeshpyEngine:
    """One round of meshpy: a prefill of `ids`, then `n_decode` greedy steps."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def round(self, ids: list[int], n_decode: int) -> tuple[float, float]:
        """(prefill seconds, seconds per decoded token)."""
        session = self.model.new_session()
        t0 = time.perf_counter()
        logits = self.model.prefill(session, ids)
        prefill = time.perf_counter() - t0
        token = int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(self.model.step(session, token)))
        decode = (time.perf_counter() - t0) / n_decode
        self.model.close_session(session)
        return prefill, decode


class LlamaCppEngine:
    """One round of llama.cpp on the same GGUF and thread count."""

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
            n_threads=threads, n_threads_batch=threads, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def _last_token(self) -> int:
        # Without logits_all, llama-cpp-python keeps no copy of the logits: read the context's.
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))))

    def round(self, ids: list[int], n_decode: int) -> tuple[float, float]:
        """(prefill seconds, seconds per decoded token)."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - t0
        token = self._last_token()
        t0 = time.perf_counter()
        for _ in range(n_decode):
            self.llm.eval([token])
            token = self._last_token()
        return prefill, (time.perf_counter() - t0) / n_decode


def decode_bytes_per_token(path: Path) -> int | None:
    """Bytes of weights a decode step reads: every tensor but the token embedding (of
    which it reads one row), unless the model ties its head to it; of a mixture of experts'
    stacked expert tensors, the share of the experts a token uses."""
    try:
        import gguf
    except ImportError:
        return None
    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    arch = str(reader.fields["general.architecture"].contents())
    experts = reader.fields.get(f"{arch}.expert_count")
    used = reader.fields.get(f"{arch}.expert_used_count")
    share = int(used.contents()) / int(experts.contents()) if experts and used else 1.0
    tied = "output.weight" not in sizes
    return int(sum(n * (share if "_exps." in name else 1.0) for name, n in sizes.items() if name != "token_embd.weight" or tied))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help=f"a GGUF path or a packaged model ({', '.join(PACKAGED_MODELS)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isa", choices=_native.simd_levels(), help="force meshpy's kernel level (default: the CPU's best)")
    ap.add_argument("--llama-cpp", type=Path, help="import llama_cpp from this directory first (e.g. an AVX2-only build)")
    ap.add_argument("--bandwidth-bytes", type=int, default=1 << 30, help="buffer read to measure the bandwidth")
    ap.add_argument("--separate", action="store_true", help="each engine in its own process, one after the other")
    ap.add_argument("--engine", choices=("meshpy", "llama.cpp"), help=argparse.SUPPRESS)  # one engine, for --separate
    args = ap.parse_args()
    if args.isa:
        _native.set_simd_level(args.isa)
    if args.llama_cpp:
        sys.path.insert(0, str(args.llama_cpp))

    path = Path(args.model) if Path(args.model).exists() else resolve_packaged(args.model)
    if args.engine:
        return measure_one(args, path)
    if args.separate:
        return separate(args, path)
    model = Model.load(path, threads=args.threads)
    ids = prompt_ids(model, args.prompt_tokens)
    quant = model.source.metadata.get("general.file_type", "?")
    print(f"machine: {machine()}")
    print(f"model: {path.name} (general.file_type {quant}), threads {args.threads}, meshpy kernels {_native.simd_level()}, commit {commit()}")
    print(f"prefill {len(ids)} tokens, decode {args.decode_tokens} tokens, median of {args.repeats} alternating rounds")

    ours_engine = MeshpyEngine(model)
    ours_engine.round(ids, 2)  # warm-up (first touch of scratch memory), and the peak RSS of a round
    rss = peak_rss()
    ref_engine = None
    if importlib.util.find_spec("llama_cpp") is not None:
        ref_engine = LlamaCppEngine(path, args.threads, len(ids) + args.decode_tokens + 8, len(ids))
        ref_engine.round(ids, 2)
    # Rounds alternate between the engines: on a shared machine the bandwidth drifts by tens
    # of percent over minutes, and alternation gives both the same conditions.
    rounds: dict[str, list[tuple[float, float]]] = {"meshpy": [], "llama.cpp": []}
    for _ in range(args.repeats):
        rounds["meshpy"].append(ours_engine.round(ids, args.decode_tokens))
        if ref_engine is not None:
            rounds["llama.cpp"].append(ref_engine.round(ids, args.decode_tokens))

    def speeds(name: str) -> tuple[float, float]:
        prefill, decode = zip(*rounds[name])
        return len(ids) / statistics.median(prefill), 1.0 / statistics.median(decode)

    ours = speeds("meshpy")
    ref = speeds("llama.cpp") if ref_engine is not None else None
    del model, ours_engine, ref_engine
    gc.collect()
    report(args, path, ours, ref, rss)
    return 0


def measure_one(args: argparse.Namespace, path: Path) -> int:
    """`--engine`: load one engine, time it, print its speeds and peak RSS as one JSON line."""
    t0 = time.perf_counter()
    if args.engine == "meshpy":
        model = Model.load(path, threads=args.threads)
        engine: MeshpyEngine | LlamaCppEngine = MeshpyEngine(model)
        ids = prompt_ids(model, args.prompt_tokens)
    else:
        ids = json.loads(os.environ["BENCH_PROMPT_IDS"])
        engine = LlamaCppEngine(path, args.threads, len(ids) + args.decode_tokens + 8, len(ids))
    load = time.perf_counter() - t0
    engine.round(ids, 2)
    rounds = [engine.round(ids, args.decode_tokens) for _ in range(args.repeats)]
    prefill, decode = zip(*rounds)
    print("RESULT " + json.dumps({
        "prefill": len(ids) / statistics.median(prefill), "decode": 1.0 / statistics.median(decode),
        "rss": peak_rss(), "load_s": load, "ids": ids, "kernels": _native.simd_level(),
    }), flush=True)
    return 0


def separate(args: argparse.Namespace, path: Path) -> int:
    """`--separate`: meshpy, then llama.cpp on meshpy's prompt ids, each in a child process."""
    def child(engine: str, env: dict[str, str]) -> dict:
        argv = [sys.executable, __file__, "--model", str(path), "--threads", str(args.threads), "--engine", engine,
                "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
                "--repeats", str(args.repeats)]
        argv += ["--isa", args.isa] if args.isa and engine == "meshpy" else []
        argv += ["--llama-cpp", str(args.llama_cpp)] if args.llama_cpp and engine != "meshpy" else []
        out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{engine} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return json.loads(line.removeprefix("RESULT "))

    ours = child("meshpy", {})
    print(f"machine: {machine()}")
    print(f"model: {path.name}, threads {args.threads}, meshpy kernels {ours['kernels']}, commit {commit()}")
    print(f"prefill {len(ours['ids'])} tokens, decode {args.decode_tokens} tokens, median of {args.repeats} rounds, "
          f"each engine in its own process (meshpy loaded in {ours['load_s']:.0f} s)")
    ref = child("llama.cpp", {"BENCH_PROMPT_IDS": json.dumps(ours["ids"])}) if importlib.util.find_spec("llama_cpp") else None
    if ref is not None:
        print(f"llama.cpp loaded in {ref['load_s']:.0f} s; its peak RSS {ref['rss'] / 2**20:.0f} MiB (mmap: page cache pages it touched)")
    report(args, path, (ours["prefill"], ours["decode"]), None if ref is None else (ref["prefill"], ref["decode"]), ours["rss"])
    return 0


def report(args: argparse.Namespace, path: Path, ours: tuple[float, float], ref: tuple[float, float] | None, rss: int) -> None:
    """The table: each engine's speeds, their ratio, the bandwidth bound, meshpy's peak RSS."""
    bandwidth = _native.ThreadPool(args.threads).read_bandwidth(args.bandwidth_bytes)
    per_token = decode_bytes_per_token(path)

    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode ms/tok':>14} {'share of bandwidth':>19}")
    share = lambda tps: f"{tps * per_token / bandwidth:18.0%}" if per_token else f"{'?':>18}"  # noqa: E731
    print(f"{'meshpy':10} {ours[0]:14.1f} {ours[1]:13.1f} {1000 / ours[1]:14.2f} {share(ours[1])}")
    if ref is None:
        print("llama.cpp  not installed (pip install llama-cpp-python, built from source): no yardstick")
    else:
        print(f"{'llama.cpp':10} {ref[0]:14.1f} {ref[1]:13.1f} {1000 / ref[1]:14.2f} {share(ref[1])}")
        print(f"{'ratio':10} {ours[0] / ref[0]:13.2f}x {ours[1] / ref[1]:12.2f}x")
    if per_token:
        print(f"weights read per decoded token: {per_token / 1e6:.1f} MB; "
              f"read bandwidth ({args.threads} threads, {args.bandwidth_bytes >> 20} MiB buffer): {bandwidth / 1e9:.1f} GB/s, "
              f"so at most {bandwidth / per_token:.1f} tok/s")
    print(f"meshpy peak RSS: {rss / 2**20:.0f} MiB (weights in the file: {path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
