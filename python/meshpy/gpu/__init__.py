"""The torch path: spans (and the End node's embedding and head) run with PyTorch on a CUDA GPU
(`--device cuda`), or on torch's CPU device (`--device torch-cpu`, which tests it without a
GPU). Same frames, sessions, KV budget and refusals as the CPU path: the Rust span server
keeps the sessions' book-keeping and calls this package once per batch.

torch is an optional dependency (`pip install 'meshpy-llm[cuda]'`): only this package
imports it, and only when a torch device is asked for.
"""

from __future__ import annotations

import importlib.util

from meshpy.errors import InvalidArgumentError

__all__ = ["TORCH_DEVICES", "DEVICE_HELP", "check_device", "is_torch_device", "require"]

#: Devices of the torch path, as `--device` takes them (besides "cpu", the Rust path):
#: "cuda" (the first GPU), "cuda:N", and "torch-cpu" (torch on the CPU: tests and debugging).
TORCH_DEVICES = ("cuda", "torch-cpu")


#: What `--device` takes, for its help text.
DEVICE_HELP = "cpu (the Rust path), or with PyTorch (pip install 'meshpy-llm[cuda]'): cuda, cuda:N, torch-cpu"


def check_device(device: str) -> None:
    """Raises a clear error unless `device` can run here: "cpu", or a torch device with
    torch (and for CUDA, the GPU) present. Imports torch only for a torch device."""
    if device != "cpu":
        require(device)


def is_torch_device(device: str) -> bool:
    """Whether `device` names the torch path ("cuda", "cuda:N", "torch-cpu")."""
    return device == "torch-cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())


def require(device: str) -> str:
    """The torch device string for `device` ("cuda:0", "cpu"), after checking torch is
    installed and, for CUDA, that the GPU is there; a clear error otherwise."""
    if not is_torch_device(device):
        raise InvalidArgumentError(f"unknown device {device!r}: use cpu, cuda, cuda:N or torch-cpu")
    if importlib.util.find_spec("torch") is None:
        raise InvalidArgumentError(f"--device {device} needs PyTorch: pip install 'meshpy-llm[cuda]'")
    import torch

    if device == "torch-cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {device}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} GPU(s)")
    return f"cuda:{index}"
