"""Which layers of a served model run where: what `GET /v1/models` reports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshpy.generation import Model

__all__ = ["Coverage", "layer_coverage"]

#: A function describing the layer coverage of the served model (may block: it is called on
#: a worker thread).
Coverage = Callable[[], dict[str, Any]]


def layer_coverage(model: Model) -> Coverage | None:
    """For a mesh model, a function that looks the workers up again and describes who serves
    which layers and which nobody serves; None for a model whose layers run in this process."""
    pipeline = model.pipeline
    if not hasattr(pipeline, "refresh") or not hasattr(pipeline, "missing_layers"):
        return None

    def coverage() -> dict[str, Any]:
        providers = pipeline.refresh()
        return {
            "n_layers": model.config.n_layers,
            "providers": [
                {"peer_id": p.peer_id, "layers": [p.layers.start, p.layers.stop - 1], "sessions": p.sessions}
                for p in sorted(providers, key=lambda p: (p.layers.start, p.peer_id))
            ],
            "missing_layers": pipeline.missing_layers(),
        }

    return coverage
