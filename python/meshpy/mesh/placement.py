"""Which layers a worker takes: its memory budget, what each layer costs, and the
least-covered contiguous range of the model that fits.

Workers started one after another each read the current coverage (how many providers every
layer has) and take the window with the fewest existing providers, earliest first, so a few
workers cover the whole model without anyone computing ranges by hand. A worker serves any
contiguous part of its range, so overlapping ranges still chain into routes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from meshpy import _native
from meshpy.errors import InvalidArgumentError
from meshpy.models.config import ModelConfig, split_tensor_ref
from meshpy.models.source import ModelSource

__all__ = [
    "parse_size",
    "format_size",
    "parse_layers",
    "format_layers",
    "available_memory",
    "device_memory",
    "layer_nbytes",
    "layers_that_fit",
    "choose_layers",
    "RUNTIME_OVERHEAD",
]

#: Memory a worker process needs besides weights and KV cache (interpreter, numpy, libp2p,
#: scratch buffers); the low-memory target of the design.
RUNTIME_OVERHEAD = 150 << 20
#: Left free for the rest of the machine when `--memory` is not given.
_FREE_MARGIN = 512 << 20

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in a size like `2GiB`, `512MiB`, `1.5G` or `1048576`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidArgumentError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1.5G, 1048576)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """`n` bytes, readable (`1.5 GiB`)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def parse_layers(text: str, n_layers: int) -> range:
    """A layer range written `a-b` (inclusive, as users count) or a single layer `a`."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise InvalidArgumentError(f"--layers {text!r}: expected a range like 0-7")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if not first <= last < n_layers:
        raise InvalidArgumentError(f"--layers {text!r}: the model has layers 0-{n_layers - 1}")
    return range(first, last + 1)


def format_layers(layers: range) -> str:
    """`a-b`, inclusive, as `--layers` takes it."""
    return f"{layers.start}-{layers.stop - 1}"


def available_memory() -> int:
    """Memory the machine can give a new process now (Linux MemAvailable), less a margin."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(0, int(line.split()[1]) * 1024 - _FREE_MARGIN)
    except OSError:
        pass
    import os

    try:
        return max(0, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") - _FREE_MARGIN)
    except (ValueError, OSError):
        raise InvalidArgumentError("cannot tell how much memory is free here; pass --memory") from None


def device_memory(device: str, memory: int | None) -> int:
    """What a worker on `device` may fill with layers and KV: `memory` (--memory) where given
    for the CPU path, else the host's free memory; on a GPU its free memory, capped by
    `memory`."""
    if device in ("cpu", "torch-cpu"):
        return memory if memory is not None else available_memory()
    from meshpy.gpu.memory import free_memory

    free = free_memory(device)
    return free if memory is None else min(free, memory)


def layer_nbytes(source: ModelSource, config: ModelConfig, layer: int, device: str = "cpu") -> int:
    """Bytes of one layer's weights as `device` holds them: as stored in the checkpoint for
    the CPU path; on a torch device see `meshpy.gpu.memory.weight_bytes`."""
    total = 0
    for role, ref in config.layer_names(layer).items():
        # A role may be rows of a fused tensor (Phi-3's qkv_proj): count those rows only.
        name, rows = split_tensor_ref(ref, source.checkpoint)
        type_name, shape = source.checkpoint.tensor_info(name)
        nbytes = _native.tensor_nbytes(type_name, list(shape))
        if rows is not None:
            nbytes, shape = nbytes // shape[0] * len(rows), (len(rows), *shape[1:])
        if device != "cpu":
            from meshpy.gpu.memory import weight_bytes

            nbytes = weight_bytes(role, type_name, tuple(shape), nbytes, device)
        total += nbytes
    return total


def layers_that_fit(per_layer: Sequence[int], memory: int, kv_budget: int) -> int:
    """How many of the heaviest layers fit in `memory` next to the KV budget and runtime."""
    room = memory - kv_budget - RUNTIME_OVERHEAD
    heaviest = max(per_layer)
    return max(0, min(len(per_layer), room // heaviest)) if heaviest else len(per_layer)


def choose_layers(coverage: Sequence[int], count: int) -> range:
    """The `count`-layer window with the fewest providers in total, earliest on ties.

    `coverage[i]` is how many providers layer `i` has now.
    """
    n = len(coverage)
    if not 1 <= count <= n:
        raise ValueError(f"cannot take {count} of {n} layers")
    best_start, best = 0, None
    window = sum(coverage[:count])
    for start in range(n - count + 1):
        if start:
            window += coverage[start + count - 1] - coverage[start - 1]
        # Uncovered layers first: a window's worst layer, then its total.
        key = (min(coverage[start : start + count]) > 0, window)
        if best is None or key < best:
            best_start, best = start, key
    return range(best_start, best_start + count)
