"""The Phi-3 family (`Phi3ForCausalLM`, model_type `phi3`: Phi-3, Phi-3.5, Phi-4, Phi-4-mini):
the Llama layer with fused projections and Phi's RoPE options, following transformers'
models/phi3/modeling_phi3.py and configuration_phi3.py:

- `self_attn.qkv_proj.weight` stacks q, k and v rows (Phi3Attention.forward slices the
  output at `n_heads * head_dim` and `+ n_kv_heads * head_dim`), and
  `mlp.gate_up_proj.weight` stacks gate then up rows (Phi3MLP.forward:
  `gate, up_states = up_states.chunk(2, dim=-1)`, `up_states * act(gate)`). The roles name
  row ranges of the fused tensors (`config.row_slice`), which the Rust span loads as views of
  the same bytes, so quantized GGUF tensors split the same way;
- partial rotary embeddings (`partial_rotary_factor`, 0.75 in Phi-4-mini): only the first
  `int(head_dim * factor)` dims of each head rotate, rotate-half pairs `(i, i + dim/2)`
  (apply_rotary_pos_emb's `q_rot` / `q_pass`), which is the Rust rope with fewer frequencies;
- `rope_type` `longrope` (`su` and `yarn` read as longrope, as Phi3Config does): short-factor
  frequencies before `original_max_position_embeddings`, long-factor ones from it on, an
  attention factor on cos/sin (modeling_rope_utils.py, `_compute_longrope_parameters`,
  `longrope_frequency_update`); see DecoderConfig::rope_long_inv_freq in
  rust/src/model/decoder.rs for the one case that differs (a prefill crossing the boundary);
- `sliding_window` (2047 in Phi-3-mini-4k), when set, applies to every layer
  (Phi3Model.forward builds `create_sliding_window_causal_mask` for all of them), with the
  same rotary table as a global layer.

GGUF files of llama.cpp's `phi3` architecture are read too (see `_from_gguf`), with the same
semantics as the HF checkpoint: LongRoPE chosen per position, not by llama.cpp's rule (long
factors whenever the serving context exceeds the original one, llama_model::get_rope_factors),
and the sliding window applied as transformers applies it, where llama.cpp currently turns
Phi-3's window off (llama_model_phi3::load_arch_hparams).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError
from meshpy.models import llama, rope
from meshpy.models.config import ModelConfig, check_layer_tensors, row_slice

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

ARCHITECTURES = ("Phi3ForCausalLM", "phi3")

@dataclasses.dataclass(frozen=True)
class _Layout:
    """One format's names of a layer: `prefix` (with `{i}`), the roles that are whole tensors,
    and the fused tensors whose row ranges are q/k/v and gate/up."""

    prefix: str
    whole: dict[str, str]
    qkv: str
    gate_up: str


# HF names from modeling_phi3.py; GGUF names from llama.cpp's phi3 arch: `attn_qkv` holds
# qkv_proj as is, `ffn_up` holds gate_up_proj, gate rows first, which llama.cpp's
# LLM_FFN_SWIGLU splits the same way.
_HF = _Layout(
    prefix="model.layers.{i}.",
    whole={
        "attn_norm": "input_layernorm.weight",
        "attn_output": "self_attn.o_proj.weight",
        "ffn_norm": "post_attention_layernorm.weight",
        "ffn_down": "mlp.down_proj.weight",
    },
    qkv="self_attn.qkv_proj.weight",
    gate_up="mlp.gate_up_proj.weight",
)
_GGUF = _Layout(
    prefix="blk.{i}.",
    whole={
        "attn_norm": "attn_norm.weight",
        "attn_output": "attn_output.weight",
        "ffn_norm": "ffn_norm.weight",
        "ffn_down": "ffn_down.weight",
    },
    qkv="attn_qkv.weight",
    gate_up="ffn_up.weight",
)
# llama.cpp also loads phi3 GGUFs whose q/k/v are separate tensors.
_GGUF_SEPARATE_QKV = {"attn_q": "attn_q.weight", "attn_k": "attn_k.weight", "attn_v": "attn_v.weight"}


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings as Phi3Config.convert_rope_params_to_dict and
    standardize_rope_params leave them: `rope_scaling` (older config.json files) or
    `rope_parameters`, with `rope_theta` and `partial_rotary_factor` from the top level when
    the dict lacks them, and for longrope the top-level `original_max_position_embeddings`
    (Phi3Config's default 4096) taking priority."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = "longrope" if kind in ("su", "yarn") else kind
    if params["rope_type"] == "longrope":
        params["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings", 4096)
    return params


def _layers(source: ModelSource, base: ModelConfig, layout: _Layout) -> tuple[dict[str, str], ...]:
    """Each layer's roles: whole tensors, q/k/v as row ranges of the fused qkv tensor (or
    separate tensors where a GGUF has them), gate/up as the two halves of the fused one.
    Every tensor of a layer must be used: one the forward would skip is an error."""
    where = str(source.path)
    q_dim, kv_dim = base.n_heads * base.head_dim, base.n_kv_heads * base.head_dim
    names = set(source.checkpoint.tensor_names())
    layers = []
    for i in range(base.n_layers):
        prefix = layout.prefix.format(i=i)
        qkv: str | None = prefix + layout.qkv
        gate_up = prefix + layout.gate_up
        whole = dict(layout.whole)
        if source.format == "gguf" and qkv not in names:
            whole.update(_GGUF_SEPARATE_QKV)
            qkv = None
        roles = {role: prefix + name for role, name in whole.items()}
        # The row ranges below name only the fused tensors, so these are all the layer uses.
        fused = [n for n in (qkv, gate_up) if n is not None]
        check_layer_tensors(where, names, "Phi-3", prefix, [*roles.values(), *fused])
        if qkv is not None:
            rows = source.checkpoint.tensor_info(qkv)[1][0]
            if rows != q_dim + 2 * kv_dim:
                raise CheckpointFormatError(f"{where}: {qkv} has {rows} rows, q+k+v need {q_dim + 2 * kv_dim}")
            roles.update(
                attn_q=row_slice(qkv, 0, q_dim),
                attn_k=row_slice(qkv, q_dim, q_dim + kv_dim),
                attn_v=row_slice(qkv, q_dim + kv_dim, q_dim + 2 * kv_dim),
            )
        fused_ffn = source.checkpoint.tensor_info(gate_up)[1][0]
        if fused_ffn % 2:
            raise CheckpointFormatError(f"{where}: {gate_up} has an odd number of rows ({fused_ffn})")
        ffn = fused_ffn // 2
        roles.update(ffn_gate=row_slice(gate_up, 0, ffn), ffn_up=row_slice(gate_up, ffn, 2 * ffn))
        layers.append(roles)
    return tuple(layers)


def _from_hf(source: ModelSource) -> tuple[ModelConfig, rope.LongRope | None, int | None]:
    cfg = source.config
    where = str(source.path)
    activation = cfg.get("hidden_act", "silu")
    if activation != "silu":
        raise CheckpointFormatError(f"{where}: hidden_act {activation!r} is not supported")
    hidden, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    params = _rope_params(cfg)
    n_rot = int(head_dim * float(params["partial_rotary_factor"]))
    if n_rot % 2 or not 0 < n_rot <= head_dim:
        raise CheckpointFormatError(f"{where}: {n_rot} rotary dims of a {head_dim}-wide head")
    theta = float(params["rope_theta"])
    long = None
    if params["rope_type"] == "default":
        tables = rope.default_inv_freq(theta, n_rot), 1.0
    elif params["rope_type"] == "longrope":
        long = rope.longrope_inv_freq(
            theta, n_rot, params, int(cfg.get("max_position_embeddings", 4096)),
            int(params["original_max_position_embeddings"]),
        )
        tables = long.short, long.attention_factor
    else:
        raise CheckpointFormatError(f"{where}: Phi-3 rope type {params['rope_type']!r} is not supported")
    base = llama.from_hf(source, rope_tables=tables)
    base = dataclasses.replace(base, architecture=str((cfg.get("architectures") or ["Phi3ForCausalLM"])[0]))
    window = cfg.get("sliding_window")
    return base, long, None if window is None else int(window)


def _factor_tensor(source: ModelSource, name: str) -> list[float]:
    type_name, shape = source.checkpoint.tensor_info(name)
    if type_name.upper() != "F32" or len(shape) != 1:
        raise CheckpointFormatError(f"{source.path}: {name} must be a 1-D F32 tensor, it is {type_name} {shape}")
    return np.frombuffer(source.checkpoint.tensor_bytes(name), dtype="<f4").astype(np.float32).tolist()


def _from_gguf(source: ModelSource) -> tuple[ModelConfig, rope.LongRope | None, int | None]:
    """llama.cpp's phi3 keys (convert_hf_to_gguf.py, Phi3MiniModel): `rope.dimension_count`
    (the rotated dims), `rope.freq_base`; for LongRoPE the global `rope_factors_short.weight` /
    `rope_factors_long.weight` tensors (per-pair divisors), `rope.scaling.original_context_length`
    and `rope.scaling.attn_factor`; `attention.sliding_window` (0: none)."""
    meta = source.metadata
    where = str(source.path)
    base = llama.from_gguf(source)
    # NeoX (rotate-half) RoPE: llama.cpp does not permute phi3's q/k rows.
    base = dataclasses.replace(base, rope_interleaved=False)
    names = set(source.checkpoint.tensor_names())
    factor_names = ("rope_factors_short.weight", "rope_factors_long.weight")
    present = [n in names for n in factor_names]
    long = None
    if any(present):
        if not all(present):
            raise CheckpointFormatError(f"{where}: {' and '.join(factor_names)} come together")
        original = meta.get("phi3.rope.scaling.original_context_length")
        if original is None:
            raise CheckpointFormatError(f"{where}: LongRoPE factors without phi3.rope.scaling.original_context_length")
        scaling = {"short_factor": _factor_tensor(source, factor_names[0]), "long_factor": _factor_tensor(source, factor_names[1])}
        if meta.get("phi3.rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(meta["phi3.rope.scaling.attn_factor"])
        theta = float(meta.get("phi3.rope.freq_base", 10000.0))
        long = rope.longrope_inv_freq(theta, 2 * len(base.rope_inv_freq), scaling, base.max_positions, int(original))
        base = dataclasses.replace(base, rope_inv_freq=long.short, rope_attention_factor=long.attention_factor)
    window = int(meta.get("phi3.attention.sliding_window", 0))
    return base, long, window or None


def read_config(source: ModelSource) -> ModelConfig:
    """Settings and names from a Phi-3-family checkpoint (HF directory or GGUF)."""
    if source.format == "gguf":
        base, long, window = _from_gguf(source)
        layout = _GGUF
    else:
        base, long, window = _from_hf(source)
        layout = _HF
    return dataclasses.replace(
        base,
        layer_tensor_names=_layers(source, base, layout),
        layer_sliding=(True,) * base.n_layers if window is not None else (),
        sliding_window=window or 0,
        rope_long_inv_freq=None if long is None else long.long,
        rope_long_from=0 if long is None else long.original_max,
    )


__all__ = ["ARCHITECTURES", "read_config"]
