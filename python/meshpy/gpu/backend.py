"""Turning a loaded span into a torch-path span the Rust side can run and serve."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from meshpy import _native
from meshpy.gpu import require
from meshpy.gpu.quant import KERNEL_TYPES, QuantLinear, block_format
from meshpy.gpu.span import TorchSpan
from meshpy.models.config import split_tensor_ref

__all__ = ["compute_dtype", "describe_device", "stored_blocks", "torch_span"]

#: Matrices that may stay in their GGUF blocks on the device (the experts' stacks and the
#: router are taken dequantized: the expert loop indexes them).
BLOCK_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ple_gate", "ple_proj")

def compute_dtype(torch_device: str) -> torch.dtype:
    """The weights' type on a torch device: float32 on torch's CPU device (it reproduces the
    CPU path to f32 rounding: the tests' reference), bfloat16 on a GPU."""
    return torch.float32 if torch_device == "cpu" else torch.bfloat16


def describe_device(torch_device: str) -> str:
    """What a worker's status shows: "cuda:0 NVIDIA H100 80GB HBM3", or "torch-cpu"."""
    if torch_device == "cpu":
        return "torch-cpu"
    return f"{torch_device} {torch.cuda.get_device_name(torch.device(torch_device))}"


def stored_blocks(
    checkpoint: _native.Checkpoint, names: Mapping[str, str], device: str, types: frozenset[str] = KERNEL_TYPES
) -> dict[str, QuantLinear]:
    """One layer's matrices (`names`: role -> tensor name, maybe a row range `name[a:b]` of
    a fused tensor, as the Rust loader reads them) whose stored type is one of `types`, as
    their blocks on `device`, unchanged."""
    out = {}
    for role in BLOCK_ROLES:
        reference = names.get(role)
        if reference is None:
            continue
        name, rows = split_tensor_ref(reference, checkpoint)
        ty, shape = checkpoint.tensor_info(name)
        if ty not in types or len(shape) != 2:
            continue
        n_rows, cols = shape
        blocks = np.frombuffer(checkpoint.tensor_bytes(name), dtype=np.uint8).reshape(n_rows, block_format(ty).row_bytes(cols))
        if rows is not None:
            blocks = blocks[rows.start : rows.stop]
        out[role] = QuantLinear.from_blocks(ty, blocks.shape[0], cols, np.ascontiguousarray(blocks), device)
    return out


def torch_span(
    native: _native.DecoderSpan,
    config: dict[str, Any],
    device: str,
    checkpoint: _native.Checkpoint | None = None,
    layer_names: Sequence[Mapping[str, str]] | None = None,
    keep_quantized: bool | None = None,
) -> tuple[_native.TorchSpan, int]:
    """The layers `native` loaded, copied to torch on `device` ("cuda", "cuda:N",
    "torch-cpu"), as `compute_dtype`, and the bytes of weights they hold there. With
    `keep_quantized` (default: on a GPU) and the checkpoint and its per-layer names, the
    matrices stored in a type the GPU kernels serve (`quant.KERNEL_TYPES`) stay in their
    blocks."""
    torch_device = require(device)
    if keep_quantized is None:
        keep_quantized = torch_device != "cpu"
    quantized = None
    if keep_quantized and checkpoint is not None and layer_names is not None and config.get("quantize") is None:
        quantized = [stored_blocks(checkpoint, names, torch_device) for names in layer_names]
    span = TorchSpan(native, config, torch_device, compute_dtype(torch_device), quantized)
    wrapped = _native.TorchSpan(span, config, native.first_layer, native.n_layers, native.kv_dtype, describe_device(torch_device))
    return wrapped, span.nbytes
