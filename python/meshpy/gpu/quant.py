"""Quantized weights on a torch device: GGUF blocks kept as they are stored, multiplied by
Triton kernels that dequantize in registers, or dequantized by torch for a plain matmul.

Two halves:

- Torch dequantizers, one per ggml block type, from raw block bytes (a uint8 tensor of shape
  `(rows, row_bytes)`, on any device) to floats, vectorised over all blocks at once. They are
  bit-exact with `meshpy._native.dequantize` (rust/src/quant/reference, the scalar kernels) and
  so with ggml: each follows `dequantize_row_*` in llama.cpp's ggml/src/ggml-quants.c (the
  block structs in ggml/src/ggml-common.h), f32 operations in the same order, f16 scales
  widened exactly.
- `QuantLinear`, `y = x @ W.T` for such a weight. Decode-sized inputs (m <= `KERNEL_MAX_M`
  rows) of the `KERNEL_TYPES` on CUDA, or anywhere under `TRITON_INTERPRET=1`, take a Triton
  skinny-GEMM that reads each weight byte once and accumulates in f32. Everything else
  (prefill, other types, torch's CPU device) dequantizes the whole matrix to x's dtype, uses
  it for one `torch.matmul` and drops it.

Triton is imported when a kernel is first launched, never at import, so this module works with
a CPU-only torch that has no triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = [
    "FORMATS",
    "KERNEL_MAX_M",
    "KERNEL_TYPES",
    "BlockFormat",
    "QuantLinear",
    "block_format",
    "dequantize",
    "kernels_in_use",
    "quant_matmul",
]

# ---------------------------------------------------------------------------------------------
# Dequantizers. Each `_decode_*` takes the blocks as (rows, n_blocks, block_bytes) uint8 and
# returns their elements as (rows, n_blocks, block_elems) f32 (or any shape with that many
# elements per block, in element order).


def _f16(blocks: Tensor, offset: int) -> Tensor:
    """The f16 at byte `offset` of every block as f32, shape (rows, n_blocks, 1); exact, as
    ggml's `GGML_FP16_TO_FP32`."""
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _low_high_nibbles(qs: Tensor) -> Tensor:
    """Bytes (..., n) to (..., 2, n): the low nibbles, then the high nibbles (the order of a
    legacy block's 32 quants, and of each 64-element chunk of Q4_K / Q5_K)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(mask: Tensor) -> Tensor:
    """Bytes (..., n) to their bits (..., 8, n): [..., k, l] is bit k of byte l."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (mask.unsqueeze(-2) >> shifts.unsqueeze(-1)) & 1


def _decode_f32(blocks: Tensor) -> Tensor:
    return blocks.view(torch.float32)


def _decode_f16(blocks: Tensor) -> Tensor:
    return blocks.view(torch.float16).to(torch.float32)


def _decode_bf16(blocks: Tensor) -> Tensor:
    return blocks.view(torch.bfloat16).to(torch.float32)


def _decode_q8_0(blocks: Tensor) -> Tensor:
    """block_q8_0 (34 bytes): f16 d, 32 int8 qs; `qs[j] * d` (ggml `dequantize_row_q8_0`)."""
    q = blocks[..., 2:34].view(torch.int8).to(torch.float32)
    return q.mul_(_f16(blocks, 0))


def _decode_q4_0(blocks: Tensor) -> Tensor:
    """block_q4_0 (18 bytes): f16 d, 16 bytes qs, element j in the low nibble of byte j and
    element j + 16 in the high nibble; `(q - 8) * d` (ggml `dequantize_row_q4_0`)."""
    q = _low_high_nibbles(blocks[..., 2:18]).flatten(-2).to(torch.float32)
    return q.sub_(8).mul_(_f16(blocks, 0))


def _decode_q4_1(blocks: Tensor) -> Tensor:
    """block_q4_1 (20 bytes): f16 d, f16 m, 16 bytes qs as Q4_0's; `q * d + m`, two roundings
    (ggml `dequantize_row_q4_1`)."""
    q = _low_high_nibbles(blocks[..., 4:20]).flatten(-2).to(torch.float32)
    return q.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _five_bit_quants(qh: Tensor, qs: Tensor) -> Tensor:
    """Q5_0 / Q5_1 quants (..., 32) in 0..32: nibbles as Q4_0's, fifth bit j of the
    little-endian u32 `qh` for element j (ggml `dequantize_row_q5_0`'s `xh_0`, `xh_1`)."""
    high = _bits(qh).transpose(-1, -2).flatten(-2)  # (..., 32): bit j % 8 of byte j // 8
    return _low_high_nibbles(qs).flatten(-2) | (high << 4)


def _decode_q5_0(blocks: Tensor) -> Tensor:
    """block_q5_0 (22 bytes): f16 d, 4 bytes qh, 16 bytes qs; `(q - 16) * d`."""
    q = _five_bit_quants(blocks[..., 2:6], blocks[..., 6:22]).to(torch.float32)
    return q.sub_(16).mul_(_f16(blocks, 0))


def _decode_q5_1(blocks: Tensor) -> Tensor:
    """block_q5_1 (24 bytes): f16 d, f16 m, 4 bytes qh, 16 bytes qs; `q * d + m`."""
    q = _five_bit_quants(blocks[..., 4:8], blocks[..., 8:24]).to(torch.float32)
    return q.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _k4_scales_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K's 12 scale bytes (..., 12) to 8 six-bit scales and 8 mins, each (..., 8),
    as ggml's `get_scale_min_k4`: sub-blocks 0..4 in the low 6 bits of bytes 0..4 (scales)
    and 4..8 (mins); sub-blocks 4..8 take their low 4 bits from bytes 8..12 and their top 2
    from the top of bytes 0..4 (scales) and 4..8 (mins)."""
    first, second, third = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat((first & 63, (third & 0x0F) | ((first >> 6) << 4)), dim=-1)
    mins = torch.cat((second & 63, (third >> 4) | ((second >> 6) << 4)), dim=-1)
    return scales, mins


def _k4_values(blocks: Tensor, q: Tensor) -> Tensor:
    """Q4_K / Q5_K elements from quants q (..., 8, 32): `(d * sc) * q - (dmin * m)` per
    sub-block of 32, the scale and min products rounded first, as ggml."""
    scales, mins = _k4_scales_mins(blocks[..., 4:16])
    scale = _f16(blocks, 0) * scales.to(torch.float32)  # (..., 8)
    offset = _f16(blocks, 2) * mins.to(torch.float32)
    return q.to(torch.float32).mul_(scale.unsqueeze(-1)).sub_(offset.unsqueeze(-1))


def _decode_q4_k(blocks: Tensor) -> Tensor:
    """block_q4_K (144 bytes): f16 d, f16 dmin, 12 bytes scales, 128 bytes qs; 64-element
    chunk c is bytes 32c..32c+32 of qs, low nibbles (sub-block 2c) then high nibbles
    (sub-block 2c + 1) (ggml `dequantize_row_q4_K`)."""
    qs = blocks[..., 16:144].unflatten(-1, (4, 32))  # (..., chunk, byte)
    return _k4_values(blocks, _low_high_nibbles(qs).flatten(-3, -2))


def _decode_q5_k(blocks: Tensor) -> Tensor:
    """block_q5_K (176 bytes): f16 d, f16 dmin, 12 bytes scales, 32 bytes qh, 128 bytes qs;
    low nibbles as Q4_K's, fifth bit of element 32k + l is bit k of qh[l] (ggml
    `dequantize_row_q5_K`'s `u1`, `u2` masks)."""
    qs = blocks[..., 48:176].unflatten(-1, (4, 32))
    q = _low_high_nibbles(qs).flatten(-3, -2) | (_bits(blocks[..., 16:48]) << 4)
    return _k4_values(blocks, q)


def _decode_q6_k(blocks: Tensor) -> Tensor:
    """block_q6_K (210 bytes): 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d. For half h
    (128 elements) and l in 0..32, quants 128h + 32k + l take their low 4 bits from ql[64h +
    l] (k = 0, 2: low, high nibble) or ql[64h + 32 + l] (k = 1, 3) and their top 2 from bits
    2k of qh[32h + l]; `(d * sc) * (q - 32)` per sub-block of 16 (ggml `dequantize_row_q6_K`)."""
    ql = blocks[..., 0:128].unflatten(-1, (2, 2, 32))  # (..., half, first/second 32, l)
    qh = blocks[..., 128:192].unflatten(-1, (2, 1, 32))  # (..., half, 1, l)
    low = torch.stack((ql & 0x0F, ql >> 4), dim=-3).flatten(-3, -2)  # (..., half, k, l)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=blocks.device).view(4, 1)
    q = low | (((qh >> shifts) & 3) << 4)  # (..., half, k, l)
    q = q.flatten(-3).unflatten(-1, (16, 16)).to(torch.float32).sub_(32)  # (..., sub-block, 16)
    scale = _f16(blocks, 208) * blocks[..., 192:208].view(torch.int8).to(torch.float32)
    return q.mul_(scale.unsqueeze(-1))


@dataclass(frozen=True)
class BlockFormat:
    """A ggml type's block: `elems` values stored in `nbytes` bytes, decoded by `decode`."""

    name: str
    elems: int
    nbytes: int
    decode: Callable[[Tensor], Tensor]

    def row_bytes(self, cols: int) -> int:
        """Bytes of a row of `cols` values; ValueError unless they fill whole blocks."""
        if cols % self.elems:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.elems}; got {cols} columns")
        return cols // self.elems * self.nbytes


#: The types dequantized here, by ggml name (block sizes from ggml-common.h).
FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("F32", 1, 4, _decode_f32),
        BlockFormat("F16", 1, 2, _decode_f16),
        BlockFormat("BF16", 1, 2, _decode_bf16),
        BlockFormat("Q4_0", 32, 18, _decode_q4_0),
        BlockFormat("Q4_1", 32, 20, _decode_q4_1),
        BlockFormat("Q5_0", 32, 22, _decode_q5_0),
        BlockFormat("Q5_1", 32, 24, _decode_q5_1),
        BlockFormat("Q8_0", 32, 34, _decode_q8_0),
        BlockFormat("Q4_K", 256, 144, _decode_q4_k),
        BlockFormat("Q5_K", 256, 176, _decode_q5_k),
        BlockFormat("Q6_K", 256, 210, _decode_q6_k),
    )
}


def _type_name(ty: str) -> str:
    """ggml's spelling of a type name given in any case, k-quants also without the
    underscore ("q4k" -> "Q4_K"), as `_native` takes them."""
    name = ty.upper()
    return re.sub(r"^(Q\d)K$", r"\1_K", name)


def block_format(ty: str) -> BlockFormat:
    """The block format of type `ty`; ValueError naming the supported ones otherwise."""
    name = _type_name(ty)
    if name not in FORMATS:
        raise ValueError(f"no torch dequantizer for type {ty!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


def dequantize(ty: str, blocks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows of GGUF blocks, a uint8 tensor (rows, row_bytes), as a (rows, cols) tensor of
    `dtype` on the same device: bit-exact with ggml in f32, then rounded to `dtype`."""
    fmt = block_format(ty)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % fmt.nbytes:
        got = f"{blocks.dtype} {tuple(blocks.shape)}"
        raise ValueError(f"{fmt.name} blocks must be uint8 (rows, k * {fmt.nbytes}); got {got}")
    rows, row_bytes = blocks.shape
    n_blocks = row_bytes // fmt.nbytes
    values = fmt.decode(blocks.reshape(rows, n_blocks, fmt.nbytes))
    return values.reshape(rows, n_blocks * fmt.elems).to(dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels: y (m, N) = x (m, K) @ W.T, W as GGUF blocks (N, row_bytes), for m <= 16.
#
# Grid (cdiv(N, BLOCK_N), split_k): a program owns BLOCK_N weight rows and a contiguous run of
# K tiles (BLOCK_K elements: 4 legacy blocks or one k-quant super-block). Per tile it
# loads those rows' blocks straight from the GGUF bytes (scales once per block, quants as
# (BLOCK_N, blocks, 32) byte gathers in element order), dequantizes them to an f32
# (BLOCK_N, BLOCK_K) tile in registers, and accumulates x_tile @ tile.T in f32: a row
# reduction for m = 1 (GEMV), `tl.dot` with x padded to 16 rows otherwise (x's dtype on the
# tensor cores; f32 x in full precision). Each program writes its f32 partial sums; the
# split_k partials are added by torch. Every weight byte is read from memory once per call.
#
# Triton is imported lazily, and its interpreter finds a kernel's callees only through the
# module's globals: the functions of this section are plain Python until `_triton_kernel()`
# replaces each, in place, by its `triton.jit` version (and binds `tl`).

#: The types with a Triton kernel; other types take the dequantize-and-matmul path.
KERNEL_TYPES = frozenset({"Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"})
#: The most rows of x the kernels take (decode, speculation, small batches); more is prefill.
KERNEL_MAX_M = 16
#: Weight rows per program.
BLOCK_N = 32
#: Elements per K tile, by type. Untuned (no GPU has timed them yet); compiled for sm_90 by
#: triton 3.9 at 4 warps they take <= 140 registers a thread, but Q4_K with m > 1: 168, and
#: with f32 x (full-precision FMA dot) it spills (~3 KB of stack). Q5_0 and Q6_K are not yet
#: compiled for a GPU at all.
TILE_K = {"Q8_0": 128, "Q4_0": 128, "Q5_0": 128, "Q4_K": 256, "Q6_K": 256}

tl: Any = None  # triton.language, bound by _triton_kernel()


def _interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (truthy as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_in_use(device: torch.device | str) -> bool:
    """Whether `QuantLinear.forward` on `device` runs the Triton kernels (for `KERNEL_TYPES`
    and m <= `KERNEL_MAX_M`): triton is installed and the device is CUDA, or
    TRITON_INTERPRET=1 runs them on the CPU."""
    return _triton_installed() and (torch.device(device).type == "cuda" or _interpreting())


def _load_f16(ptr, mask):  # type: ignore[no-untyped-def]
    """The f16 at each byte pointer of `ptr` (2-byte aligned) as f32; 0 where masked."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


def _tile_q8_0(row_ptr, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """W[rows, k0 : k0 + BLOCK_K] from Q8_0 blocks (34 bytes: f16 d, 32 int8 qs): d * q."""
    blk = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask = n_mask[:, None] & (blk < K // 32)[None, :]  # (BLOCK_N, blocks)
    base = row_ptr[:, None] + blk[None, :] * 34  # (BLOCK_N, blocks): block starts
    d = _load_f16(base, mask)
    j = tl.arange(0, 32)
    q = tl.load(base[:, :, None] + 2 + j[None, None, :], mask=mask[:, :, None], other=0)
    w = q.to(tl.int8, bitcast=True).to(tl.float32) * d[:, :, None]  # (BLOCK_N, blocks, 32)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


def _tile_q4_0(row_ptr, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """W[rows, k0 : k0 + BLOCK_K] from Q4_0 blocks (18 bytes: f16 d, 16 bytes qs): element j
    is nibble j // 16 of byte j % 16; (q - 8) * d."""
    blk = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask = n_mask[:, None] & (blk < K // 32)[None, :]
    base = row_ptr[:, None] + blk[None, :] * 18
    d = _load_f16(base, mask)
    j = tl.arange(0, 32)
    byte = tl.load(base[:, :, None] + 2 + (j % 16)[None, None, :], mask=mask[:, :, None], other=0)
    q = (byte >> (4 * (j // 16))[None, None, :]) & 0x0F
    w = (q.to(tl.float32) - 8.0) * d[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


def _tile_q5_0(row_ptr, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """W[rows, k0 : k0 + BLOCK_K] from Q5_0 blocks (22 bytes: f16 d, 4 bytes qh, 16 bytes qs;
    ggml-common.h `block_q5_0`): element j's low 4 bits are nibble j // 16 of qs byte j % 16 (as
    Q4_0), its fifth bit is bit j of the little-endian u32 qh, i.e. bit j % 8 of qh byte j // 8
    (ggml `dequantize_row_q5_0`'s `xh_0`, `xh_1`); (q - 16) * d."""
    blk = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask = n_mask[:, None] & (blk < K // 32)[None, :]
    base = row_ptr[:, None] + blk[None, :] * 22
    d = _load_f16(base, mask)
    j = tl.arange(0, 32)
    byte = tl.load(base[:, :, None] + 6 + (j % 16)[None, None, :], mask=mask[:, :, None], other=0)
    high = tl.load(base[:, :, None] + 2 + (j // 8)[None, None, :], mask=mask[:, :, None], other=0)
    q = ((byte >> (4 * (j // 16))[None, None, :]) & 0x0F) | (((high >> (j % 8)[None, None, :]) & 1) << 4)
    w = (q.to(tl.float32) - 16.0) * d[:, :, None]  # (BLOCK_N, blocks, 32)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


def _tile_q4_k(row_ptr, n_mask, k0, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    """W[rows, k0 : k0 + 256] from one Q4_K super-block per row (144 bytes: f16 d, f16 dmin,
    12 bytes scales, 128 bytes qs): sub-block s's scale and min as `get_scale_min_k4`, its
    quants the low (s even) or high nibbles of qs bytes 32 (s // 2) .. + 32; (d sc) q - dmin m."""
    base = row_ptr + (k0 // 256) * 144  # (BLOCK_N,)
    d = _load_f16(base, n_mask)
    dmin = _load_f16(base + 2, n_mask)
    s = tl.arange(0, 8)
    packed = base[:, None] + 4  # the 12 scale bytes
    a = tl.load(packed + s[None, :], mask=n_mask[:, None], other=0)  # byte s
    b = tl.load(packed + (s + 4)[None, :], mask=n_mask[:, None], other=0)  # byte s + 4
    c = tl.load(packed + ((s + 4) % 8)[None, :], mask=n_mask[:, None], other=0)  # s - 4 (s >= 4)
    first = (s < 4)[None, :]
    sc = tl.where(first, a & 63, (b & 0x0F) | ((c >> 6) << 4))  # (BLOCK_N, 8)
    mn = tl.where(first, b & 63, (b >> 4) | ((a >> 6) << 4))
    l = tl.arange(0, 32)  # noqa: E741
    qs = base[:, None, None] + 16 + (32 * (s // 2))[None, :, None] + l[None, None, :]
    byte = tl.load(qs, mask=n_mask[:, None, None], other=0)  # (BLOCK_N, 8, 32)
    q = (byte >> (4 * (s % 2))[None, :, None]) & 0x0F
    scale = d[:, None] * sc.to(tl.float32)
    offset = dmin[:, None] * mn.to(tl.float32)
    w = scale[:, :, None] * q.to(tl.float32) - offset[:, :, None]
    return tl.reshape(w, (BLOCK_N, 256))


def _tile_q6_k(row_ptr, n_mask, k0, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    """W[rows, k0 : k0 + 256] from one Q6_K super-block per row (210 bytes: 128 bytes ql, 64
    bytes qh, 16 int8 scales, f16 d; ggml-common.h `block_q6_K`), as 16 sub-blocks b of 16.
    Element 16b + i lies in half h = b // 8 at l = 16 (b % 2) + i of 32-element group
    k = (b // 2) % 4; its low 4 bits are nibble k // 2 of ql[64h + 32 (k % 2) + l], its top 2
    bits 2k..2k+2 of qh[32h + l] (ggml `dequantize_row_q6_K`'s q1..q4); (d sc[b]) (q - 32)."""
    base = row_ptr + (k0 // 256) * 210  # (BLOCK_N,)
    d = _load_f16(base + 208, n_mask)
    b = tl.arange(0, 16)
    sc = tl.load(base[:, None] + 192 + b[None, :], mask=n_mask[:, None], other=0)  # (BLOCK_N, 16)
    scale = d[:, None] * sc.to(tl.int8, bitcast=True).to(tl.float32)
    h = b // 8
    k = (b // 2) % 4
    l = (16 * (b % 2))[:, None] + tl.arange(0, 16)[None, :]  # noqa: E741  (16 sub-blocks, 16)
    ql = base[:, None, None] + (64 * h + 32 * (k % 2))[None, :, None] + l[None, :, :]
    qh = base[:, None, None] + (128 + 32 * h)[None, :, None] + l[None, :, :]
    low = tl.load(ql, mask=n_mask[:, None, None], other=0)  # (BLOCK_N, 16, 16)
    top = tl.load(qh, mask=n_mask[:, None, None], other=0)
    q = ((low >> (4 * (k // 2))[None, :, None]) & 0x0F) | (((top >> (2 * k)[None, :, None]) & 3) << 4)
    w = scale[:, :, None] * (q.to(tl.float32) - 32.0)
    return tl.reshape(w, (BLOCK_N, 256))


def _matmul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, out_ptr, M, N, K, row_bytes, tiles_per_split,
    QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[pid_k] (M, N) f32 = x (M, K) @ W.T over this program's rows and K tiles."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    row_ptr = w_ptr + offs_n.to(tl.int64) * row_bytes  # (BLOCK_N,): 64-bit, big matrices
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        if QTYPE == "Q8_0":
            w = _tile_q8_0(row_ptr, n_mask, k0, K, BLOCK_N, BLOCK_K)
        elif QTYPE == "Q4_0":
            w = _tile_q4_0(row_ptr, n_mask, k0, K, BLOCK_N, BLOCK_K)
        elif QTYPE == "Q5_0":
            w = _tile_q5_0(row_ptr, n_mask, k0, K, BLOCK_N, BLOCK_K)
        elif QTYPE == "Q4_K":
            w = _tile_q4_k(row_ptr, n_mask, k0, BLOCK_N)
        else:
            w = _tile_q6_k(row_ptr, n_mask, k0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=x_mask, other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        elif x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _triton_kernel() -> Any:
    """`_matmul_kernel` as a Triton kernel (the interpreter's when TRITON_INTERPRET is set at
    the first call); imports triton and jits this section's functions in place."""
    global tl, _load_f16, _tile_q8_0, _tile_q4_0, _tile_q5_0, _tile_q4_k, _tile_q6_k
    import triton
    import triton.language

    tl = triton.language
    _load_f16, _tile_q8_0, _tile_q4_0, _tile_q5_0, _tile_q4_k, _tile_q6_k = (
        triton.jit(f) for f in (_load_f16, _tile_q8_0, _tile_q4_0, _tile_q5_0, _tile_q4_k, _tile_q6_k)
    )
    return triton.jit(_matmul_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(device: torch.device, n_programs: int, n_tiles: int) -> int:
    """K splits so that a launch has a few programs per SM (decode matrices have few rows per
    SM), keeping at least 4 tiles per split; 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    wanted = -(-4 * _sm_count(device) // n_programs)
    return max(1, min(wanted, n_tiles // 4))


def quant_matmul(x: Tensor, blocks: Tensor, ty: str, rows: int, cols: int, split_k: int | None = None) -> Tensor:
    """x (m, cols) @ W.T by the Triton kernel, W being `rows` rows of GGUF blocks of type `ty`
    (in `KERNEL_TYPES`) in `blocks` (rows, row_bytes) uint8 on x's device: (m, rows) in x's
    dtype. `split_k` overrides how many programs share each row's K tiles."""
    name = _type_name(ty)
    if name not in KERNEL_TYPES:
        raise ValueError(f"no Triton kernel for {ty!r}; kernels: {', '.join(sorted(KERNEL_TYPES))}")
    m = x.shape[0]
    if not 1 <= m <= KERNEL_MAX_M or x.shape[1] != cols:
        raise ValueError(f"x must be (m <= {KERNEL_MAX_M}, {cols}); got {tuple(x.shape)}")
    shape = (rows, block_format(name).row_bytes(cols))
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != shape or blocks.device != x.device:
        got = f"{blocks.dtype} {tuple(blocks.shape)} on {blocks.device}"
        raise ValueError(f"{name} {rows}x{cols} needs uint8 blocks {shape} on {x.device}; got {got}")
    kernel = _triton_kernel()
    x = x.contiguous()
    n_programs = -(-rows // BLOCK_N)
    n_tiles = -(-cols // TILE_K[name])
    splits = split_k or _split_k(x.device, n_programs, n_tiles)
    tiles_per_split = -(-n_tiles // max(1, min(splits, n_tiles)))
    splits = -(-n_tiles // tiles_per_split)  # none left without tiles
    partial = torch.empty((splits, m, rows), dtype=torch.float32, device=x.device)
    kernel[(n_programs, splits)](
        x, blocks, partial, m, rows, cols, blocks.shape[1], tiles_per_split,
        QTYPE=name, BLOCK_M=1 if m == 1 else 16, BLOCK_N=BLOCK_N, BLOCK_K=TILE_K[name],
    )  # fmt: skip
    out = partial[0] if splits == 1 else partial.sum(dim=0)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The layer.


class QuantLinear:
    """A weight matrix of `rows` (out features) x `cols` (in features) kept as its GGUF blocks:
    `blocks` is a (rows, row_bytes) uint8 tensor on the device holding the checkpoint's bytes
    unchanged. `forward(x)` is `x @ W.T` in x's dtype."""

    def __init__(self, ty: str, rows: int, cols: int, blocks: Tensor) -> None:
        fmt = block_format(ty)
        shape = (rows, fmt.row_bytes(cols))
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != shape:
            got = f"{blocks.dtype} {tuple(blocks.shape)}"
            raise ValueError(f"{fmt.name} {rows}x{cols} needs uint8 blocks {shape}; got {got}")
        self.ty = fmt.name
        self.rows = rows
        self.cols = cols
        self.blocks = blocks

    @classmethod
    def from_blocks(
        cls, ty: str, rows: int, cols: int, blocks: npt.NDArray[Any] | bytes, device: torch.device | str
    ) -> QuantLinear:
        """From a tensor's stored bytes, as `Checkpoint.tensor_bytes` returns them or an array
        of any shape and dtype read as its raw bytes (like `_native`), copied to `device`."""
        if isinstance(blocks, bytes):
            blocks = np.frombuffer(blocks, dtype=np.uint8)
        raw = np.ascontiguousarray(blocks).reshape(-1).view(np.uint8)
        tensor = torch.from_numpy(raw.reshape(rows, block_format(ty).row_bytes(cols)).copy())
        return cls(ty, rows, cols, tensor.to(device))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def uses_kernel(self) -> bool:
        """Whether decode-sized inputs run a Triton kernel here."""
        return self.ty in KERNEL_TYPES and kernels_in_use(self.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W as a (rows, cols) tensor of `dtype` (a new one each call: nothing is cached)."""
        return dequantize(self.ty, self.blocks, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., cols) @ W.T: (..., rows) in x's dtype."""
        flat = x.reshape(-1, self.cols)
        if 1 <= flat.shape[0] <= KERNEL_MAX_M and self.uses_kernel:
            y = quant_matmul(flat, self.blocks, self.ty, self.rows, self.cols)
        else:
            y = torch.matmul(flat, self.dequantize(x.dtype).T)
        return y.reshape(*x.shape[:-1], self.rows)

    __call__ = forward

    def __repr__(self) -> str:
        return f"QuantLinear({self.ty}, {self.rows}x{self.cols}, {self.device})"
