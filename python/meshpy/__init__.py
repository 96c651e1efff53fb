"""meshpy: peer-to-peer, pipeline-parallel LLM inference.

>>> import meshpy
>>> model = meshpy.load_model("smollm2")          # doctest: +SKIP
>>> model.generate("Hello!", max_tokens=16).text  # doctest: +SKIP
"""

from __future__ import annotations

from meshpy.chat_template import render_chat
from meshpy.client import Client, connect
from meshpy.errors import ChatTemplateError, InvalidSamplingError, MeshpyError
from meshpy.generation import Completion, Generation, GenerationStats, Model, load_model
from meshpy.sampling import Sampler, SamplingParams
from meshpy.server import AppServer, create_app
from meshpy.tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "AppServer",
    "ChatTemplateError",
    "Client",
    "Completion",
    "Generation",
    "GenerationStats",
    "IncrementalDecoder",
    "InvalidSamplingError",
    "MeshpyError",
    "Model",
    "Sampler",
    "SamplingParams",
    "Tokenizer",
    "connect",
    "create_app",
    "load_model",
    "render_chat",
]
