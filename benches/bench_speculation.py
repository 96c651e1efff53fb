"""Speculative decoding by prompt lookup in one process (issue 19): meshpy with and without
drafts beside llama.cpp plain and with llama-cpp-python's `LlamaPromptLookupDecoding`, same
GGUF, same threads, same machine, engines alternating round by round.

    python benches/bench_speculation.py [--model smollm2] [--threads 2] [--max-tokens 128]
                                        [--repeats 3] [--draft 10] [--no-llama-cpp]

Two raw prompts (no chat template): "quoting", a passage followed by an instruction to
repeat it and its first words, so the continuation quotes text already in the context
(where prompt lookup hits), and "free", an open story (where it mostly misses). Each figure
is generated tokens over the whole call (prefill included, as a user waits for it), greedy,
up to `--max-tokens` tokens, best of `--repeats` rounds after a warm-up; meshpy also reports
drafted and kept tokens and tokens per verification pass. Outputs are compared: meshpy's
tokens with and without drafts must be identical. llama.cpp's `--draft` is its
`num_pred_tokens` (its default 10). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import GenerationStats, Model, model_path  # noqa: E402

PASSAGE = (
    "The lighthouse stood on a spit of black rock a mile from the harbour. Its keeper, an old man named "
    "Tobias Wren, climbed the one hundred and twelve steps every evening at dusk, lit the lamp, wiped the "
    "salt from the great lens, and wrote three lines in his log: the wind, the state of the sea, and the "
    "ships he had seen. In forty years he had missed only one night, the winter his daughter was born, "
    "when his brother rowed out through the storm to keep the light for him. The log books filled a whole "
    "wall of the kitchen, and on long evenings he read them aloud to the gulls that gathered on the sill, "
    "as if they might remember the ships better than he could."
)
PROMPTS = {
    "quoting": f"{PASSAGE}\n\nThe passage above, copied out word for word:\n\nThe lighthouse stood on a spit",
    "free": "Once upon a time, in a village at the edge of a great forest, there lived a girl who",
}


class MeshpyRun:
    def __init__(self, path: Path, threads: int) -> None:
        self.model = Model.load(path, threads=threads)
        self.model.keep_prompts(0)  # each round prefills its prompt, as llama.cpp's (reset) does

    def run(self, prompt: str, n: int, speculate: bool) -> tuple[float, list[int], GenerationStats]:
        ids = self.model.encode(prompt, raw=True)
        self.model.speculation = speculate
        stats = GenerationStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        out = list(self.model.generate_ids(ids, n, stats=stats))
        return time.perf_counter() - t0, out, stats


class LlamaCppRun:
    def __init__(self, path: Path, threads: int, draft: int | None) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=draft) if draft else None,
        )

    def run(self, prompt: str, n: int) -> tuple[float, int]:
        self.llm.reset()
        t0 = time.perf_counter()
        out = self.llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
        return time.perf_counter() - t0, int(out["usage"]["completion_tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft", type=int, default=10, help="llama.cpp's num_pred_tokens")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    path = model_path(args.model)
    meshpy = MeshpyRun(path, args.threads)
    llama = None
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        llama = {"plain": LlamaCppRun(path, args.threads, None), "lookup": LlamaCppRun(path, args.threads, args.draft)}
    print(f"machine: {machine()}; commit {commit()}; model {path.name}; {args.threads} threads; "
          f"greedy, up to {args.max_tokens} tokens, whole calls (prefill included), best of {args.repeats}")
    for name, prompt in PROMPTS.items():
        n_prompt = len(meshpy.model.encode(prompt, raw=True))
        best: dict[str, tuple[float, int]] = {}
        spec_stats = GenerationStats()
        tokens: dict[bool, list[int]] = {}
        for r in range(args.repeats + 1):  # round 0 warms up
            for speculate in (False, True):
                seconds, out, stats = meshpy.run(prompt, args.max_tokens, speculate)
                tokens[speculate] = out
                key = "meshpy lookup" if speculate else "meshpy plain"
                if r and (key not in best or seconds < best[key][0]):
                    best[key] = (seconds, len(out))
                    if speculate:
                        spec_stats = stats
            for key, engine in (llama or {}).items():
                seconds, n = engine.run(prompt, args.max_tokens)
                key = f"llama.cpp {key}"
                if r and (key not in best or seconds < best[key][0]):
                    best[key] = (seconds, n)
        same = "identical" if tokens[True] == tokens[False] else "DIFFERENT"
        print(f"{name} prompt ({n_prompt} tokens); meshpy's tokens with and without drafts: {same}")
        rate = {k: n / s for k, (s, n) in best.items()}
        for key, (s, n) in best.items():
            print(f"  {key:<18} {rate[key]:7.1f} tok/s ({n} tokens in {s * 1e3:.0f} ms)")
        s = spec_stats
        passes = max(s.decode_steps - s.accepted_draft_tokens, 1)
        print(f"  meshpy drafts: {s.draft_tokens} drafted, {s.accepted_draft_tokens} kept; "
              f"{s.decode_steps / passes:.2f} tokens per decode pass")
        print(f"  meshpy lookup / meshpy plain: {rate['meshpy lookup'] / rate['meshpy plain']:.2f}x", end="")
        if llama:
            print(f"; / llama.cpp lookup: {rate['meshpy lookup'] / rate['llama.cpp lookup']:.2f}x; "
                  f"/ llama.cpp plain: {rate['meshpy lookup'] / rate['llama.cpp plain']:.2f}x", end="")
        print()


if __name__ == "__main__":
    main()
