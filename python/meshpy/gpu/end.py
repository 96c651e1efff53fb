"""The End node's embedding and output head with torch (`--device` cuda, cuda:N, torch-cpu):
the same interfaces as `_native.TokenEmbedding` and `_native.OutputHead` (numpy in, numpy
out), so `EndModel` swaps them and nothing else changes. The vocabulary projection, the
End node's one large product, runs on the device; logits come back to the host, where
sampling keeps its CPU `Sampler` (the same tokens for the same seed on either device).

Gemma 4's per-layer inputs stay on the Rust path: their table is read a row per token, which
the CPU does from the memory-mapped file at no cost worth moving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from meshpy import _native
from meshpy.errors import InvalidArgumentError
from meshpy.gpu.quant import dequantize

__all__ = ["TorchEmbedding", "TorchHead", "load_matrix"]

#: Rows dequantized at a time when a table is loaded (bounds the f32 scratch on the host).
_LOAD_ROWS = 8192


def load_matrix(checkpoint: _native.Checkpoint, name: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D tensor `name` as `dtype` on `device`, dequantized by torch from its stored
    blocks, a few thousand rows at a time."""
    ty, shape = checkpoint.tensor_info(name)
    if len(shape) != 2:
        raise InvalidArgumentError(f"{name}: expected a matrix, the checkpoint has shape {shape}")
    rows, cols = shape
    blocks = torch.from_numpy(np.frombuffer(checkpoint.tensor_bytes(name), dtype=np.uint8).copy()).view(rows, -1)
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    for start in range(0, rows, _LOAD_ROWS):
        part = blocks[start : start + _LOAD_ROWS].to(device)
        out[start : start + part.shape[0]] = dequantize(ty, part, torch.float32).to(dtype)
    return out


class TorchEmbedding:
    """The token embedding table on a torch device (`_native.TokenEmbedding`'s interface):
    rows looked up by id, times `scale`, in float32."""

    def __init__(self, checkpoint: _native.Checkpoint, name: str, scale: float, device: str, dtype: torch.dtype) -> None:
        self.table = load_matrix(checkpoint, name, device, dtype)
        self.scale = np.float32(scale)

    @property
    def vocab(self) -> int:
        return int(self.table.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.table.shape[1])

    def lookup(self, ids: Sequence[int]) -> np.ndarray:
        """Hidden states `(len(ids), hidden)` for the token ids."""
        index = torch.as_tensor(list(ids), dtype=torch.long)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.vocab):
            bad = next(i for i in ids if not 0 <= i < self.vocab)
            raise InvalidArgumentError(f"token id {bad} outside the vocabulary of {self.vocab}")
        rows = self.table[index.to(self.table.device)].to(torch.float32).cpu().numpy()
        return rows * self.scale if self.scale != 1 else rows


class TorchHead:
    """Final RMSNorm (weight plus `norm_offset`) and the vocabulary projection on a torch
    device (`_native.OutputHead`'s interface), as head.rs computes them."""

    def __init__(
        self, checkpoint: _native.Checkpoint, norm_name: str, weight_name: str, eps: float, norm_offset: float,
        device: str, dtype: torch.dtype, tied: torch.Tensor | None = None,
    ) -> None:
        self.weight = tied if tied is not None else load_matrix(checkpoint, weight_name, device, dtype)
        ty, shape = checkpoint.tensor_info(norm_name)
        norm = _native.dequantize(ty, checkpoint.tensor_bytes(norm_name), int(np.prod(shape)))
        self.norm = torch.from_numpy(norm + np.float32(norm_offset)).to(device)
        self.eps = eps

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits `(rows, vocab)` for hidden states `(rows, hidden)`, float32 on the host."""
        x = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)).to(self.weight.device)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return (x.to(self.weight.dtype) @ self.weight.T).to(torch.float32).cpu().numpy()
