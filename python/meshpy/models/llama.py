"""The Llama family (Llama 2, 3, 3.1, 3.2, SmolLM, and their fine-tunes): settings and
tensor names, from GGUF metadata (llama.cpp's keys, `blk.N.*` names) or an HF directory
(transformers' LlamaConfig, `model.layers.N.*` names).

RoPE as each format configures it. HF: `rope_parameters` (transformers 5) or the older
`rope_theta` + `rope_scaling`, with types `default` (Llama 2; Llama 3 with theta 5e5),
`llama3` (3.1, 3.2), `linear` and `yarn`, computed in rope.py as transformers'
modeling_rope_utils.py does; `dynamic` and unknown types are refused by name. GGUF: as
llama.cpp's load_hparams reads it: `rope_freqs.weight` (the llama3 scaling as per-pair
divisors), `rope.scaling.type` linear (the default), none or yarn, with
`rope.scaling.factor` (see `_gguf_rope`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError
from meshpy.models import rope
from meshpy.models.config import ModelConfig

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

log = logging.getLogger(__name__)

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
    """Settings and names from a Llama-family checkpoint. A GGUF's
    `llama.attention.sliding_window`, which llama.cpp's converter never writes for this
    architecture, is honoured on every layer when positive (see mistral.py)."""
    if source.format == "gguf":
        window = source.metadata.get("llama.attention.sliding_window")
        return from_gguf(source).with_sliding_window(int(window) if window else None, str(source.path))
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
    names = set(source.checkpoint.tensor_names())
    inv_freq, attention_factor = _gguf_rope(source, arch, n_rot, float(key("rope.freq_base", 10000.0)), names)
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
        rope_attention_factor=attention_factor,
        attn_scale=1.0 / math.sqrt(head_dim),
        embedding_name="token_embd.weight",
        output_norm_name="output_norm.weight",
        output_name=output,
        embedding_scale=1.0,
        layer_tensor_names=tuple({r: p.format(i=i) for r, p in _GGUF_ROLES.items()} for i in range(n_layers)),
    )


# YaRN keys llama.cpp's converter writes from an HF config (beta_fast, beta_slow,
# extrapolation_factor, attention_factor) or for DeepSeek (yarn_log_multiplier), which
# llama.cpp's load_hparams never reads for llama, qwen2 or qwen3 (only grok, deepseek2 and
# a few others do): it runs these archs with llama-hparams.h's defaults instead (beta_fast
# 32, beta_slow 1, ext_factor 1 for YaRN, no log multiplier) and YaRN's own attention factor.
_GGUF_YARN_IGNORED = (
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    "rope.scaling.yarn_ext_factor",
    "rope.scaling.yarn_attn_factor",
    "rope.scaling.yarn_log_multiplier",
)


def _gguf_rope(source: ModelSource, arch: str, n_rot: int, base: float, names: set[str]) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies and the cos/sin factor of a GGUF, as llama.cpp reads the
    keys (llama-model.cpp, load_hparams; llama-context.cpp, the llama_context constructor) and
    ggml applies them (ggml-cpu/ops.cpp, `rope_yarn`):

    - `rope_freqs.weight` (Llama 3.1+: the llama3 scaling as per-pair divisors of the
      frequency), applied before any scaling type;
    - type `rope.scaling.type`, `linear` when absent; factor `rope.scaling.factor` or the older
      `rope.scale_linear` (1 when absent or 0); `none` never scales, `linear` divides every
      frequency by the factor;
    - `yarn`: ggml mixes, per pair, the frequency divided by the factor with the unscaled one,
      weighted by the ramp over the correction dims of beta_fast 32 and beta_slow 1 and
      `rope.scaling.original_context_length` (default `context_length`), which is
      transformers' YaRN (rope.yarn_extrapolation says where the two differ); ext_factor is 1;
    - cos and sin times `rope.scaling.attn_factor` (default 1), and for YaRN times
      `1 + 0.1 ln(factor)` (rope.yarn_mscale: ggml's `rope_yarn` multiplies by it; since
      ggml-org/llama.cpp#17945 the context cancels that and applies `get_mscale` instead, the
      same for factor >= 1, and 1 below it).

    Unlike transformers, llama.cpp never takes beta_fast / beta_slow, ext_factor,
    `yarn_attn_factor` (HF's explicit attention_factor) or the DeepSeek log multiplier from
    these archs' GGUFs: ignored here too, with a warning when they ask for other values than
    llama.cpp uses (`_GGUF_YARN_IGNORED`). Any other type is refused."""
    meta = source.metadata
    where = str(source.path)
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")
    factor = float(meta.get(f"{arch}.rope.scaling.factor") or meta.get(f"{arch}.rope.scale_linear") or 1.0)
    attention_factor = float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    inv_freq = rope.default_inv_freq(base, n_rot)
    if "rope_freqs.weight" in names:
        factors = np.frombuffer(source.checkpoint.tensor_bytes("rope_freqs.weight"), dtype=np.float32)
        if factors.shape != inv_freq.shape:
            raise CheckpointFormatError(f"{where}: rope_freqs.weight has {factors.size} values, expected {inv_freq.size}")
        inv_freq = (inv_freq / factors).astype(np.float32)
    if kind == "none":
        return inv_freq, attention_factor
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), attention_factor
    if kind == "yarn":
        used = dict(zip(_GGUF_YARN_IGNORED, (32.0, 1.0, 1.0, rope.yarn_mscale(factor), 0.0), strict=True))
        ignored = {
            f"{arch}.{k}": meta[f"{arch}.{k}"]
            for k in _GGUF_YARN_IGNORED
            if f"{arch}.{k}" in meta and not math.isclose(float(meta[f"{arch}.{k}"]), used[k], rel_tol=1e-6)
        }
        if ignored:
            log.warning("%s: ignoring %s, as llama.cpp does for %s", where, ignored, arch)
        old_ctx = float(
            meta.get(f"{arch}.rope.scaling.original_context_length") or _get(meta, f"{arch}.context_length", where)
        )
        extrapolation = rope.yarn_extrapolation(base, n_rot, old_ctx, beta_fast=32.0, beta_slow=1.0)
        interpolation = (inv_freq / np.float32(factor)).astype(np.float32)
        mixed = interpolation * (1 - extrapolation) + inv_freq * extrapolation
        return mixed.astype(np.float32), attention_factor * rope.yarn_mscale(factor)
    raise CheckpointFormatError(f"{where}: unknown GGUF rope scaling type {kind!r}; supported: none, linear, yarn")


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
    try:
        inv_freq, attention_factor = rope_tables or rope.scaled_inv_freq(base, head_dim, scaling)
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{where}: {err}") from None
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
