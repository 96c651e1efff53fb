"""Exceptions raised by meshpy.

Every error derives from :class:`MeshpyError` and also from the builtin that fits, so
``except ValueError`` keeps working for code that does not know meshpy.
"""

from __future__ import annotations

__all__ = [
    "MeshpyError",
    "CheckpointIOError",
    "CheckpointFormatError",
    "UnsupportedTypeError",
    "UnsupportedArchitectureError",
    "MissingTensorError",
    "ShapeError",
    "ContextOverflowError",
    "InvalidArgumentError",
    "FrameError",
    "FrameTooLargeError",
    "BackendError",
    "IdentityError",
    "NetworkError",
    "RequestTimeoutError",
    "ModelSourceError",
    "ChatTemplateError",
    "InvalidSamplingError",
    "NoRouteError",
    "WorkerError",
    "VerificationError",
    "ModelFetchError",
    "format_layer_list",
]


class MeshpyError(Exception):
    """Base class of every meshpy error."""


class CheckpointIOError(MeshpyError, OSError):
    """A checkpoint file could not be opened or read."""


class CheckpointFormatError(MeshpyError, ValueError):
    """A checkpoint file is truncated or corrupt."""


class UnsupportedTypeError(MeshpyError, ValueError):
    """A tensor type (quantization or dtype) that meshpy cannot compute with."""


class UnsupportedArchitectureError(MeshpyError, ValueError):
    """A model architecture meshpy has no forward pass for."""


class MissingTensorError(MeshpyError, KeyError):
    """A tensor the model needs is absent from the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(MeshpyError, ValueError):
    """Tensor shapes that do not fit together."""


class ContextOverflowError(MeshpyError, ValueError):
    """A prompt or generation longer than the model's context or KV cache."""


class InvalidArgumentError(MeshpyError, ValueError):
    """A bad argument passed to the Rust core."""


class FrameError(MeshpyError, ValueError):
    """A malformed wire frame: bad magic, unknown version, kind or dtype, lengths that lie."""


class FrameTooLargeError(FrameError):
    """A wire frame, or one of its counts, over the receiver's limits."""


class IdentityError(MeshpyError, ValueError):
    """A node's identity key file is corrupt or not an Ed25519 key."""


class NetworkError(MeshpyError, ConnectionError):
    """A network operation failed: listen, dial, a lost connection, a DHT query, a stopped node."""


class RequestTimeoutError(MeshpyError, TimeoutError):
    """A network request or query got no answer in time."""


class BackendError(MeshpyError, RuntimeError):
    """The torch path failed to compute a span (its error, e.g. CUDA out of memory)."""


class ModelSourceError(MeshpyError, FileNotFoundError):
    """A model path that is missing or lacks the files a model needs (weights, shards)."""


class ChatTemplateError(MeshpyError, ValueError):
    """A chat template that does not compile or render, or that called ``raise_exception``."""


class InvalidSamplingError(MeshpyError, ValueError):
    """Sampling parameters out of range (negative temperature, top_p outside (0, 1], ...)."""


class NoRouteError(MeshpyError, LookupError):
    """No live workers cover some layers of the model; ``missing_layers`` names them."""

    def __init__(self, missing_layers: list[int], message: str | None = None) -> None:
        self.missing_layers = list(missing_layers)
        super().__init__(message or f"no worker serves layers {format_layer_list(self.missing_layers)}")


class WorkerError(MeshpyError, RuntimeError):
    """A worker refused a request; ``code`` is the wire error code (``unknown_session``,
    ``cannot_hold_session``, ``wrong_model``, ...), ``recoverable`` whether another provider
    of the layers may serve it (the wire's rule, ``ErrorCode::recoverable`` in the core),
    ``moved_to`` the worker holding the session now (``session_moved``: a leaving worker handed
    it over with its KV cache)."""

    def __init__(self, code: str, message: str, peer: str | None = None, *, recoverable: bool = False,
                 moved_to: str | None = None) -> None:
        self.code = code
        self.message = message
        self.peer = peer
        self.recoverable = recoverable
        self.moved_to = moved_to
        super().__init__(f"{peer + ': ' if peer else ''}{code}: {message}")


class VerificationError(MeshpyError, RuntimeError):
    """Providers of the same layers gave different outputs and no third one could say which
    is right (`--verify`); the step's output is not used."""


class ModelFetchError(MeshpyError, RuntimeError):
    """A model could not be fetched from the mesh: nobody seeds it, no seeder served a part
    intact, or the disk lacks room (the message says which)."""


def format_layer_list(layers: list[int]) -> str:
    """Layer numbers as inclusive runs, for messages: ``[0, 1, 2, 7]`` as ``0-2, 7``."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
