"""A random-weight llama GGUF of realistic shape, for benchmarks at sizes that need a mesh.

    PYTHONPATH=python python benches/make_gguf.py --out /work/models/llama8b-q4_k.gguf [--type Q4_K] [--seed 0]
    PYTHONPATH=python python benches/make_gguf.py --layers 2 --hidden 512 --ffn 1536 --heads 8 --kv-heads 2 --out /tmp/tiny.gguf
    python benches/make_gguf.py --type Q3_K --check   # dequantize a few rows per tensor kind, write nothing
    ... --dequantized   # the same weights (same --seed) as F32, dequantized by gguf-py: a reference
    ... --qwen3-30b-a3b --out /work/models/qwen3moe-q4_k.gguf [--layers 48]   # a mixture of experts

Shapes default to Llama-3-8B's (32 layers, hidden 4096, FFN 14336, 32 heads, 8 KV heads).
`--experts N` writes a `qwen3moe` file instead: per layer a router (`ffn_gate_inp`, F32, as
llama.cpp's quantizer leaves it), q/k norms, and N experts of width `--expert-ffn` stacked in
`ffn_{gate,up,down}_exps` (`[N, rows, cols]`, as llama.cpp's converter writes them), each token
using `--experts-used`; `--qwen3-30b-a3b` sets Qwen3-30B-A3B's shapes (48 layers, hidden 2048,
32 heads of 128, 4 KV heads, 128 experts of 768, 8 used).

The vocabulary and every `tokenizer.*` key come from the packaged SmolLM2 GGUF (49152
tokens), so llama.cpp and meshpy load the file and tokenize text; meshpy finds that GGUF,
so it must import unless `--vocab-from` names one. Layer matrices use `--type`, the
embedding `--embed-type`, the separate (untied) head `--head-type`; norms are F32 ones plus
small noise. Quant blocks hold random bytes with their f16 scales set so that the
dequantized weights have std `--std` and mean about zero. One tensor is held in memory at a
time: tensor infos are declared up front and each tensor's bytes are streamed as made.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import IQ4_NL, dequantize

ROPE_THETA = 500000.0
RMS_EPS = 1e-5
NORM_NOISE = 0.01  # std of the noise on the norm weights around 1
KVALUES = np.array(IQ4_NL.kvalues, dtype=np.float64)  # IQ4_NL/IQ4_XS codebook (ggml-common.h)


def random_blocks(rng: np.random.Generator, n: int, fields: list[tuple]) -> np.ndarray:
    """`n` blocks of random bytes, viewed through the block struct `fields` (ggml-common.h order)."""
    dtype = np.dtype(fields)
    words = -(-n * dtype.itemsize // 8)
    return rng.bit_generator.random_raw(words).view(np.uint8)[: n * dtype.itemsize].view(dtype)


def rms(values: np.ndarray) -> float:
    """Root mean square over all entries: the std of a zero-mean uniform pick among them."""
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))


def min_quant_rms(scale_bits: int, q_bits: int) -> float:
    """RMS of s*q - c*m (s, m, q uniform unsigned, c = mean q, so dmin = c*d centres the blocks)."""
    s, q = np.arange(2**scale_bits), np.arange(2**q_bits)
    return rms(np.subtract.outer(np.multiply.outer(s, q), q.mean() * s))


def random_sign(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """`scale` with a random sign per block: cancels the -d/2 bias of offset codes like q - 8."""
    return np.where(rng.integers(0, 2, n, dtype=np.uint8) == 1, scale, -scale)


# One generator per block type: (rng, number of blocks, target std) -> structured blocks.
# Each comment gives the dequantization the scale is solved from.


def gen_f32(rng, n, std):
    return (std * rng.standard_normal(n, dtype=np.float32)).view(np.uint8)


def gen_f16(rng, n, std):
    return (std * rng.standard_normal(n, dtype=np.float32)).astype(np.float16).view(np.uint8)


def gen_q4_0(rng, n, std):  # x = d * (q - 8), q 4-bit
    b = random_blocks(rng, n, [("d", "<f2"), ("qs", "u1", 16)])
    b["d"] = random_sign(rng, n, std / rms(np.arange(16) - 8))
    return b


def gen_q4_1(rng, n, std):  # x = d * q + m, q 4-bit
    b = random_blocks(rng, n, [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    d = std / rms(np.arange(16) - 7.5)
    b["d"], b["m"] = d, -7.5 * d
    return b


def gen_q5_0(rng, n, std):  # x = d * (q - 16), q 5-bit (4 in qs, 1 in qh)
    b = random_blocks(rng, n, [("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
    b["d"] = random_sign(rng, n, std / rms(np.arange(32) - 16))
    return b


def gen_q5_1(rng, n, std):  # x = d * q + m, q 5-bit
    b = random_blocks(rng, n, [("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
    d = std / rms(np.arange(32) - 15.5)
    b["d"], b["m"] = d, -15.5 * d
    return b


def gen_q8_0(rng, n, std):  # x = d * q, q int8
    b = random_blocks(rng, n, [("d", "<f2"), ("qs", "i1", 32)])
    b["d"] = random_sign(rng, n, std / rms(np.arange(-128, 128)))
    return b


def gen_q2_k(rng, n, std):  # x = d * s * q - dmin * m, s and m 4-bit per 16 values, q 2-bit
    b = random_blocks(rng, n, [("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")])
    d = std / min_quant_rms(4, 2)
    b["d"], b["dmin"] = d, 1.5 * d
    return b


def gen_q3_k(rng, n, std):  # x = d * (s - 32) * q, s 6-bit per 16 values (packed in 12 bytes), q in -4..3
    b = random_blocks(rng, n, [("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])
    b["d"] = std / (rms(np.arange(64) - 32) * rms(np.arange(-4, 4)))
    return b


def gen_q4_k(rng, n, std):  # x = d * s * q - dmin * m, s and m 6-bit per 32 values (12 bytes), q 4-bit
    b = random_blocks(rng, n, [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
    d = std / min_quant_rms(6, 4)
    b["d"], b["dmin"] = d, 7.5 * d
    return b


def gen_q5_k(rng, n, std):  # as Q4_K with q 5-bit (high bits in qh)
    b = random_blocks(rng, n, [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)])
    d = std / min_quant_rms(6, 5)
    b["d"], b["dmin"] = d, 15.5 * d
    return b


def gen_q6_k(rng, n, std):  # x = d * s * (q - 32), s int8 per 16 values, q 6-bit (ql + qh)
    b = random_blocks(rng, n, [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
    b["d"] = std / (rms(np.arange(-128, 128)) * rms(np.arange(64) - 32))
    return b


def gen_iq4_nl(rng, n, std):  # x = d * K[q], q 4-bit index into the codebook K
    b = random_blocks(rng, n, [("d", "<f2"), ("qs", "u1", 16)])
    b["d"] = random_sign(rng, n, std / rms(KVALUES))
    return b


def gen_iq4_xs(rng, n, std):  # x = d * (s - 32) * K[q], s 6-bit per 32 values (scales_l + scales_h)
    b = random_blocks(rng, n, [("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", 4), ("qs", "u1", 128)])
    b["d"] = std / (rms(np.arange(64) - 32) * rms(KVALUES))
    return b


#: Type name -> (block generator, general.file_type of a file whose layers use it).
TYPES = {
    "F32": (gen_f32, LlamaFileType.ALL_F32),
    "F16": (gen_f16, LlamaFileType.MOSTLY_F16),
    "Q4_0": (gen_q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (gen_q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (gen_q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (gen_q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q8_0": (gen_q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q2_K": (gen_q2_k, LlamaFileType.MOSTLY_Q2_K),
    "Q3_K": (gen_q3_k, LlamaFileType.MOSTLY_Q3_K_M),
    "Q4_K": (gen_q4_k, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K": (gen_q5_k, LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": (gen_q6_k, LlamaFileType.MOSTLY_Q6_K),
    "IQ4_NL": (gen_iq4_nl, LlamaFileType.MOSTLY_IQ4_NL),
    "IQ4_XS": (gen_iq4_xs, LlamaFileType.MOSTLY_IQ4_XS),
}


def plan(args: argparse.Namespace, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape as (rows, columns), type) of every tensor, as llama.cpp's converter names them."""
    head_dim = args.head_dim or args.hidden // args.heads
    h, kv = args.hidden, args.kv_heads * head_dim
    tensors = [("token_embd.weight", (vocab, h), args.embed_type)]
    for i in range(args.layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (h,), "F32"),
            (f"blk.{i}.attn_q.weight", (args.heads * head_dim, h), args.type),
            (f"blk.{i}.attn_k.weight", (kv, h), args.type),
            (f"blk.{i}.attn_v.weight", (kv, h), args.type),
            (f"blk.{i}.attn_output.weight", (h, args.heads * head_dim), args.type),
            (f"blk.{i}.ffn_norm.weight", (h,), "F32"),
        ]
        if args.experts:
            n, f = args.experts, args.expert_ffn
            tensors += [
                (f"blk.{i}.attn_q_norm.weight", (head_dim,), "F32"),
                (f"blk.{i}.attn_k_norm.weight", (head_dim,), "F32"),
                (f"blk.{i}.ffn_gate_inp.weight", (n, h), "F32"),
                (f"blk.{i}.ffn_gate_exps.weight", (n, f, h), args.type),
                (f"blk.{i}.ffn_up_exps.weight", (n, f, h), args.type),
                (f"blk.{i}.ffn_down_exps.weight", (n, h, f), args.type),
            ]
        else:
            tensors += [
                (f"blk.{i}.ffn_gate.weight", (args.ffn, h), args.type),
                (f"blk.{i}.ffn_up.weight", (args.ffn, h), args.type),
                (f"blk.{i}.ffn_down.weight", (h, args.ffn), args.type),
            ]
    return tensors + [("output_norm.weight", (h,), "F32"), ("output.weight", (vocab, h), args.head_type)]


def byte_shape(shape: tuple[int, ...], type_name: str) -> tuple[int, ...]:
    """(rows, bytes per row) of a tensor of `shape` (rows, columns) stored as `type_name`."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return (*shape[:-1], shape[-1] // block * size)


def tensor_bytes(rng: np.random.Generator, name: str, shape: tuple[int, ...], type_name: str, std: float) -> np.ndarray:
    """The tensor's raw GGUF bytes, shaped (rows, bytes per row)."""
    if name.endswith("norm.weight"):
        return (1 + NORM_NOISE * rng.standard_normal(shape, dtype=np.float32)).view(np.uint8)
    block = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
    data = TYPES[type_name][0](rng, math.prod(shape) // block, std).view(np.uint8)
    assert data.size == math.prod(byte_shape(shape, type_name)), f"{type_name} block struct has the wrong size"
    return data.reshape(byte_shape(shape, type_name))


def copy_tokenizer(writer: GGUFWriter, path: Path) -> int:
    """Copy every `tokenizer.*` key of `path` with its exact value type; return the vocabulary size."""
    reader = GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def check(args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Dequantize a few generated rows of each tensor kind and print their mean and std."""
    seen = set()
    for name, shape, type_name in plan(args, vocab=1):
        kind = re.sub(r"^blk\.\d+\.", "", name)
        if kind in seen:
            continue
        seen.add(kind)
        rows = (4, shape[-1]) if len(shape) == 2 else shape
        x = dequantize(tensor_bytes(rng, name, rows, type_name, args.std), GGMLQuantizationType[type_name])
        print(f"{kind:20s} {type_name:6s} mean {x.mean():+.5f}  std {x.std():.5f}  finite {bool(np.isfinite(x).all())}")


def write(args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Write the GGUF to `args.out`, streaming one tensor at a time, with progress per layer."""
    if args.vocab_from is None:
        from meshpy.models.packaged import resolve_packaged

        args.vocab_from = resolve_packaged("smollm2")
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(args.out, "qwen3moe" if args.experts else "llama")
    vocab = copy_tokenizer(writer, args.vocab_from)
    tensors = plan(args, vocab)
    n_params = sum(math.prod(shape) for _, shape, _ in tensors)
    label = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
    writer.add_name(f"random {'qwen3moe' if args.experts else 'llama'} {label}-shape {args.type}")
    writer.add_file_type(TYPES[args.type][1])
    writer.add_quantization_version(2)
    writer.add_vocab_size(vocab)
    writer.add_context_length(args.context)
    writer.add_embedding_length(args.hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    head_dim = args.head_dim or args.hidden // args.heads
    writer.add_rope_dimension_count(head_dim)
    if args.experts:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_expert_count(args.experts)
        writer.add_expert_used_count(args.experts_used)
        writer.add_expert_feed_forward_length(args.expert_ffn)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    for name, shape, type_name in tensors:  # every tensor info precedes the data: declare, then stream
        stored = "F32" if args.dequantized else type_name
        nbytes = math.prod(byte_shape(shape, stored))
        raw = GGMLQuantizationType[stored]
        writer.add_tensor_info(name, byte_shape(shape, stored), np.dtype(np.uint8), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    written = 0
    for name, shape, type_name in tensors:
        data = tensor_bytes(rng, name, shape, type_name, args.std)
        if args.dequantized:  # the same values as F32, by gguf-py's own dequantizer
            data = dequantize(data, GGMLQuantizationType[type_name]).astype(np.float32).view(np.uint8)
        writer.write_tensor_data(data)
        written += data.nbytes
        if re.search(r"ffn_down(_exps)?\.weight$", name) or not name.startswith("blk."):
            print(f"{name:24s} {written / 1e9:6.2f} GB  {time.perf_counter() - start:6.1f} s", flush=True)
    writer.close()
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {size / 1e9:.2f} GB ({size} bytes), {n_params / 1e9:.2f}B parameters, "
          f"{args.type} layers, {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--type", choices=TYPES, default="Q4_K", help="attention and FFN matrices")
    parser.add_argument("--embed-type", choices=TYPES, default="Q8_0")
    parser.add_argument("--head-type", choices=TYPES, default="Q8_0", help="output.weight (not tied)")
    parser.add_argument("--std", type=float, default=0.02, help="std of the dequantized weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-from", type=Path, help="GGUF to copy tokenizer.* from (default: packaged SmolLM2)")
    parser.add_argument("--out", type=Path, help="GGUF to write")
    parser.add_argument("--check", action="store_true", help="print mean/std of a few dequantized rows; write nothing")
    parser.add_argument("--dequantized", action="store_true", help="write the same model with every tensor dequantized to F32")
    parser.add_argument("--head-dim", type=int, help="width of a head (default: hidden / heads)")
    parser.add_argument("--experts", type=int, default=0, help="experts per layer: a qwen3moe file")
    parser.add_argument("--experts-used", type=int, default=8)
    parser.add_argument("--expert-ffn", type=int, default=768)
    parser.add_argument("--qwen3-30b-a3b", action="store_true", help="Qwen3-30B-A3B's shapes (other flags still apply after)")
    args = parser.parse_args()
    if args.qwen3_30b_a3b:
        shapes = dict(layers=48, hidden=2048, heads=32, head_dim=128, kv_heads=4, experts=128, experts_used=8, expert_ffn=768)
        given = {a.dest for a in parser._actions if any(opt in sys.argv for opt in a.option_strings)}
        for key, value in shapes.items():
            if key not in given:
                setattr(args, key, value)
    if (args.head_dim is None and args.hidden % args.heads) or args.heads % args.kv_heads:
        parser.error("--hidden must be a multiple of --heads (or give --head-dim), and --heads of --kv-heads")
    for name, shape, type_name in plan(args, vocab=1):
        if shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]:
            parser.error(f"{name}: {shape[-1]} columns is not a whole number of {type_name} blocks")
    rng = np.random.default_rng(args.seed)
    if args.check:
        check(args, rng)
    elif args.out is None:
        parser.error("--out is required unless --check")
    else:
        write(args, rng)


if __name__ == "__main__":
    sys.exit(main())
