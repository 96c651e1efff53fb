"""Placement for torch-path workers (issue 17, part 3): a layer's bytes as the device holds
them, and the room a GPU gives (its free memory, capped by --memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from meshpy import _native  # noqa: E402
from meshpy.gpu.backend import torch_span  # noqa: E402
from meshpy.gpu.memory import GPU_OVERHEAD, weight_bytes  # noqa: E402
from meshpy.mesh.placement import device_memory, layer_nbytes  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.pipeline import LocalSpan  # noqa: E402


def test_a_layers_bytes_on_torch_are_what_the_span_holds(gemma3_gguf: Path) -> None:
    """Gemma 3 270M (Q4_K_M): on torch's CPU device every matrix is float32, as the loaded
    span holds it (counted by the span itself); on a GPU the matrices of a type a kernel serves
    keep their stored bytes, the rest (and the experts' stacks) are bf16."""
    source = open_model_source(gemma3_gguf)
    config = read_config(source)
    cpu = LocalSpan(source, config, range(2, 4), _native.ThreadPool(1))
    names = [config.layer_names(i) for i in (2, 3)]
    _, held = torch_span(cpu.native, config.span_config(None, None), "torch-cpu", source.checkpoint, names, keep_quantized=False)
    assert sum(layer_nbytes(source, config, i, "torch-cpu") for i in (2, 3)) == held
    # Layer 2's matrices are Q5_0 and Q4_K, both served by kernels: the GPU holds the file's
    # bytes (its norms are F32 in the file too).
    stored, gpu = layer_nbytes(source, config, 2), layer_nbytes(source, config, 2, "cuda")
    assert gpu == stored < layer_nbytes(source, config, 2, "torch-cpu") / 4
    # A matrix no kernel serves widens to bf16 there.
    assert weight_bytes("ffn_down", "Q5_1", (640, 2048), 737280, "cuda") == 2 * 640 * 2048
    assert weight_bytes("ffn_gate_exps", "Q4_K", (8, 64, 256), 73728, "cuda") == 2 * 8 * 64 * 256


def test_a_gpu_gives_its_free_memory_capped_by_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The room is the device's free memory (torch.cuda.mem_get_info, here made to answer as
    an 80 GiB GPU with 70 GiB free would) less the runtime's overhead, capped by --memory."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 << 30, 80 << 30))
    assert device_memory("cuda", None) == (70 << 30) - GPU_OVERHEAD
    assert device_memory("cuda:0", 8 << 30) == 8 << 30
    with pytest.raises(Exception, match="PyTorch sees 1 GPU"):
        device_memory("cuda:1", None)
