"""Decode and prefill speed of meshpy against llama.cpp, same GGUF, same threads, one run.

    python benches/bench_generate.py [--model smollm2] [--threads 2] [--prompt-tokens 512]

Prints tokens/s and ms/token for meshpy and for llama.cpp (`llama-cpp-python`, when
installed; build it from source with CMAKE_ARGS="-DGGML_NATIVE=ON"), and their ratio,
with the machine, model, quantization, threads and commit. Timings are the median of
several repeats; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.fixtures (the benchmark text)

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


def bench_meshpy(model: Model, ids: list[int], n_decode: int, repeats: int) -> tuple[float, float]:
    prefill, decode = [], []
    for _ in range(repeats):
        session = model.new_session()
        t0 = time.perf_counter()
        logits = model.prefill(session, ids)
        prefill.append(time.perf_counter() - t0)
        token = int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(model.step(session, token)))
        decode.append((time.perf_counter() - t0) / n_decode)
    return len(ids) / statistics.median(prefill), 1.0 / statistics.median(decode)


def bench_llama_cpp(path: Path, threads: int, ids: list[int], n_decode: int, repeats: int) -> tuple[float, float] | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=len(ids) + n_decode + 8, n_batch=len(ids), n_ubatch=len(ids),
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_token() -> int:
        # Without logits_all, llama-cpp-python keeps no copy of the logits: read the context's.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill.append(time.perf_counter() - t0)
        token = last_token()
        t0 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([token])
            token = last_token()
        decode.append((time.perf_counter() - t0) / n_decode)
    return len(ids) / statistics.median(prefill), 1.0 / statistics.median(decode)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help=f"a GGUF path or a packaged model ({', '.join(PACKAGED_MODELS)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    path = Path(args.model) if Path(args.model).exists() else resolve_packaged(args.model)
    model = Model.load(path, threads=args.threads)
    ids = prompt_ids(model, args.prompt_tokens)
    quant = model.source.metadata.get("general.file_type", "?")
    print(f"machine: {machine()}")
    print(f"model: {path.name} (general.file_type {quant}), threads {args.threads}, commit {commit()}")
    print(f"prefill {len(ids)} tokens, decode {args.decode_tokens} tokens, median of {args.repeats}")

    ours = bench_meshpy(model, ids, args.decode_tokens, args.repeats)
    ref = bench_llama_cpp(path, args.threads, ids, args.decode_tokens, args.repeats)
    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode ms/tok':>14}")
    print(f"{'meshpy':10} {ours[0]:14.1f} {ours[1]:13.1f} {1000 / ours[1]:14.2f}")
    if ref is None:
        print("llama.cpp  not installed (pip install llama-cpp-python, built from source): no yardstick")
        return 0
    print(f"{'llama.cpp':10} {ref[0]:14.1f} {ref[1]:13.1f} {1000 / ref[1]:14.2f}")
    print(f"{'ratio':10} {ours[0] / ref[0]:13.2f}x {ours[1] / ref[1]:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
