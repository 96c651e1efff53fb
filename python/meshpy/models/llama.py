"""The Llama family (Llama 2, 3, 3.1, 3.2, SmolLM, and their fine-tunes): settings and
tensor names, from GGUF metadata (llama.cpp's keys, `blk.N.*` names) or an HF directory
(transformers' LlamaConfig, `model.layers.N.*` names)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError
from meshpy.models import rope
from meshpy.models.config import ModelConfig

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("llama", "LlamaForCausalLM")

# Roles the Rust span takes, with each format's tensor name pattern.
_GGUF_ROLES = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "attn_q": "blk.{i}.attn_q.weight",
    "attn_k": "blk.{i}.attn_k.weight",
    "attn_v": "blk.{i}.attn_v.weight",
    "attn_output": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "ffn_gate": "blk.{i}.ffn_gate.weight",
    "ffn_up": "blk.{i}.ffn_up.weight",
    "ffn_down": "blk.{i}.ffn_down.weight",
}
_HF_ROLES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "attn_q": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_output": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{i}.mlp.down_proj.weight",
}


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Llama-family checkpoint."""
    if source.format == "gguf":
        return from_gguf(source)
    return from_hf(source)


def _get(meta: dict[str, Any], key: str, where: str) -> Any:
    if key not in meta:
        raise CheckpointFormatError(f"{where}: missing {key!r}")
    return meta[key]


def from_gguf(source: ModelSource) -> ModelConfig:
    """Settings and `blk.N.*` names from GGUF metadata under `general.architecture`'s keys
    (shared by families built on this layer, such as Qwen)."""
    meta = source.metadata
    arch = meta["general.architecture"]
    where = str(source.path)

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        return meta[full] if full in meta else (default if default is not None else _get(meta, full, where))

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", hidden // n_heads))
    n_rot = int(key("rope.dimension_count", head_dim))
    inv_freq = rope.default_inv_freq(float(key("rope.freq_base", 10000.0)), n_rot)
    names = set(source.checkpoint.tensor_names())
    if "rope_freqs.weight" in names:
        # Llama 3.1+ GGUFs carry the llama3 scaling as per-pair frequency divisors.
        factors = np.frombuffer(source.checkpoint.tensor_bytes("rope_freqs.weight"), dtype=np.float32)
        inv_freq = (inv_freq / factors).astype(np.float32)
    elif meta.get(f"{arch}.rope.scaling.type") == "linear":
        inv_freq = (inv_freq / np.float32(meta[f"{arch}.rope.scaling.factor"])).astype(np.float32)
    n_layers = int(key("block_count"))
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or int(key("vocab_size"))
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    return ModelConfig(
        architecture=arch,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        eps=float(key("attention.layer_norm_rms_epsilon")),
        vocab_size=vocab,
        max_positions=int(key("context_length")),
        rope_inv_freq=inv_freq,
        # llama.cpp's converter permutes q/k rows of Llama so pairs are adjacent.
        rope_interleaved=True,
        rope_attention_factor=1.0,
        attn_scale=1.0 / math.sqrt(head_dim),
        embedding_name="token_embd.weight",
        output_norm_name="output_norm.weight",
        output_name=output,
        embedding_scale=1.0,
        layer_tensor_names=tuple({r: p.format(i=i) for r, p in _GGUF_ROLES.items()} for i in range(n_layers)),
    )


def from_hf(source: ModelSource, rope_tables: tuple[np.ndarray, float] | None = None) -> ModelConfig:
    """Settings and `model.layers.N.*` names from an HF config.json (transformers' LlamaConfig
    keys, which the Qwen configs share). `rope_tables` (inverse frequencies, attention factor)
    replaces the RoPE read here, for families with their own keys (Phi-3)."""
    cfg = source.config
    where = str(source.path / "config.json") if source.path.is_dir() else str(source.path)
    hidden = int(_get(cfg, "hidden_size", where))
    n_heads = int(_get(cfg, "num_attention_heads", where))
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    rope_params = cfg.get("rope_parameters") or {}
    base = float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    inv_freq, attention_factor = rope_tables or rope.scaled_inv_freq(base, head_dim, scaling)
    n_layers = int(_get(cfg, "num_hidden_layers", where))
    tied = bool(cfg.get("tie_word_embeddings", False))
    names = set(source.checkpoint.tensor_names())
    output = "lm_head.weight" if "lm_head.weight" in names and not tied else "model.embed_tokens.weight"
    return ModelConfig(
        architecture=str((cfg.get("architectures") or ["LlamaForCausalLM"])[0]),
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        vocab_size=int(_get(cfg, "vocab_size", where)),
        max_positions=int(cfg.get("max_position_embeddings", 2048)),
        rope_inv_freq=inv_freq,
        rope_interleaved=False,
        rope_attention_factor=attention_factor,
        attn_scale=1.0 / math.sqrt(head_dim),
        embedding_name="model.embed_tokens.weight",
        output_norm_name="model.norm.weight",
        output_name=output,
        embedding_scale=1.0,
        layer_tensor_names=tuple({r: p.format(i=i) for r, p in _HF_ROLES.items()} for i in range(n_layers)),
    )
