"""Concurrent streams through `meshpy serve` and the official openai client: aggregate
streamed tokens/s with 1, 4, 8 and 16 concurrent greedy chat completions (a thread each), in
one process or through a mesh of workers on loopback; and, with `--long-prompt N`, how the
other streams fare while an N-token prompt arrives mid-stream (chunked prefill).

    python benches/bench_serve.py [--model smollm2] [--threads 2] [--workers 0] [--streams 1 4 8 16]
                                  [--max-tokens 64] [--long-prompt 1500] [--no-speculate]

`--workers 0` serves the model in one process with `--threads` compute threads. `--workers N`
starts a bootstrap node and N workers (a layer range each, one thread each) and serves
through them with one thread (so three processes share this machine's cores).

Throughput: each stream asks its own question for up to `--max-tokens` tokens. "Aggregate" is
all streams' streamed chunks (one per token) over the wall time from the first request to the
last chunk, so it includes every prompt's prefill, the HTTP round trips and the streams
starting and ending at different times; "all decoding" counts the chunks that arrive while
every stream decodes (from the last stream's first chunk to the first stream's last).

One request (one process only): the same chat request in this process (as `meshpy generate`
runs it) and through the server, alone: time to first token beside the prefill time, and
time per token.

Long prompt: 8 streams with mixed lengths (32 to 144 tokens) decode; once each has 8 chunks
a completion with an N-token prompt (token ids) is sent. For each stream: its median gap
between chunks, and its largest gap while the long prompt prefilled (until its first chunk).

The server drafts tokens by prompt lookup (speculative decoding) as it does by default;
`--no-speculate` turns that off, so the figures show batching alone (a reply that repeats
itself makes one stream several times faster with drafts, which shrinks the ratios).

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import model_path  # noqa: E402
from meshpy.mesh.launcher import LocalMesh, _die_with_parent  # noqa: E402
from meshpy.mesh.placement import format_layers  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.pipeline import split_layers  # noqa: E402


def start_server(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """`meshpy serve ARGS` on a free port; the process and its base URL, once it listens."""
    env = dict(env or os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpy", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        found = re.search(r"http://[\d.]+:\d+", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, found.group(0)
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError("meshpy serve did not report its address")


def stream_chat(client: OpenAI, model: str, i: int, max_tokens: int, times: list[float]) -> None:
    """One streamed greedy chat completion; appends each content chunk's arrival time."""
    chunks = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": f"Tell me a story about the number {i + 7}."}],
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())


def run_streams(client: OpenAI, model: str, n: int, max_tokens: int) -> tuple[float, float]:
    """Streamed tokens per second of `n` concurrent chat completions: over the whole run, and
    while all `n` decode (chunks between the last stream's first chunk and the first
    stream's last one; 0 when no such time exists)."""
    times: list[list[float]] = [[] for _ in range(n)]
    threads = [threading.Thread(target=stream_chat, args=(client, model, i, max_tokens, times[i])) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = max(t[-1] for t in times if t)
    start, end = max(t[0] for t in times if t), min(t[-1] for t in times if t)
    together = sum(start < x <= end for t in times for x in t)
    return sum(len(t) for t in times) / (last - t0), together / (end - start) if end > start else 0.0


def single_request(client: OpenAI, model: str, path: Path, threads: int, max_tokens: int, speculate: bool) -> None:
    """One stream through the server beside the same request in this process (what `meshpy
    generate` runs): time to first token against prefill time, and time per token."""
    from meshpy.generation import Model

    question = "Tell me a story about the number 7."
    with Model.load(path, threads=threads) as local:
        local.speculation = speculate
        local.keep_prompts(0)  # the timed run prefills its prompt, as the server's does
        local.generate(question, max_tokens=8)  # warm-up
        done = local.generate(question, max_tokens=max_tokens)
    stats = done.stats
    t0 = time.perf_counter()
    times: list[float] = []
    stream_chat(client, model, 0, max_tokens, times)
    ttft = times[0] - t0
    served = (len(times) - 1) / (times[-1] - times[0])
    print(f"  one request: in process prefill {stats.prefill_seconds * 1e3:.1f} ms, "
          f"{stats.decode_tokens_per_second:.1f} tok/s decode; through the server first token after "
          f"{ttft * 1e3:.1f} ms (+{(ttft - stats.prefill_seconds) * 1e3:.1f}), {served:.1f} tok/s "
          f"({served / stats.decode_tokens_per_second:.2f}x)")


def long_prompt_run(client: OpenAI, model: str, n_prompt: int, vocab: int) -> None:
    """Eight mixed-length streams; an `n_prompt`-token completion arrives mid-stream."""
    lengths = [32, 48, 64, 80, 96, 112, 128, 144]
    times: list[list[float]] = [[] for _ in lengths]
    threads = [threading.Thread(target=stream_chat, args=(client, model, i, n, times[i])) for i, n in enumerate(lengths)]
    for t in threads:
        t.start()
    while min(len(t) for t in times) < 8:
        time.sleep(0.001)
    prompt = [1000 + (7 * i) % (vocab - 2000) for i in range(n_prompt)]
    sent = time.perf_counter()
    first: list[float] = []
    chunks = client.completions.create(model=model, prompt=prompt, stream=True, temperature=0, max_tokens=8)
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].text and not first:
            first.append(time.perf_counter())
    for t in threads:
        t.join()
    print(f"  {n_prompt}-token prompt sent while 8 streams decode: first token after {first[0] - sent:.2f} s")
    worst = 0.0
    for n, ts in zip(lengths, times):
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        during = [b - a for a, b in zip(ts, ts[1:]) if b > sent and a < first[0]]
        med = statistics.median(gaps)
        peak = max(during, default=0.0)
        worst = max(worst, peak / med)
        print(f"    stream of {n:>3} tokens: median gap {med * 1e3:6.1f} ms, largest while it prefilled "
              f"{peak * 1e3:6.1f} ms ({peak / med:.1f}x)")
    print(f"  largest gap while the prompt prefilled / the stream's median: {worst:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="0: one process; N: a mesh of N workers")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=0, help="also run the long-prompt scenario")
    parser.add_argument("--no-speculate", action="store_true", help="serve without speculative decoding")
    args = parser.parse_args()
    extra = ["--no-speculate"] if args.no_speculate else []
    path = model_path(args.model)
    config = read_config(open_model_source(path))
    mesh = None
    try:
        if args.workers:
            mesh = LocalMesh()
            mesh.start_bootstrap()
            for layers in split_layers(config.n_layers, args.workers):
                mesh.add_worker(path, layers=format_layers(layers), threads=1, kv_budget="512MiB")
            proc, url = start_server(["--model", str(path), "--bootstrap", mesh.bootstrap_addr, "--threads", "1",
                                      "--prompt-cache", "0", *extra],
                                     mesh.env)
            where = f"mesh of {args.workers} workers (1 thread each), End node 1 thread"
        else:
            proc, url = start_server(["--model", str(path), "--threads", str(args.threads), "--prompt-cache", "0", *extra])
            where = f"one process, {args.threads} threads"
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
            name = client.models.list().data[0].id
            print(f"machine: {machine()}; commit {commit()}; model {name}; {where}; "
                  f"{args.max_tokens} streamed tokens per request; speculation {'off' if extra else 'on'}")
            run_streams(client, name, 1, 8)  # warm-up
            if not args.workers:
                single_request(client, name, path, args.threads, args.max_tokens, not args.no_speculate)
            base = None
            for n in args.streams:
                whole, decode = run_streams(client, name, n, args.max_tokens)
                base = base or (whole, decode)
                together = (f"{decode:7.1f} tok/s ({decode / base[1]:.1f}x)" if decode and base[1]
                            else "    n/a (the first stream ended before the last began)")
                print(f"{n:>3} stream{'s' if n > 1 else ' '}: {whole:7.1f} tok/s aggregate ({whole / base[0]:.1f}x one "
                      f"stream), all decoding {together}")
            if args.long_prompt:
                long_prompt_run(client, name, args.long_prompt, config.vocab_size)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        if mesh is not None:
            mesh.close()


if __name__ == "__main__":
    main()
