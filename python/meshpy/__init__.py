"""meshpy: peer-to-peer, pipeline-parallel LLM inference."""

from __future__ import annotations

from meshpy.chat_template import render_chat
from meshpy.errors import ChatTemplateError, InvalidSamplingError, MeshpyError
from meshpy.sampling import Sampler, SamplingParams
from meshpy.tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "MeshpyError",
    "ChatTemplateError",
    "InvalidSamplingError",
    "Tokenizer",
    "IncrementalDecoder",
    "render_chat",
    "SamplingParams",
    "Sampler",
]
