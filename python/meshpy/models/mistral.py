"""Mistral (`MistralForCausalLM`, model_type `mistral`: Mistral 7B v0.1-v0.3, Mistral-Nemo
and their fine-tunes): the Llama layer, as transformers' models/mistral/modeling_mistral.py
builds it, with two differences read from config.json:

- an explicit `head_dim` (Mistral-Nemo: 128 with hidden 5120 and 32 heads), which
  `llama.from_hf` already reads;
- `sliding_window`: when not null, MistralModel builds `create_sliding_window_causal_mask`
  for every layer (masking_utils.py: `sliding_window_overlay`, `kv_idx > q_idx -
  sliding_window` and causal), so a query at position p sees keys `p - window < k <= p`:
  `window` positions, itself included. That is the span's `sliding_window`, with every layer
  sliding and the local rotary table equal to the global one (Mistral has one rope). A
  window that covers `max_position_embeddings` changes nothing and is dropped.

A `layer_types` key in a Mistral config does not change MistralModel's mask (transformers
warns and points to Ministral), so it is ignored here too.

GGUF Mistral is llama.cpp's `llama` architecture and loads through llama.py. llama.cpp
reads no sliding window for `llama` (its converter writes none for MistralForCausalLM, and
load_hparams reads no `llama.attention.sliding_window`), so it runs Mistral 7B v0.1 with
full causal attention, which differs from transformers only past 4096 positions. We do the
same when the key is absent; when a GGUF does carry a positive
`llama.attention.sliding_window`, we apply it to every layer as transformers would (see
llama.read_config): the key means the same window wherever llama.cpp reads it
(`LLAMA_SWA_TYPE_STANDARD` masks `p - k >= n_swa`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from meshpy.errors import CheckpointFormatError, UnsupportedArchitectureError
from meshpy.models import llama
from meshpy.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, check_layer_tensors

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("MistralForCausalLM", "mistral")


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Mistral checkpoint (HF layout)."""
    if source.format == "gguf":  # general.architecture "mistral": no llama.cpp converter writes it
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture 'mistral' in {source.path} (llama.cpp writes Mistral as 'llama'); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = source.config
    where = str(source.path)
    activation = cfg.get("hidden_act", "silu")
    if activation != "silu":
        raise CheckpointFormatError(f"{where}: hidden_act {activation!r} is not supported (Mistral uses silu)")
    base = llama.from_hf(source)

    names = set(source.checkpoint.tensor_names())
    for i in range(base.n_layers):
        check_layer_tensors(where, names, "Mistral", f"model.layers.{i}.", base.layer_names(i).values())

    base = dataclasses.replace(base, architecture=str((cfg.get("architectures") or ["MistralForCausalLM"])[0]))
    window = cfg.get("sliding_window")
    return base.with_sliding_window(None if window is None else int(window), where)


__all__ = ["ARCHITECTURES", "read_config"]
