"""The End model: the part of a model that stays on the node taking the request.

It holds the tokenizer, the chat template, the token embedding, the final norm and the
output head; text never leaves it, the layers in between only ever see hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meshpy import _native
from meshpy.chat_template import render_chat
from meshpy.errors import ChatTemplateError, ContextOverflowError
from meshpy.models.config import ModelConfig, default_chat_template
from meshpy.models.source import ModelSource
from meshpy.tokenizer import Tokenizer

__all__ = ["EndModel", "Prompt"]

#: A prompt: plain text, or chat messages (`[{"role": ..., "content": ...}, ...]`).
Prompt = str | Sequence[dict[str, Any]]


class EndModel:
    """Tokenizer, chat template, embedding and head of one model; the embedding and head run
    on the Rust CPU path, or with torch on `device` (see `meshpy.gpu`)."""

    def __init__(self, source: ModelSource, config: ModelConfig, pool: _native.ThreadPool, device: str = "cpu") -> None:
        self.source = source
        self.config = config
        if source.format == "gguf":
            self.tokenizer = Tokenizer.from_gguf_metadata(source.metadata)
        elif source.tokenizer_json is not None:
            self.tokenizer = Tokenizer.from_hf_files(
                source.tokenizer_json, source.tokenizer_config, source.generation_config
            )
        else:
            raise FileNotFoundError(f"{source.path}: no tokenizer.json beside the weights")
        self.chat_template = source.chat_template or default_chat_template(source)
        source.require({config.embedding_name, config.output_norm_name, config.output_name}, "the End model")
        self.device = device
        if device == "cpu":
            self.embedding = _native.TokenEmbedding(source.checkpoint, config.embedding_name, config.embedding_scale)
            self.head = _native.OutputHead(
                source.checkpoint, config.output_norm_name, config.output_name, config.eps, pool,
                norm_offset=config.norm_offset,
            )
        else:
            self.embedding, self.head = _torch_end(source, config, device)
        # Gemma 4's per-layer inputs, which depend on the token ids: computed here, so ids
        # never leave this node; the spans get them with the hidden states.
        self.per_layer_inputs = None
        if config.per_layer_names is not None:
            source.require(config.per_layer_names, "the End model")
            table, proj, norm = config.per_layer_names
            self.per_layer_inputs = _native.PerLayerInputs(
                source.checkpoint, table, proj, norm, config.per_layer_input, config.eps, pool
            )

    def encode(self, prompt: Prompt, *, raw: bool = False, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt. Messages always go through the chat template (with `tools`,
        the functions the model may call, for a template that renders them); a string does
        too (as one user message) unless `raw`."""
        if isinstance(prompt, str) and raw:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        # The template writes any BOS itself, so special tokens are not added again.
        return self.tokenizer.encode(self.render(messages, tools), add_special_tokens=False)

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The chat template applied to messages (and `tools`), ending with the assistant's turn."""
        if not self.chat_template:
            raise ChatTemplateError(
                f"{self.source.path} ships no chat template; pass raw text instead (--raw)"
            )
        return render_chat(
            self.chat_template,
            list(messages),
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_text or "",
            eos_token=self.tokenizer.eos_text or "",
            tools=list(tools) if tools else None,
        )

    def check_context(self, n_prompt: int, max_new: int = 0) -> None:
        """Raises when a prompt does not fit the model's context."""
        limit = self.config.max_positions
        if n_prompt >= limit:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens; the model's context holds {limit}"
            )

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """Rows `(len(ids), width)` entering the first layer: the hidden states, followed by
        every layer's per-layer inputs for a model with them (Gemma 4 E2B/E4B)."""
        ids = list(ids)
        hidden = self.embedding.lookup(ids)
        if self.per_layer_inputs is None:
            return hidden
        return np.concatenate([hidden, self.per_layer_inputs.compute(ids, hidden)], axis=1)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits `(rows, vocab)` from the last layer's hidden states (soft-capped where the
        model caps them)."""
        logits = self.head.logits(np.ascontiguousarray(hidden, dtype=np.float32))
        cap = self.config.final_logit_softcap
        return logits if cap is None else (np.tanh(logits / np.float32(cap)) * np.float32(cap)).astype(np.float32)

    def samplable(self, logits: np.ndarray) -> np.ndarray:
        """One row of logits with the head's rows past the tokenizer's vocabulary (padding
        some checkpoints carry) set to -inf: they name no token, so are never sampled."""
        n_tokens = self.tokenizer.vocab_size
        if logits.shape[-1] > n_tokens:
            logits = logits.copy()
            logits[n_tokens:] = -np.inf
        return logits


def _torch_end(source: ModelSource, config: ModelConfig, device: str) -> tuple[Any, Any]:
    """The embedding and head on a torch device (imports torch: only when asked for)."""
    from meshpy.gpu import require
    from meshpy.gpu.backend import compute_dtype
    from meshpy.gpu.end import TorchEmbedding, TorchHead

    torch_device = require(device)
    dtype = compute_dtype(torch_device)
    checkpoint = source.checkpoint
    embedding = TorchEmbedding(checkpoint, config.embedding_name, config.embedding_scale, torch_device, dtype)
    tied = embedding.table if config.output_name == config.embedding_name else None
    head = TorchHead(checkpoint, config.output_norm_name, config.output_name, config.eps, config.norm_offset,
                     torch_device, dtype, tied=tied)
    return embedding, head
