"""Running the transformer layers: a pipeline of spans, each a contiguous layer range.

A local pipeline runs its spans in this process through the Rust CPU forward pass; the
mesh (remote spans on workers) plugs in behind the same interface: `new_session()`,
`forward(session, hidden)` and `forward_batch(sessions, hidden, counts)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from meshpy import _native
from meshpy.models.config import ModelConfig
from meshpy.models.source import ModelSource

__all__ = ["Pipeline", "LocalSpan", "LocalPipeline", "PipelineSession", "split_layers"]


class Pipeline(Protocol):
    """Runs every layer of a model for sessions: in this process or on the mesh."""

    max_positions: int
    #: Batches worth keeping in flight at once: 1 where one pass uses every core, more where
    #: the layers run as stages on several machines.
    in_flight: int

    def new_session(self, max_len: int | None = None) -> Any:
        """A fresh session (empty KV caches wherever its layers run)."""

    def forward(self, session: Any, hidden: np.ndarray) -> np.ndarray:
        """The last layer's output for the session's next rows; extends its caches."""

    def forward_batch(self, sessions: Sequence[Any], hidden: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """Several distinct sessions' next rows in one pass (`hidden` stacks `counts[i]` rows
        of `sessions[i]` in order); each session's rows come out as its `forward` would give
        them. When it raises, no session has changed."""

    def close_session(self, session: Any) -> None:
        """Frees the session's caches."""

    def fork(self, session: Any, n_positions: int) -> Any:
        """A new session holding a copy of the session's first `n_positions` positions
        (generations sharing a prompt prefill it once); raises when it cannot be made, leaving
        nothing behind."""


def split_layers(n_layers: int, n_spans: int) -> list[range]:
    """Cuts `0..n_layers` into `n_spans` contiguous ranges of near-equal size."""
    if not 1 <= n_spans <= n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_spans} spans")
    base, extra = divmod(n_layers, n_spans)
    ranges, start = [], 0
    for i in range(n_spans):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class LocalSpan:
    """Layers `layers` of a model, loaded from the checkpoint into this process: run by the
    Rust CPU forward pass (`device` "cpu"), or by torch (`meshpy.gpu`: "cuda", "cuda:N",
    "torch-cpu"), which copies the weights the CPU loader resolved."""

    def __init__(
        self,
        source: ModelSource,
        config: ModelConfig,
        layers: range,
        pool: _native.ThreadPool,
        quantize: str | None = None,
        progress: Callable[[int], object] | None = None,
        kv_dtype: str | None = None,
        device: str = "cpu",
    ) -> None:
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= config.n_layers:
            raise ValueError(f"layer range {layers} outside 0..{config.n_layers}")
        self.layers = layers
        source.require((n for i in layers for n in config.layer_names(i).values()), f"layers {layers.start}-{layers.stop - 1}")
        span_config = config.span_config(quantize, kv_dtype)
        names = [config.layer_names(i) for i in layers]
        native = _native.DecoderSpan(source.checkpoint, span_config, layers.start, names, pool, progress)
        self.device = device
        self.native: _native.DecoderSpan | _native.TorchSpan = native
        #: Bytes of weights held (on the device for the torch path).
        self.nbytes = native.nbytes
        if device != "cpu":
            from meshpy.gpu.backend import torch_span  # torch only when asked for

            self.native, self.nbytes = torch_span(native, span_config, device, source.checkpoint, names)

    @property
    def device_name(self) -> str:
        """Where the layers run, as a worker's status shows it: "cpu", "torch-cpu",
        "cuda:0 NVIDIA H100 80GB HBM3"."""
        return "cpu" if self.device == "cpu" else self.native.device

    @property
    def kv_dtype(self) -> str:
        """How the span's KV caches store keys and values: "f16" unless asked otherwise or
        its K and V projections, as loaded (after any `quantize`), are f32 (then "f32", so
        full-precision checkpoints match transformers to f32 rounding)."""
        return self.native.kv_dtype

    def new_cache(self, max_len: int) -> _native.KvCache:
        """An empty KV cache for one session."""
        return self.native.new_cache(max_len)

    def forward(self, hidden: np.ndarray, cache: _native.KvCache) -> np.ndarray:
        """The span's output hidden states for one session's next rows."""
        return self.native.forward(np.ascontiguousarray(hidden, dtype=np.float32), cache)

    def fork(self, cache: _native.KvCache, n_positions: int) -> _native.KvCache:
        """A new cache holding a copy of `cache`'s first `n_positions` positions."""
        return self.native.fork(cache, n_positions)

    def decode_seconds(self, width: int, batches: int = 5, batch_seconds: float = 0.01, max_steps: int = 256) -> float:
        """Seconds one decode step of one session takes here, measured: single-token steps on
        random rows `width` wide after a 4-token prompt, in `batches` runs of at least
        `batch_seconds` each (so a CPU shared in time slices is timed over whole slices); the
        fastest run's time per step (what other work on the machine took is left out)."""
        rng = np.random.default_rng(0)
        cache = self.new_cache(max_steps + 4)
        max_steps = min(max_steps, cache.max_len - 4)  # a model's context may be shorter
        self.forward(rng.standard_normal((4, width), dtype=np.float32) * 0.1, cache)
        rows = rng.standard_normal((max(max_steps, 1), 1, width), dtype=np.float32) * 0.1
        best, steps = float("inf"), 0
        for _ in range(batches):
            start, n = time.perf_counter(), 0
            while steps < max_steps and (n == 0 or time.perf_counter() - start < batch_seconds):
                self.forward(rows[steps], cache)
                steps, n = steps + 1, n + 1
            if n:
                best = min(best, (time.perf_counter() - start) / n)
        return best


class PipelineSession:
    """One generation's state across the pipeline: a KV cache per span."""

    def __init__(self, caches: Sequence[_native.KvCache]) -> None:
        self.caches = list(caches)

    @property
    def n_positions(self) -> int:
        """Positions processed so far."""
        return len(self.caches[0]) if self.caches else 0


class LocalPipeline:
    """Spans covering every layer, run one after another in this process."""

    in_flight = 1

    def __init__(self, spans: Sequence[LocalSpan], max_positions: int) -> None:
        covered = [i for s in spans for i in s.layers]
        if covered != list(range(len(covered))):
            raise ValueError(f"spans must cover the layers in order, got {[s.layers for s in spans]}")
        self.spans = list(spans)
        self.max_positions = max_positions

    def new_session(self, max_len: int | None = None) -> PipelineSession:
        """A fresh session with empty caches."""
        n = min(max_len or self.max_positions, self.max_positions)
        return PipelineSession([span.new_cache(n) for span in self.spans])

    def forward(self, session: PipelineSession, hidden: np.ndarray) -> np.ndarray:
        """Runs hidden states through every span, extending the session's caches."""
        for span, cache in zip(self.spans, session.caches):
            hidden = span.forward(hidden, cache)
        return hidden

    def forward_batch(self, sessions: Sequence[PipelineSession], hidden: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """Distinct sessions' rows (`counts[i]` rows of `sessions[i]`, stacked in order) through
        every span as one pass per span; each session's rows come out as its `forward` gives
        them. When a pass fails, every cache is cut back to where it was before the error is raised."""
        before = [[len(c) for c in s.caches] for s in sessions]
        try:
            for i, span in enumerate(self.spans):
                caches = [(s.caches[i], n) for s, n in zip(sessions, counts)]
                hidden = span.native.forward_batch(np.ascontiguousarray(hidden, dtype=np.float32), caches)
        except Exception:
            for session, lengths in zip(sessions, before):
                for cache, n in zip(session.caches, lengths):
                    if len(cache) > n:
                        cache.truncate(n)
            raise
        return hidden

    def rewind(self, session: PipelineSession, n_positions: int) -> None:
        """Forgets the session's positions from `n_positions` on (rejected draft tokens)."""
        for cache in session.caches:
            cache.truncate(n_positions)

    def close_session(self, session: PipelineSession) -> None:
        """Drops the session's caches."""
        session.caches.clear()

    def fork(self, session: PipelineSession, n_positions: int) -> PipelineSession:
        """A new session holding a copy of the session's first `n_positions` positions."""
        return PipelineSession([span.fork(cache, n_positions) for span, cache in zip(self.spans, session.caches)])
