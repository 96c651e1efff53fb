"""Type stubs of meshpy._native, the Rust extension (private: import from meshpy)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

__version__: str

# checkpoint

class Checkpoint:
    """A memory-mapped checkpoint: one GGUF file, or one or more safetensors shards.

    The format is chosen by the files' first bytes. Raises CheckpointIOError,
    CheckpointFormatError (truncated or corrupt, with the byte offset), MissingTensorError
    and UnsupportedTypeError from meshpy.errors.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None: ...
    @property
    def format(self) -> Literal["gguf", "safetensors"]: ...
    @property
    def paths(self) -> list[pathlib.Path]: ...
    def metadata(self) -> dict[str, Any]:
        """GGUF key-values (arrays as lists), or the safetensors ``__metadata__`` strings."""
    def tensor_names(self) -> list[str]:
        """Every tensor name, sorted."""
    def tensor_info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(type name, shape)``, e.g. ``("Q4_K", (576, 1536))``; shape outermost first."""
    def tensor_bytes(self, name: str) -> bytes:
        """A copy of the tensor's raw little-endian bytes."""
    def touch(self, names: Sequence[str]) -> int:
        """Test hook: reads the named tensors in place; returns the wrapping sum of their bytes."""
    def __len__(self) -> int: ...
    def __contains__(self, name: str) -> bool: ...
