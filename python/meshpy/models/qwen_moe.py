"""Qwen3-MoE (`Qwen3MoeForCausalLM`, GGUF `qwen3moe`): the Qwen3 layer (q/k norms, its own
`head_dim`) whose MLP is a mixture of experts (rust/src/model/moe.rs), following
transformers' models/qwen3_moe/modeling_qwen3_moe.py:

- a layer has experts unless it is in `mlp_only_layers` or `(layer + 1) %
  decoder_sparse_step != 0` (Qwen3MoeDecoderLayer); the others keep a dense MLP of
  `intermediate_size`;
- the router `mlp.gate` (num_experts x hidden) picks `num_experts_per_tok` experts by softmax
  probability, renormalized when `norm_topk_prob` (Qwen3MoeTopKRouter); each expert is a SwiGLU
  MLP of `moe_intermediate_size`, stored per expert (`mlp.experts.{j}.gate_proj`, the layout
  transformers saves and the Hub holds).

GGUF `qwen3moe` as llama.cpp reads it (src/models/qwen3moe.cpp): every layer has experts,
stacked per layer in `blk.N.ffn_{gate,up,down}_exps.weight` (`[n_expert, rows, cols]`), the
router in `blk.N.ffn_gate_inp.weight`, `qwen3moe.expert_count` / `expert_used_count`, and the
chosen weights always renormalized (llama.cpp's `build_moe_ffn` call passes `norm_w = true`;
the converter writes no key for `norm_topk_prob`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from meshpy.errors import CheckpointFormatError
from meshpy.models import qwen
from meshpy.models.config import ModelConfig, MoeSettings

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("qwen3moe", "Qwen3MoeForCausalLM")

_DENSE_ROLES = ("ffn_gate", "ffn_up", "ffn_down")
_EXPERT_ROLES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def _gguf_roles(i: int, n_experts: int) -> dict[str, str]:
    return {"ffn_gate_inp": f"blk.{i}.ffn_gate_inp.weight"} | {
        role: f"blk.{i}.{role}.weight" for role in _EXPERT_ROLES
    }


def _hf_roles(i: int, n_experts: int) -> dict[str, str]:
    roles = {"ffn_gate_inp": f"model.layers.{i}.mlp.gate.weight"}
    for role, name in _EXPERT_ROLES.items():
        roles |= {f"{role}.{j}": f"model.layers.{i}.mlp.experts.{j}.{name}.weight" for j in range(n_experts)}
    return roles


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Qwen3-MoE checkpoint (HF layout or GGUF)."""
    base = qwen.with_optional_roles(source)
    where = str(source.path)
    if source.format == "gguf":
        meta = source.metadata
        arch = meta["general.architecture"]
        moe = MoeSettings(
            n_experts=int(meta.get(f"{arch}.expert_count", 0)),
            n_experts_used=int(meta.get(f"{arch}.expert_used_count", 0)),
            norm_topk_prob=True,
        )
        expert_layers = set(range(base.n_layers))
        roles_of = _gguf_roles
    else:
        cfg = source.config
        moe = MoeSettings(
            n_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
            n_experts_used=int(cfg.get("num_experts_per_tok", 0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        )
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        expert_layers = {
            i for i in range(base.n_layers) if moe.n_experts > 0 and i not in dense and step > 0 and (i + 1) % step == 0
        }
        roles_of = _hf_roles
    if not expert_layers:  # no layer has experts: transformers builds it all dense
        qwen.check_layers(source, base, "Qwen3-MoE")
        return base
    if not 0 < moe.n_experts_used <= moe.n_experts:
        raise CheckpointFormatError(f"{where}: {moe.n_experts_used} experts used per token of {moe.n_experts}")
    layers = []
    for i in range(base.n_layers):
        roles = base.layer_names(i)
        if i in expert_layers:
            for role in _DENSE_ROLES:
                del roles[role]
            roles |= roles_of(i, moe.n_experts)
        layers.append(roles)
    config = dataclasses.replace(base, layer_tensor_names=tuple(layers), moe=moe)
    qwen.check_layers(source, config, "Qwen3-MoE")
    return config


__all__ = ["ARCHITECTURES", "read_config"]
