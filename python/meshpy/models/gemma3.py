"""Gemma 3's text model (`Gemma3ForCausalLM`, model_type `gemma3_text`): the Llama layer with
Gemma's options, following transformers' models/gemma3/modeling_gemma3.py:

- every RMSNorm (layer norms, q/k norms, the final norm) computes `x_normed * (1 + weight)`
  in f32 (Gemma3RMSNorm): the span and head add `norm_offset = 1` to the weights at load;
- four norms per layer (Gemma3DecoderLayer): `input_layernorm` before attention,
  `post_attention_layernorm` on the attention output before the residual add,
  `pre_feedforward_layernorm` before the MLP, `post_feedforward_layernorm` on its output;
- per-head q/k norms before RoPE (Gemma3Attention's `q_norm` / `k_norm`, as Qwen3);
- a GELU-tanh gated MLP (`hidden_activation="gelu_pytorch_tanh"`);
- scores scaled by `query_pre_attn_scalar ** -0.5`;
- sliding-window layers (`layer_types`, else `sliding_window_pattern`: every 6th layer is
  global) see the last `sliding_window` positions and rotate with the local base
  (`rope_parameters["sliding_attention"]` / `rope_local_base_freq`, unscaled); global
  layers use `rope_theta` with any `rope_scaling`;
- the embedding is scaled by `sqrt(hidden)` cast to the weight's dtype
  (Gemma3TextScaledWordEmbedding).

GGUF `gemma3` files are read as llama.cpp reads them (src/llama-model.cpp, LLM_ARCH_GEMMA3,
and its gemma3 graph): the converter has already added 1 to every norm weight, RoPE is NeoX
(rotate-half, q/k not permuted), every 6th layer is global and the others slide over
`gemma3.attention.sliding_window` positions with base 10000, queries are scaled by
`1/sqrt(key_length)`, and the embedding by `sqrt(hidden)` in f32.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError
from meshpy.models import llama, rope
from meshpy.models.config import ModelConfig, check_layer_tensors, sliding_layers

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("gemma3", "Gemma3ForCausalLM", "gemma3_text")

# Roles of one layer (see rust/src/model/decoder.rs) -> HF names (modeling_gemma3.py): Llama's,
# with q/k norms and Gemma's four norms (its `post_attention_layernorm` follows attention).
_HF_ROLES = {
    **llama._HF_ROLES,
    "attn_q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "ffn_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}

# Gemma's chat format, for checkpoints that ship no template (llama.cpp's gemma3 GGUFs often
# don't; llama.cpp then falls back to the same built-in format): turns of
# `<start_of_turn>{user|model}\n...<end_of_turn>\n`, a system message folded into the first
# user turn, as Gemma 3's own tokenizer_config.json template does for text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# The same roles in llama.cpp's GGUF names (its `ffn_norm` is the pre-feedforward norm).
_GGUF_ROLES = {
    **llama._GGUF_ROLES,
    "attn_q_norm": "blk.{i}.attn_q_norm.weight",
    "attn_k_norm": "blk.{i}.attn_k_norm.weight",
    "attn_post_norm": "blk.{i}.post_attention_norm.weight",
    "ffn_post_norm": "blk.{i}.post_ffw_norm.weight",
}

# llama.cpp's fixed settings for gemma3 (llama_model::load_hparams): every 6th layer is
# global, and sliding layers rotate with base 10000, unscaled.
_GGUF_SWA_PATTERN = 6
_GGUF_LOCAL_THETA = 10_000.0

# Gemma3TextConfig's defaults for keys a config.json may leave out.
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def _rope_params(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rotary settings per layer type, from the nested `rope_parameters` (transformers 5) or
    the older flat keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`), as
    Gemma3TextConfig.convert_rope_params_to_dict reads them."""
    nested = cfg.get("rope_parameters") or {}
    full = dict(nested.get("full_attention") or {})
    local = dict(nested.get("sliding_attention") or {})
    if cfg.get("rope_scaling"):
        full.update(cfg["rope_scaling"])
    full.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA["full_attention"]))
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", _DEFAULT_THETA["sliding_attention"]))
    return {"full_attention": full, "sliding_attention": local}


def _inv_freq(params: dict[str, Any], head_dim: int, where: str) -> tuple[np.ndarray, float]:
    scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    try:
        return rope.scaled_inv_freq(float(params["rope_theta"]), head_dim, scaling)
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{where}: {err}") from None


def _round_to_bf16(x: np.float32) -> np.float32:
    """`x` rounded to the nearest bfloat16 (ties to even), as torch's `.to(torch.bfloat16)`."""
    bits = np.array([x], dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.float32(rounded.view(np.float32)[0])


def embedding_scale(source: ModelSource, embedding_name: str, hidden: int) -> np.float32:
    """`sqrt(hidden)` cast to the embedding's dtype, as Gemma's ScaledWordEmbedding multiplies
    by it (transformers' Gemma3/Gemma4TextScaledWordEmbedding: `embed_scale.to(dtype)`)."""
    scale = np.float32(hidden**0.5)
    dtype = source.checkpoint.tensor_info(embedding_name)[0].lower()
    if dtype == "bf16":
        return _round_to_bf16(scale)
    if dtype == "f16":
        return np.float32(np.float16(scale))
    return scale


def _layer_roles(source: ModelSource, n_layers: int, patterns: dict[str, str], prefix: str) -> tuple[dict[str, str], ...]:
    """Every layer's role -> name map, each layer's tensors checked (`check_layer_tensors`)."""
    names = set(source.checkpoint.tensor_names())
    layers = []
    for i in range(n_layers):
        roles = {r: p.format(i=i) for r, p in patterns.items()}
        check_layer_tensors(str(source.path), names, "Gemma 3", prefix.format(i=i), roles.values())
        layers.append(roles)
    return tuple(layers)


def _from_gguf(source: ModelSource) -> ModelConfig:
    """Settings and `blk.N.*` names from a llama.cpp `gemma3` GGUF."""
    meta = source.metadata
    where = str(source.path)
    for key in ("gemma3.attn_logit_softcapping", "gemma3.final_logit_softcapping"):
        if meta.get(key) is not None:
            raise CheckpointFormatError(f"{where}: {key} is not supported")
    scaling = meta.get("gemma3.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise CheckpointFormatError(f"{where}: GGUF rope scaling {scaling!r} is not supported yet")
    # llama.from_gguf reads the global layers' RoPE (base, linear scaling) and the shapes.
    base = llama.from_gguf(source)
    if base.rope_attention_factor != 1.0:
        # The span's local table carries no attention factor (rust/src/model/decoder.rs).
        raise CheckpointFormatError(f"{where}: gemma3.rope.scaling.attn_factor is not supported")
    n_layers, head_dim = base.n_layers, base.head_dim
    n_rot = len(base.rope_inv_freq) * 2
    window = meta.get("gemma3.attention.sliding_window")
    if not isinstance(window, int) or window <= 0:
        raise CheckpointFormatError(f"{where}: missing or bad 'gemma3.attention.sliding_window'")
    return dataclasses.replace(
        base,
        rope_interleaved=False,
        attn_scale=1.0 / float(np.sqrt(np.float32(head_dim))),
        embedding_scale=float(np.sqrt(np.float32(base.hidden))),
        layer_tensor_names=_layer_roles(source, n_layers, _GGUF_ROLES, "blk.{i}."),
        gelu_tanh=True,
        layer_sliding=tuple(i % _GGUF_SWA_PATTERN < _GGUF_SWA_PATTERN - 1 for i in range(n_layers)),
        sliding_window=window,
        rope_local_inv_freq=rope.default_inv_freq(_GGUF_LOCAL_THETA, n_rot),
    )


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Gemma 3 text checkpoint (HF layout or GGUF)."""
    if source.format == "gguf":
        return _from_gguf(source)
    cfg = source.config
    where = str(source.path)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise CheckpointFormatError(f"{where}: {key} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise CheckpointFormatError(f"{where}: bidirectional attention is not supported")
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise CheckpointFormatError(f"{where}: hidden_activation {activation!r} is not supported")

    base = llama.from_hf(source)
    n_layers, hidden, head_dim = base.n_layers, base.hidden, base.head_dim
    pattern = int(cfg.get("sliding_window_pattern", 6))
    sliding = sliding_layers(cfg, n_layers, lambda i: (i + 1) % pattern != 0, where)
    params = _rope_params(cfg)
    inv_freq, attention_factor = _inv_freq(params["full_attention"], head_dim, where)
    local_inv_freq, local_factor = _inv_freq(params["sliding_attention"], head_dim, where)
    if local_factor != 1.0 and any(sliding):
        raise CheckpointFormatError(f"{where}: scaled RoPE on sliding-window layers is not supported")

    scale = embedding_scale(source, base.embedding_name, hidden)

    return dataclasses.replace(
        base,
        architecture=str((cfg.get("architectures") or ["Gemma3ForCausalLM"])[0]),
        rope_inv_freq=inv_freq,
        rope_attention_factor=attention_factor,
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        embedding_scale=float(scale),
        layer_tensor_names=_layer_roles(source, n_layers, _HF_ROLES, "model.layers.{i}."),
        norm_offset=1.0,
        gelu_tanh=True,
        layer_sliding=sliding,
        sliding_window=int(cfg.get("sliding_window", 4096)),
        rope_local_inv_freq=local_inv_freq,
    )


__all__ = ["ARCHITECTURES", "CHAT_TEMPLATE", "read_config"]
