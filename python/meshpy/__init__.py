"""meshpy: peer-to-peer, pipeline-parallel LLM inference."""

from __future__ import annotations

from meshpy.errors import MeshpyError

__all__ = ["MeshpyError"]
