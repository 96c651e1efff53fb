"""Prompt caching (issue 16, part 6): time to first token of a chat request whose ~1,000-token
system prompt a previous request already sent, against the same request with nothing cached,
in one process and on a 2-worker mesh on this machine; llama.cpp beside it (it reuses the
prefix its last call evaluated, which is the same case for one user).

    python benches/bench_prompt_cache.py [--model smollm2] [--threads 2] [--rounds 3]
                                         [--no-mesh] [--no-llama-cpp]

Each round: the cache is emptied, question A is asked (cold: the whole prompt prefilled),
then question B with the same system prompt (warm: only what follows the system prompt is
prefilled). Time to first token is from the call to the first generated token, greedy, after a
warm-up; the median over rounds is printed, with the ratio cold / warm. The mesh: a bootstrap
node and two worker processes (layers 0-14 and 15-29, one thread each) and the End node (one
thread), all on this machine. Replies are compared with an uncached run: they must be equal.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import GenerationStats, Model, model_path  # noqa: E402

SYSTEM = "You are a careful assistant for a hardware shop. " + " ".join(
    f"Rule {i}: when asked about item {i}, answer in one short sentence and mention its shelf {i % 7}." for i in range(40))
QUESTIONS = ("What is on shelf 3?", "Do you sell hammers?")
#: Tokens generated per request: the first is what is timed.
REPLY_TOKENS = 8


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def first_token_seconds(model: Model, question: str) -> tuple[float, list[int], int]:
    """Seconds to the first token of a greedy reply, the reply's tokens, and the prompt tokens
    that were cached."""
    ids = model.encode(chat(question))
    stats = GenerationStats(prompt_tokens=len(ids))
    t0 = time.perf_counter()
    gen = model.generate_ids(ids, REPLY_TOKENS, stats=stats)
    first = next(gen)
    elapsed = time.perf_counter() - t0
    return elapsed, [first, *gen], stats.cached_tokens


def measure(name: str, model: Model, rounds: int) -> None:
    assert model.prompt_cache is not None, "this model caches no prompts"
    cache = model.prompt_cache
    model.prompt_cache = None
    expected = [first_token_seconds(model, q)[1] for q in QUESTIONS]  # uncached replies (and a warm-up)
    model.prompt_cache = cache
    cold, warm, cached = [], [], 0
    for _ in range(rounds):
        cache.clear()
        t_a, out_a, _ = first_token_seconds(model, QUESTIONS[0])
        t_b, out_b, cached = first_token_seconds(model, QUESTIONS[1])
        if [out_a, out_b] != expected:
            raise SystemExit(f"{name}: cached replies differ from uncached ones")
        cold.append(t_a)
        warm.append(t_b)
    n_prompt = len(model.encode(chat(QUESTIONS[1])))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{name:<26} prompt {n_prompt} tokens ({cached} cached)  first token: cold {c * 1000:7.1f} ms, "
          f"warm {w * 1000:6.1f} ms  -> {c / w:5.1f}x sooner")


def llama_cpp(path: Path, threads: int, rounds: int, encode: Callable[[str], list[int]]) -> None:
    import llama_cpp as lc

    llm = lc.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def first(question: str) -> float:
        t0 = time.perf_counter()
        for _ in llm.generate(encode(question), temp=0.0, top_k=1):
            return time.perf_counter() - t0
        raise RuntimeError("no token")

    llm.reset()
    first(QUESTIONS[0])  # warm-up
    cold, warm = [], []
    for _ in range(rounds):
        llm.reset()
        cold.append(first(QUESTIONS[0]))
        warm.append(first(QUESTIONS[1]))  # reuses the evaluated prefix (the system prompt)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{'llama.cpp (prefix reuse)':<26} {'':<24} first token: cold {c * 1000:7.1f} ms, "
          f"warm {w * 1000:6.1f} ms  -> {c / w:5.1f}x sooner")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-mesh", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    path = model_path(args.model)
    print(f"prompt caching, {path.name}; {machine()}; commit {commit()}")
    with Model.load(path, threads=args.threads) as model:
        measure(f"one process ({args.threads} threads)", model, args.rounds)
        encode = lambda q: model.encode(chat(q))  # noqa: E731
        if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None and path.suffix == ".gguf":
            llama_cpp(path, args.threads, args.rounds, encode)
    if not args.no_mesh:
        from meshpy.mesh import connect
        from meshpy.mesh.launcher import LocalMesh

        with LocalMesh(transport="tcp") as mesh:
            mesh.start_bootstrap()
            with Model.load(path, threads=1) as probe:
                half = probe.config.n_layers // 2
                last = probe.config.n_layers - 1
            mesh.add_worker(path, layers=f"0-{half - 1}", threads=1)
            mesh.add_worker(path, layers=f"{half}-{last}", threads=1)
            with connect(path, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
                measure("2-worker mesh (TCP)", model, args.rounds)


if __name__ == "__main__":
    main()
