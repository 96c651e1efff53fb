"""What a torch-path worker can hold: the device's free memory, and a layer's bytes there
(blocks the GPU kernels serve stay as stored; other matrices widen to the compute type)."""

from __future__ import annotations

import math

import torch

from meshpy.gpu import require
from meshpy.gpu.backend import BLOCK_ROLES, compute_dtype
from meshpy.gpu.quant import KERNEL_TYPES

__all__ = ["GPU_OVERHEAD", "free_memory", "weight_bytes"]

#: GPU memory a worker keeps free of layers and KV: the CUDA context, cuBLAS workspaces,
#: compiled kernels and the caching allocator's slack. An estimate until measured on a GPU
#: (issue 17's notes).
GPU_OVERHEAD = 1 << 30


def free_memory(device: str) -> int:
    """Bytes free on a CUDA device now, less `GPU_OVERHEAD` (0 when no more is free). Not
    for torch's CPU device, whose layers live in host memory."""
    torch_device = require(device)
    if torch_device == "cpu":
        raise ValueError("torch-cpu holds its layers in host memory: use placement.available_memory")
    free, _total = torch.cuda.mem_get_info(torch.device(torch_device))
    return max(0, free - GPU_OVERHEAD)


def weight_bytes(role: str, type_name: str, shape: tuple[int, ...], stored_bytes: int, device: str) -> int:
    """Bytes a weight of `role` (stored as `type_name`, `shape`, `stored_bytes`) holds on a
    torch device ("cuda", "cuda:N", "torch-cpu"; not checked against this machine): as stored
    where a GPU kernel serves it, float32 for vectors (norms, biases), else the compute type
    (`backend.compute_dtype`)."""
    on_gpu = device != "torch-cpu"
    if len(shape) == 1:
        return 4 * shape[0]
    if on_gpu and role in BLOCK_ROLES and type_name in KERNEL_TYPES:
        return stored_bytes
    return math.prod(shape) * compute_dtype("cuda" if on_gpu else "cpu").itemsize
