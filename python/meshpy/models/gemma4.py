"""Gemma 4's text model (`Gemma4ForCausalLM`, model_type `gemma4_text`; the text part of
`Gemma4ForConditionalGeneration`), following transformers 5.14's models/gemma4/
modeling_gemma4.py (docs/gemma4-reading-notes.md has the details and line citations):

- the Gemma 3 layer (four norms, q/k norms, GELU-tanh MLP, sliding-window layers) with plain
  `x * weight` RMSNorms (no `1 +`), attention scaled by 1.0, and values RMS-normed per head
  without a weight (`v_norm`);
- global layers with their own head width (`global_head_dim`) and, with `attention_k_eq_v`,
  their own key/value heads (`num_global_key_value_heads`) and no `v_proj`: values are the
  keys' projection before the k norm;
- "proportional" RoPE on global layers (rope.py), the default on sliding ones;
- `layer_scalar` multiplying the whole hidden state at each layer's end;
- KV sharing (`num_kv_shared_layers`): the last layers attend over the keys and values of the
  last earlier layer of their type (`store_full_length_kv`) and have no k/v projections; a
  span boundary between them carries the source's keys and values with the hidden states
  (`DecoderConfig::row_width` in rust/src/model/decoder.rs);
- the double-wide MLP of KV-shared layers (`use_double_wide_mlp`): only their tensors' shapes;
- per-layer inputs (E2B/E4B, `hidden_size_per_layer_input`): computed by the End model from the
  token ids and the scaled embedding (`_native.PerLayerInputs`), carried with the hidden states
  to the spans, which add `post_norm(proj(gelu_tanh(gate(x)) * input))` after each MLP;
- the final logits soft-capped: `cap * tanh(logits / cap)` (`final_logit_softcapping`);
- the 26B-A4B block (`enable_moe_block`): experts beside each layer's dense MLP, routed from
  the raw residual (Gemma4TextRouter), three more norms (`Ffn::Parallel` in decoder.rs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError
from meshpy.models import gemma3, llama, rope
from meshpy.models.config import ModelConfig, MoeSettings, check_layer_tensors, sliding_layers

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("Gemma4ForCausalLM", "gemma4_text", "Gemma4ForConditionalGeneration", "gemma4")

# Roles of one layer (see rust/src/model/decoder.rs) -> HF names under the text model's prefix:
# Gemma 3's layer (same tensor names), plus `layer_scalar`.
_HF_LAYER = {
    **{role: name.removeprefix("model.") for role, name in gemma3._HF_ROLES.items()},
    "layer_output_scale": "layers.{i}.layer_scalar",
}
# The roles a KV-shared layer lacks.
_OWN_KV = ("attn_k", "attn_v", "attn_k_norm")
# The 26B-A4B block (`enable_moe_block`): experts beside the dense MLP, three more norms.
_HF_MOE = {
    "ffn_gate_inp": "layers.{i}.router.proj.weight",
    "ffn_gate_inp_scale": "layers.{i}.router.scale",
    "ffn_down_exps_scale": "layers.{i}.router.per_expert_scale",
    "ffn_gate_up_exps": "layers.{i}.experts.gate_up_proj",
    "ffn_down_exps": "layers.{i}.experts.down_proj",
    "ffn_post_norm_1": "layers.{i}.post_feedforward_layernorm_1.weight",
    "ffn_pre_norm_2": "layers.{i}.pre_feedforward_layernorm_2.weight",
    "ffn_post_norm_2": "layers.{i}.post_feedforward_layernorm_2.weight",
}
_HF_PER_LAYER = {
    "ple_gate": "layers.{i}.per_layer_input_gate.weight",
    "ple_proj": "layers.{i}.per_layer_projection.weight",
    "ple_post_norm": "layers.{i}.post_per_layer_input_norm.weight",
}

# Gemma4TextConfig's defaults for keys a config.json may leave out.
_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _text_config(source: ModelSource) -> tuple[dict[str, Any], str]:
    """The text model's config and its tensors' prefix: `model.` for Gemma4ForCausalLM,
    `model.language_model.` inside the multimodal checkpoint."""
    cfg = source.config
    if "text_config" in cfg:
        return dict(cfg["text_config"]), "model.language_model."
    return cfg, "model."


def kv_sources(layer_types: tuple[bool, ...], n_shared: int) -> tuple[int | None, ...]:
    """Per layer, the layer whose keys and values it attends over (None: its own): each of the
    last `n_shared` layers shares the last earlier layer of its type (transformers'
    Gemma4TextAttention, `store_full_length_kv` / `kv_shared_layer_index`)."""
    n = len(layer_types)
    first_shared = n - n_shared
    out: list[int | None] = []
    for i, sliding in enumerate(layer_types):
        if n_shared <= 0 or i < first_shared:
            out.append(None)
            continue
        sources = [j for j in range(first_shared) if layer_types[j] == sliding]
        if not sources:
            raise CheckpointFormatError(f"KV-shared layer {i} has no earlier layer of its type to share")
        out.append(sources[-1])
    return tuple(out)


def _inv_freq(params: dict[str, Any], head_dim: int, where: str) -> np.ndarray:
    scaling = params if params.get("rope_type", "default") != "default" else None
    try:
        inv_freq, factor = rope.scaled_inv_freq(float(params["rope_theta"]), head_dim, scaling)
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{where}: {err}") from None
    if factor != 1.0:
        raise CheckpointFormatError(f"{where}: RoPE with an attention factor is not supported for Gemma 4")
    return inv_freq


# The same roles in llama.cpp's GGUF names (conversion/gemma.py, Gemma4Model; src/models/
# gemma4.cpp, load_arch_tensors).
_GGUF_LAYER = {**gemma3._GGUF_ROLES, "layer_output_scale": "blk.{i}.layer_output_scale.weight"}
_GGUF_MOE = {
    "ffn_gate_inp": "blk.{i}.ffn_gate_inp.weight",
    "ffn_gate_inp_scale": "blk.{i}.ffn_gate_inp.scale",
    "ffn_down_exps_scale": "blk.{i}.ffn_down_exps.scale",
    "ffn_gate_up_exps": "blk.{i}.ffn_gate_up_exps.weight",
    "ffn_down_exps": "blk.{i}.ffn_down_exps.weight",
    "ffn_post_norm_1": "blk.{i}.post_ffw_norm_1.weight",
    "ffn_pre_norm_2": "blk.{i}.pre_ffw_norm_2.weight",
    "ffn_post_norm_2": "blk.{i}.post_ffw_norm_2.weight",
}
_GGUF_PER_LAYER = {"ple_gate": "blk.{i}.inp_gate.weight", "ple_proj": "blk.{i}.proj.weight", "ple_post_norm": "blk.{i}.post_norm.weight"}


def _layer_roles(
    where: str,
    names: set[str],
    layer_prefix: str,
    layer: dict[str, str],
    extras: dict[str, str],
    moe: dict[str, str],
    sources: tuple[int | None, ...],
    values_from_keys: Callable[[int], bool],
    has_experts: Callable[[int], bool],
) -> tuple[dict[str, str], ...]:
    """Every layer's role -> name map from the format's patterns (`layer`, plus `extras`: the
    per-layer inputs' roles when the model has them, and `moe` where `has_experts`), each
    layer's tensors (those under `layer_prefix`) checked (`check_layer_tensors`). A KV-shared layer has no k/v roles (its
    own k/v tensors, if any, are ignored, as transformers and llama.cpp ignore them); a layer
    whose values are its keys' projection (`values_from_keys`) has no `attn_v`; the
    `layer_output_scale` is optional (1 when absent, as llama.cpp's TENSOR_NOT_REQUIRED)."""
    out = []
    for i, source in enumerate(sources):
        roles = {r: p.format(i=i) for r, p in {**layer, **extras, **(moe if has_experts(i) else {})}.items()}
        own_kv = {r: roles.pop(r) for r in _OWN_KV}
        if source is None:
            roles.update(own_kv)
            if values_from_keys(i):
                del roles["attn_v"]
        if roles["layer_output_scale"] not in names:
            del roles["layer_output_scale"]
        ignored = set(own_kv.values()) if source is not None else set()
        check_layer_tensors(where, names - ignored, "Gemma 4", layer_prefix.format(i=i), roles.values())
        out.append(roles)
    return tuple(out)


def _from_gguf(source: ModelSource) -> ModelConfig:
    """Settings and `blk.N.*` names from a llama.cpp `gemma4` GGUF, read as llama.cpp reads
    them (llama_model_gemma4::load_arch_hparams / load_arch_tensors and its graph):

    - `attention.sliding_window_pattern` marks sliding layers; their head width is
      `key_length_swa`, the global layers' `key_length`; KV heads a scalar or per layer;
    - a KV-shared layer (the last `attention.shared_kv_layers`) shares layer
      `first_shared - 2` when sliding, `first_shared - 1` when global (llama.cpp's fixed
      mapping, llama-model.cpp), so those layers must have the right types;
    - global layers rotate over the whole head with base `rope.freq_base`, each pair's
      frequency divided by `rope_freqs.weight` (the converter's 1e30 stands for "does not
      rotate": the proportional RoPE); sliding layers over `rope.dimension_count_swa` with
      `rope.freq_base_swa`;
    - the embedding is scaled by sqrt(hidden) in f32, norms are plain, attention scaled by 1.
    """
    meta = source.metadata
    where = str(source.path)
    names = set(source.checkpoint.tensor_names())

    def key(name: str, default: Any = None) -> Any:
        full = f"gemma4.{name}"
        if full in meta:
            return meta[full]
        if default is None:
            raise CheckpointFormatError(f"{where}: missing {full!r}")
        return default

    n_layers, hidden = int(key("block_count")), int(key("embedding_length"))
    sliding = tuple(bool(x) for x in key("attention.sliding_window_pattern"))
    if len(sliding) != n_layers:
        raise CheckpointFormatError(f"{where}: a sliding-window pattern of {len(sliding)} layers for {n_layers}")
    head_dim, global_head_dim = int(key("attention.key_length_swa")), int(key("attention.key_length"))
    kv = key("attention.head_count_kv")
    kv_per_layer = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * n_layers
    n_kv = next((k for k, s in zip(kv_per_layer, sliding) if s), kv_per_layer[0])
    global_kv = next((k for k, s in zip(kv_per_layer, sliding) if not s), n_kv)
    if any(k != (n_kv if s else global_kv) for k, s in zip(kv_per_layer, sliding)):
        raise CheckpointFormatError(f"{where}: KV heads {kv_per_layer} differ within a layer type")
    n_shared = int(key("attention.shared_kv_layers", 0))
    first_shared = n_layers - n_shared
    sources = tuple(None if i < first_shared else first_shared - (2 if sliding[i] else 1) for i in range(n_layers))
    for i, src in enumerate(sources):
        if src is not None and (src < 0 or sliding[src] != sliding[i]):
            raise CheckpointFormatError(f"{where}: KV-shared layer {i} would share layer {src}, of another type")
    n_rot, n_rot_swa = int(key("rope.dimension_count", global_head_dim)), int(key("rope.dimension_count_swa", head_dim))
    # `rope_freqs.weight` divides each pair's frequency, as for Llama 3 (llama._gguf_rope).
    inv_freq, factor = llama._gguf_rope(source, "gemma4", n_rot, float(key("rope.freq_base")), names)
    if factor != 1.0:
        raise CheckpointFormatError(f"{where}: RoPE with an attention factor is not supported for Gemma 4")
    per_layer_input = int(key("embedding_length_per_layer_input", 0))
    n_experts = int(key("expert_count", 0))
    moe = (
        MoeSettings(n_experts=n_experts, n_experts_used=int(key("expert_used_count")), norm_topk_prob=True)
        if n_experts
        else None
    )
    layers = _layer_roles(
        where, names, "blk.{i}.", _GGUF_LAYER, _GGUF_PER_LAYER if per_layer_input else {}, _GGUF_MOE, sources,
        lambda i: f"blk.{i}.attn_v.weight" not in names,  # attention_k_eq_v, as llama.cpp reads it
        lambda i: moe is not None and f"blk.{i}.ffn_gate_inp.weight" in names,
    )
    softcap = meta.get("gemma4.final_logit_softcapping")
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or int(key("vocab_size", source.checkpoint.tensor_info("token_embd.weight")[1][0]))
    return ModelConfig(
        architecture="gemma4",
        n_layers=n_layers,
        hidden=hidden,
        n_heads=int(key("attention.head_count")),
        n_kv_heads=n_kv,
        head_dim=head_dim,
        eps=float(key("attention.layer_norm_rms_epsilon")),
        vocab_size=vocab,
        max_positions=int(key("context_length")),
        rope_inv_freq=inv_freq,
        rope_interleaved=False,
        rope_attention_factor=1.0,
        attn_scale=1.0,
        embedding_name="token_embd.weight",
        output_norm_name="output_norm.weight",
        output_name="output.weight" if "output.weight" in names else "token_embd.weight",
        embedding_scale=float(np.sqrt(np.float32(hidden))),
        layer_tensor_names=tuple(layers),
        gelu_tanh=True,
        layer_sliding=sliding,
        sliding_window=int(key("attention.sliding_window")),
        rope_local_inv_freq=rope.default_inv_freq(float(key("rope.freq_base_swa", 10_000.0)), n_rot_swa),
        global_head_dim=global_head_dim,
        global_n_kv_heads=global_kv,
        v_norm=True,
        kv_source=sources if n_shared else (),
        per_layer_input=per_layer_input,
        per_layer_names=("per_layer_token_embd.weight", "per_layer_model_proj.weight", "per_layer_proj_norm.weight")
        if per_layer_input
        else None,
        final_logit_softcap=float(softcap) if softcap else None,
        moe=moe,
    )


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Gemma 4 text checkpoint (HF layout or GGUF)."""
    if source.format == "gguf":
        return _from_gguf(source)
    cfg, prefix = _text_config(source)
    where = str(source.path)
    get = lambda key: llama._get(cfg, key, where)  # noqa: E731 - one-line accessor
    if cfg.get("use_bidirectional_attention") == "all":
        raise CheckpointFormatError(f"{where}: bidirectional attention is not supported")
    if cfg.get("attention_bias"):
        raise CheckpointFormatError(f"{where}: attention biases are not supported for Gemma 4")
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise CheckpointFormatError(f"{where}: hidden_activation {activation!r} is not supported")

    n_layers, hidden = int(get("num_hidden_layers")), int(get("hidden_size"))
    n_heads, head_dim = int(get("num_attention_heads")), int(cfg.get("head_dim", 256))
    global_head_dim = int(cfg.get("global_head_dim") or head_dim)
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    k_eq_v = bool(cfg.get("attention_k_eq_v"))
    global_kv = int(cfg.get("num_global_key_value_heads") or n_kv) if k_eq_v else n_kv
    # Gemma4TextConfig: a 5:1 sliding/full pattern by default, the last layer always full.
    sliding = sliding_layers(cfg, n_layers, lambda i: (i + 1) % 6 != 0 and i != n_layers - 1, where)
    sources = kv_sources(sliding, int(cfg.get("num_kv_shared_layers") or 0))
    params = {**_DEFAULT_ROPE, **(cfg.get("rope_parameters") or {})}
    per_layer_input = int(cfg.get("hidden_size_per_layer_input") or 0)
    # Gemma4TextRouter: softmax over every expert, the top k renormalized, then each times its
    # per_expert_scale (the scale rides on the `ffn_down_exps_scale` role).
    moe = (
        MoeSettings(n_experts=int(get("num_experts")), n_experts_used=int(get("top_k_experts")), norm_topk_prob=True)
        if cfg.get("enable_moe_block")
        else None
    )

    names = set(source.checkpoint.tensor_names())
    full = lambda patterns: {r: prefix + p for r, p in patterns.items()}  # noqa: E731
    layers = _layer_roles(
        where, names, prefix + "layers.{i}.", full(_HF_LAYER), full(_HF_PER_LAYER) if per_layer_input else {},
        full(_HF_MOE), sources, lambda i: k_eq_v and not sliding[i], lambda i: moe is not None,
    )

    embedding = prefix + "embed_tokens.weight"
    tied = bool(cfg.get("tie_word_embeddings", True))
    output = "lm_head.weight" if "lm_head.weight" in names and not tied else embedding
    scale = gemma3.embedding_scale(source, embedding, hidden)
    softcap = cfg.get("final_logit_softcapping")

    return ModelConfig(
        architecture=str((source.config.get("architectures") or ["Gemma4ForCausalLM"])[0]),
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        vocab_size=int(get("vocab_size")),
        max_positions=int(cfg.get("max_position_embeddings", 131072)),
        rope_inv_freq=_inv_freq(params["full_attention"], global_head_dim, where),
        rope_interleaved=False,
        rope_attention_factor=1.0,
        attn_scale=1.0,
        embedding_name=embedding,
        output_norm_name=prefix + "norm.weight",
        output_name=output,
        embedding_scale=float(scale),
        layer_tensor_names=tuple(layers),
        gelu_tanh=True,
        layer_sliding=sliding,
        sliding_window=int(cfg.get("sliding_window", 512)),
        rope_local_inv_freq=_inv_freq(params["sliding_attention"], head_dim, where),
        global_head_dim=global_head_dim,
        global_n_kv_heads=global_kv,
        v_norm=True,
        kv_source=sources if any(s is not None for s in sources) else (),
        per_layer_input=per_layer_input,
        per_layer_names=(
            prefix + "embed_tokens_per_layer.weight",
            prefix + "per_layer_model_projection.weight",
            prefix + "per_layer_projection_norm.weight",
        )
        if per_layer_input
        else None,
        final_logit_softcap=float(softcap) if softcap else None,
        moe=moe,
    )


__all__ = ["ARCHITECTURES", "kv_sources", "read_config"]
