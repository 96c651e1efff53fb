"""The Qwen families, Qwen2 / Qwen2.5 and Qwen3 (and their fine-tunes): the Llama layer with
q/k/v biases (Qwen2) or a per-head RMSNorm of q and k before RoPE (Qwen3), and Qwen3's own
`head_dim`. Settings come from an HF config.json (`Qwen2ForCausalLM`, `Qwen3ForCausalLM`:
the Llama keys plus `head_dim`) or GGUF metadata (`qwen2`, `qwen3`: llama.cpp's keys under
that prefix). The optional tensors are named when the checkpoint has them, as transformers'
modeling_qwen2.py / modeling_qwen3.py create them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from meshpy.models import llama
from meshpy.models.config import ModelConfig, check_layer_tensors, sliding_layers

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("qwen2", "qwen3", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# Optional roles of the span (see rust/src/model/decoder.rs), by format.
_GGUF_OPTIONAL = {
    "attn_q_bias": "blk.{i}.attn_q.bias",
    "attn_k_bias": "blk.{i}.attn_k.bias",
    "attn_v_bias": "blk.{i}.attn_v.bias",
    "attn_q_norm": "blk.{i}.attn_q_norm.weight",
    "attn_k_norm": "blk.{i}.attn_k_norm.weight",
}
_HF_OPTIONAL = {
    "attn_q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attn_k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attn_v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "attn_q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}


def _with_hf_sliding_window(base: ModelConfig, cfg: dict[str, Any], where: str) -> ModelConfig:
    """Qwen2Config / Qwen3Config: with `use_sliding_window`, layers from `max_window_layers`
    on (or those `layer_types` names "sliding_attention") see the last `sliding_window`
    positions, with the one RoPE table (modeling_qwen2.py / modeling_qwen3.py pass
    `sliding_window` to those layers' attention and build their mask with
    `create_sliding_window_causal_mask`)."""
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return base
    first = int(cfg.get("max_window_layers", 28))
    sliding = sliding_layers(cfg, base.n_layers, lambda i: i >= first, where)
    return base.with_sliding_window(int(cfg["sliding_window"]), where, sliding)


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Qwen2 / Qwen3 checkpoint."""
    config = with_optional_roles(source)
    check_layers(source, config, "Qwen")
    return config


def with_optional_roles(source: ModelSource) -> ModelConfig:
    """The Llama layer's settings and names read the Qwen way (rotate-half RoPE, the HF sliding
    window), with each layer's optional roles (biases, q/k norms) the checkpoint holds; not yet
    checked for tensors left without a role (Qwen3-MoE replaces the MLP's roles first)."""
    if source.format == "gguf":
        base = llama.from_gguf(source)  # RoPE scaling (YaRN too) as llama.cpp applies it
        optional = _GGUF_OPTIONAL
        # llama.cpp permutes q/k rows only for Llama-style archs; Qwen keeps HF's rotate-half
        # (NeoX) layout, pairs half a head apart.
        base = dataclasses.replace(base, rope_interleaved=False)
    else:
        base = _with_hf_sliding_window(llama.from_hf(source), source.config, str(source.path))
        optional = _HF_OPTIONAL
    names = set(source.checkpoint.tensor_names())
    layers = []
    for i in range(base.n_layers):
        roles = base.layer_names(i)
        roles.update({r: p.format(i=i) for r, p in optional.items() if p.format(i=i) in names})
        layers.append(roles)
    return dataclasses.replace(base, layer_tensor_names=tuple(layers))


def check_layers(source: ModelSource, config: ModelConfig, family: str) -> None:
    """Every layer's tensors have a role (`check_layer_tensors`; a missing one is named by the
    span loader)."""
    names = set(source.checkpoint.tensor_names())
    prefix = "blk.{i}." if source.format == "gguf" else "model.layers.{i}."
    for i in range(config.n_layers):
        roles = config.layer_names(i)
        check_layer_tensors(str(source.path), names, family, prefix.format(i=i), roles.values(), check_missing=False)
