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

from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError
from meshpy.models import gemma3, llama, rope
from meshpy.models.config import ModelConfig, MoeSettings, check_layer_tensors, sliding_layers

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("Gemma4ForCausalLM", "gemma4_text", "Gemma4ForConditionalGeneration", "gemma4")

# Roles of one layer (see rust/src/model/decoder.rs) -> HF names under the text model's prefix.
_HF_ATTENTION = {
    "attn_norm": "layers.{i}.input_layernorm.weight",
    "attn_q": "layers.{i}.self_attn.q_proj.weight",
    "attn_output": "layers.{i}.self_attn.o_proj.weight",
    "attn_q_norm": "layers.{i}.self_attn.q_norm.weight",
    "attn_post_norm": "layers.{i}.post_attention_layernorm.weight",
}
_HF_OWN_KV = {
    "attn_k": "layers.{i}.self_attn.k_proj.weight",
    "attn_v": "layers.{i}.self_attn.v_proj.weight",
    "attn_k_norm": "layers.{i}.self_attn.k_norm.weight",
}
_HF_MLP = {
    "ffn_norm": "layers.{i}.pre_feedforward_layernorm.weight",
    "ffn_gate": "layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "layers.{i}.mlp.up_proj.weight",
    "ffn_down": "layers.{i}.mlp.down_proj.weight",
    "ffn_post_norm": "layers.{i}.post_feedforward_layernorm.weight",
    "layer_output_scale": "layers.{i}.layer_scalar",
}
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


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Gemma 4 text checkpoint (HF layout)."""
    if source.format == "gguf":
        raise CheckpointFormatError(f"{source.path}: GGUF gemma4 is not supported yet")
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
    layers = []
    for i in range(n_layers):
        patterns = {**_HF_ATTENTION, **_HF_MLP}
        if sources[i] is None:
            patterns.update(_HF_OWN_KV)
            if k_eq_v and not sliding[i]:
                del patterns["attn_v"]
        if per_layer_input:
            patterns.update(_HF_PER_LAYER)
        if moe is not None:
            patterns.update(_HF_MOE)
        roles = {r: prefix + p.format(i=i) for r, p in patterns.items()}
        # transformers ignores a shared layer's own k/v tensors (`_keys_to_ignore_on_load_unexpected`).
        ignored = {prefix + p.format(i=i) for p in _HF_OWN_KV.values()} if sources[i] is not None else set()
        layer_prefix = f"{prefix}layers.{i}."
        check_layer_tensors(where, names - ignored, "Gemma 4", layer_prefix, roles.values())
        layers.append(roles)

    embedding = prefix + "embed_tokens.weight"
    tied = bool(cfg.get("tie_word_embeddings", True))
    output = "lm_head.weight" if "lm_head.weight" in names and not tied else embedding
    # Gemma4TextScaledWordEmbedding multiplies by sqrt(hidden) cast to the weight's dtype.
    scale = np.float32(hidden**0.5)
    dtype = source.checkpoint.tensor_info(embedding)[0].lower()
    if dtype == "bf16":
        scale = gemma3._round_to_bf16(scale)
    elif dtype == "f16":
        scale = np.float32(np.float16(scale))
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
