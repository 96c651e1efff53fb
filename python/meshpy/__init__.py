"""meshpy: peer-to-peer, pipeline-parallel LLM inference.

>>> import meshpy
>>> model = meshpy.load_model("smollm2")          # doctest: +SKIP
>>> model.generate("Hello!", max_tokens=16).text  # doctest: +SKIP
"""

from __future__ import annotations

from meshpy.errors import MeshpyError
from meshpy.generation import Completion, Generation, GenerationStats, Model, load_model
from meshpy.sampling import SamplingParams

__all__ = [
    "Completion",
    "Generation",
    "GenerationStats",
    "MeshpyError",
    "Model",
    "SamplingParams",
    "load_model",
]
