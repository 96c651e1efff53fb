"""KV cache memory and decode speed at long contexts on a Gemma-3-like model whose
sliding-window layers keep only their window.

    python benches/bench_kv_window.py [--contexts 1024,4096] [--threads 2] [--quantize Q8_0]
    python benches/bench_kv_window.py --model gemma3-270m    # the packaged Q4_K_M GGUF

Without --model, builds (once, cached under --dir) a random Gemma 3 checkpoint with the 270M's layer shapes
(18 layers, 5 of every 6 sliding over 512 positions, hidden 640, 4 heads, 1 KV head of 256,
MLP 2048) but a 512-token vocabulary, with transformers. For each context it prefills that
many positions, then decodes: prints the session's KV bytes allocated and held (all layers),
what a cache keeping every position would hold, and decode ms/token at that context, with
the machine, threads and commit. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.fixtures and benches

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import Model  # noqa: E402

GEMMA_270M_LIKE = {
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "vocab_size": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def build(out_dir: Path) -> Path:
    """The random checkpoint (transformers' initialisation, seed 0) with a tiny tokenizer."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    import transformers

    from tests.fixtures import tiny_llama

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**GEMMA_270M_LIKE)
    model = transformers.Gemma3ForCausalLM(cfg).float().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tiny_llama.write_tokenizer(out_dir)
    return out_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/meshpy-bench-gemma3-270m-like"))
    ap.add_argument("--contexts", default="1024,4096", help="comma-separated positions before decoding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="Q8_0", help="Q8_0, Q4_0 or none (f32)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--model", help="a real model (path or packaged name) instead of the random one; --quantize is ignored")
    args = ap.parse_args()

    if args.model:
        model = Model.load(args.model, threads=args.threads)
        what, weights = str(model.source.path.name), "as stored"
    else:
        model = Model.load(build(args.dir), threads=args.threads, quantize=None if args.quantize == "none" else args.quantize)
        what, weights = "Gemma-3-270M-like random", args.quantize
    cfg = model.config
    per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * {"f32": 4, "f16": 2}[model.pipeline.spans[0].kv_dtype]
    print(f"machine: {machine()}")
    print(f"model: {what} ({cfg.n_layers} layers, {sum(cfg.layer_sliding)} sliding over "
          f"{cfg.sliding_window}), weights {weights}, {model.pipeline.spans[0].kv_dtype} KV cache, threads {args.threads}, "
          f"commit {commit()}")
    print(f"{'context':>8} {'KV allocated MiB':>17} {'KV held MiB':>12} {'all positions MiB':>18} {'decode ms/tok':>14}")
    rng = np.random.default_rng(0)
    for n in (int(c) for c in args.contexts.split(",")):
        session = model.new_session()
        ids = [int(i) for i in rng.integers(3, cfg.vocab_size, size=n)]
        token = int(np.argmax(model.prefill(session, ids)))
        times = []
        for _ in range(args.decode_tokens):
            t0 = time.perf_counter()
            token = int(np.argmax(model.step(session, token)))
            times.append(time.perf_counter() - t0)
        positions = n + args.decode_tokens
        allocated = sum(c.nbytes for c in session.caches)
        held = sum(getattr(c, "held_bytes", c.len * c.bytes_per_position) for c in session.caches)
        mib = 1 << 20
        print(f"{positions:8d} {allocated / mib:17.1f} {held / mib:12.1f} {positions * per_position / mib:18.1f} "
              f"{1000 * statistics.median(times):14.2f}")
        model.close_session(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
