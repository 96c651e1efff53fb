"""Structured output's cost (issue 16, part 5): decode speed of greedy generations through the
scheduler (the server's path) without a constraint and under a JSON schema (llguidance's mask
applied to every row), beside llama.cpp's plain decode on the same GGUF and threads.

    python benches/bench_constraint.py [--model smollm2] [--threads 2] [--rounds 5] [--no-llama-cpp]

Unconstrained requests must not slow down: compare the first figure with this file run from a
worktree of an earlier commit (copy it into that tree's benches/; it then prints n/a for the
constrained line), alternating the two a few times.
Each figure is decoded tokens over decode seconds (after the first token), best of `--rounds`
after a warm-up; speculation is off so every step is one token. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import LlamaCppEngine, commit, machine  # noqa: E402
from meshpy.generation import GenerationStats, Model, model_path  # noqa: E402

PROMPT = "Describe three planets of the solar system in detail."
SCHEMA = {"type": "object", "properties": {"planets": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                                     "moons": {"type": "integer"}, "rings": {"type": "boolean"}},
    "required": ["name", "description", "moons", "rings"], "additionalProperties": False}}},
    "required": ["planets"], "additionalProperties": False}
N_TOKENS = 128


def decode_rate(model: Model, ids: list[int], constraint: object, rounds: int) -> tuple[float, int]:
    """Best decoded tokens/s over `rounds` (after a warm-up), and the tokens of the last."""
    best, n = 0.0, 0
    for _ in range(rounds + 1):
        stats = GenerationStats(prompt_tokens=len(ids))
        kwargs = {"constraint": constraint} if constraint is not None else {}
        n = len(list(model.generate_ids(ids, N_TOKENS, stats=stats, **kwargs)))
        best = max(best, stats.decode_tokens_per_second)
    return best, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    path = model_path(args.model)
    print(f"structured output, {path.name}, {args.threads} threads; {machine()}; commit {commit()}")
    with Model.load(path, threads=args.threads) as model:
        model.speculation = False
        model.prompt_cache = None
        ids = model.encode([{"role": "user", "content": PROMPT}])
        rate, n = decode_rate(model, ids, None, args.rounds)
        print(f"meshpy, unconstrained      {rate:7.1f} tok/s  ({n} tokens)")
        if importlib.util.find_spec("meshpy.constraint") is not None:
            from meshpy.constraint import Grammar

            grammar = Grammar.from_json_schema(SCHEMA, model.tokenizer)
            rate_c, n = decode_rate(model, ids, grammar, args.rounds)
            print(f"meshpy, JSON schema        {rate_c:7.1f} tok/s  ({n} tokens; {rate_c / rate:.2f}x unconstrained)")
        else:
            print("meshpy, JSON schema            n/a  (this commit has no meshpy.constraint)")
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None and path.suffix == ".gguf":
        engine = LlamaCppEngine(path, args.threads, 2048, 512)
        engine.round(ids, 16)
        per_token = min(engine.round(ids, N_TOKENS)[1] for _ in range(args.rounds))
        print(f"llama.cpp, unconstrained   {1 / per_token:7.1f} tok/s")


if __name__ == "__main__":
    main()
