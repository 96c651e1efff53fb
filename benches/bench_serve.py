"""Aggregate streamed tokens/s through `meshpy serve` and the official openai client, with 1,
4, 8 and 16 concurrent greedy chat completions (a thread each), one process, one run. Each
stream asks its own question for up to `--max-tokens` tokens; the figure is all streams'
streamed chunks (one per token) over the wall time. The server runs in its own process
with `--threads` compute threads.

    python benches/bench_serve.py [--model smollm2] [--threads 2] [--streams 1 4 8 16] [--max-tokens 64]

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402


def start_server(model: str, threads: int) -> tuple[subprocess.Popen[str], str]:
    """`meshpy serve` on a free port; the process and its base URL, once it listens."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpy", "serve", "--model", model, "--port", "0", "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        found = re.search(r"http://[\d.]+:\d+", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, found.group(0)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("meshpy serve did not report its address")


def run_streams(client: OpenAI, model: str, n: int, max_tokens: int) -> float:
    """Streamed tokens per second of `n` concurrent chat completions."""
    counts = [0] * n

    def stream(i: int) -> None:
        chunks = client.chat.completions.create(
            model=model, stream=True, temperature=0, max_tokens=max_tokens,
            messages=[{"role": "user", "content": f"Tell me a story about the number {i + 7}."}],
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                counts[i] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    proc, url = start_server(args.model, args.threads)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        name = client.models.list().data[0].id
        print(f"machine: {machine()}; commit {commit()}; model {name}; server threads {args.threads}; "
              f"{args.max_tokens} streamed tokens per request")
        run_streams(client, name, 1, 8)  # warm-up
        base = None
        for n in args.streams:
            rate = run_streams(client, name, n, args.max_tokens)
            base = base or rate
            print(f"{n:>3} stream{'s' if n > 1 else ' '}: {rate:7.1f} tok/s aggregate ({rate / base:.1f}x one stream)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
