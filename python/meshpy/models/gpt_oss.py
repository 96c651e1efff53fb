"""gpt-oss (`GptOssForCausalLM`, GGUF `gpt-oss`): the Llama layer with q/k/v/o biases,
attention sinks (one logit per head joining the softmax's denominator), sliding-window and
global layers alternating, YaRN RoPE, and a mixture-of-experts MLP whose router has a bias
and weighs the top-k logits by their own softmax, with biased experts and a clamped SwiGLU
(rust/src/model/moe.rs). Follows transformers' models/gpt_oss/modeling_gpt_oss.py:

- `layer_types` names each layer's attention (the first of each pair slides over
  `sliding_window` positions); every layer rotates with the one YaRN table (rotate-half);
- GptOssTopKRouter: `router.weight` / `router.bias`, `topk(logits)` then a softmax over those;
- GptOssExperts: `gate_up_proj` `[n_experts, hidden, 2 * ffn]` used as `x @ W` with gate and
  up in alternating columns, `down_proj` `[n_experts, ffn, hidden]`, their biases, and
  `(clamp(up) + 1) * gate * sigmoid(1.702 * gate)` with gate clamped above at 7;
- the released checkpoints store the experts in MXFP4 instead (`gate_up_proj_blocks` /
  `_scales`, rows = outputs, gate and up in alternating rows; integrations/mxfp4.py): loaded as
  GGUF MXFP4 blocks, no value changed.

GGUF `gpt-oss` as llama.cpp reads it (src/models/openai-moe.cpp; its converter,
conversion/gpt_oss.py, transposes the experts and splits gate from up into `ffn_gate_exps` /
`ffn_up_exps`, MXFP4 in released files): the pre-MLP norm is `post_attention_norm`, even
layers slide (`load_swa_pattern(ml, 2)`), sinks are `attn_sinks.weight`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from meshpy.errors import CheckpointFormatError
from meshpy.models import llama
from meshpy.models.config import ModelConfig, MoeSettings, check_layer_tensors, sliding_layers

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("gpt-oss", "GptOssForCausalLM")

#: GptOssExperts's fixed activation constants (alpha, limit); llama.cpp's are the same.
SWIGLU_CLAMP = (1.702, 7.0)

# llama.cpp's names: the Llama layer's attention (rust/src/model/decoder.rs roles), with biases,
# sinks and the experts; the pre-MLP norm is `post_attention_norm`.
_GGUF_ROLES = {
    **{r: n for r, n in llama._GGUF_ROLES.items() if r.startswith("attn_")},
    "attn_q_bias": "blk.{i}.attn_q.bias",
    "attn_k_bias": "blk.{i}.attn_k.bias",
    "attn_v_bias": "blk.{i}.attn_v.bias",
    "attn_output_bias": "blk.{i}.attn_output.bias",
    "attn_sinks": "blk.{i}.attn_sinks.weight",
    "ffn_norm": "blk.{i}.post_attention_norm.weight",
    "ffn_gate_inp": "blk.{i}.ffn_gate_inp.weight",
    "ffn_gate_inp_bias": "blk.{i}.ffn_gate_inp.bias",
    "ffn_gate_exps": "blk.{i}.ffn_gate_exps.weight",
    "ffn_up_exps": "blk.{i}.ffn_up_exps.weight",
    "ffn_down_exps": "blk.{i}.ffn_down_exps.weight",
    "ffn_gate_exps_bias": "blk.{i}.ffn_gate_exps.bias",
    "ffn_up_exps_bias": "blk.{i}.ffn_up_exps.bias",
    "ffn_down_exps_bias": "blk.{i}.ffn_down_exps.bias",
}

_HF_ROLES = {
    **{r: n for r, n in llama._HF_ROLES.items() if r.startswith("attn_")},
    "attn_q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attn_k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attn_v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "attn_output_bias": "model.layers.{i}.self_attn.o_proj.bias",
    "attn_sinks": "model.layers.{i}.self_attn.sinks",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate_inp": "model.layers.{i}.mlp.router.weight",
    "ffn_gate_inp_bias": "model.layers.{i}.mlp.router.bias",
    # transformers' fused, transposed layout (see rust/src/model/weights.rs, `transposed_experts`).
    "ffn_gate_up_exps_t": "model.layers.{i}.mlp.experts.gate_up_proj",
    "ffn_gate_up_exps_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "ffn_down_exps_t": "model.layers.{i}.mlp.experts.down_proj",
    "ffn_down_exps_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
}


# The released checkpoints' MXFP4 experts: blocks and exponents per matrix (see
# rust/src/model/weights.rs, `mxfp4_experts`).
_HF_MXFP4_ROLES = {
    **{r: n for r, n in _HF_ROLES.items() if not r.endswith("_t")},
    "ffn_gate_up_exps_blocks": "model.layers.{i}.mlp.experts.gate_up_proj_blocks",
    "ffn_gate_up_exps_scales": "model.layers.{i}.mlp.experts.gate_up_proj_scales",
    "ffn_down_exps_blocks": "model.layers.{i}.mlp.experts.down_proj_blocks",
    "ffn_down_exps_scales": "model.layers.{i}.mlp.experts.down_proj_scales",
}


def _roles(source: ModelSource, n_layers: int, patterns: dict[str, str], prefix: str) -> tuple[dict[str, str], ...]:
    names = set(source.checkpoint.tensor_names())
    layers = []
    for i in range(n_layers):
        roles = {r: p.format(i=i) for r, p in patterns.items()}
        check_layer_tensors(str(source.path), names, "gpt-oss", prefix.format(i=i), roles.values(), check_missing=False)
        layers.append(roles)
    return tuple(layers)


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a gpt-oss checkpoint (HF layout or GGUF)."""
    where = str(source.path)
    if source.format == "gguf":
        meta = source.metadata
        base = llama.from_gguf(source)  # YaRN as llama.cpp applies it
        n_experts = int(meta.get("gpt-oss.expert_count", 0))
        n_used = int(meta.get("gpt-oss.expert_used_count", 0))
        window = int(meta.get("gpt-oss.attention.sliding_window", 0))
        sliding = tuple(i % 2 == 0 for i in range(base.n_layers))
        roles = _roles(source, base.n_layers, _GGUF_ROLES, "blk.{i}.")
    else:
        cfg = source.config
        base = llama.from_hf(source)  # YaRN as transformers computes it (truncate honoured)
        n_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        n_used = int(cfg.get("num_experts_per_tok", 0))
        window = int(cfg.get("sliding_window") or 0)
        sliding = sliding_layers(cfg, base.n_layers, lambda i: i % 2 == 0, where)
        mxfp4 = "model.layers.0.mlp.experts.gate_up_proj_blocks" in set(source.checkpoint.tensor_names())
        roles = _roles(source, base.n_layers, _HF_MXFP4_ROLES if mxfp4 else _HF_ROLES, "model.layers.{i}.")
    if not 0 < n_used <= n_experts:
        raise CheckpointFormatError(f"{where}: {n_used} experts used per token of {n_experts}")
    if any(sliding) and window <= 0:
        raise CheckpointFormatError(f"{where}: sliding-window layers without a positive sliding_window")
    moe = MoeSettings(
        n_experts=n_experts, n_experts_used=n_used, norm_topk_prob=False, expert_gating="topk_softmax", swiglu_clamp=SWIGLU_CLAMP
    )
    return dataclasses.replace(
        base,
        rope_interleaved=False,
        layer_tensor_names=roles,
        # Sliding layers rotate with the global (YaRN) table: no local table.
        layer_sliding=sliding if window < base.max_positions else (),
        sliding_window=window if window < base.max_positions else 0,
        rope_local_inv_freq=None,
        moe=moe,
    )


__all__ = ["ARCHITECTURES", "SWIGLU_CLAMP", "read_config"]
