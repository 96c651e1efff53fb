"""The settings of a model, read from its checkpoint, and the names of its tensors.

`read_config(source)` dispatches on the architecture the checkpoint declares (GGUF
`general.architecture` or HF `config.json` `architectures`/`model_type`) to the family
module that knows its keys and tensor names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Container, Iterable, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from meshpy.errors import CheckpointFormatError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from meshpy.models.source import ModelSource

__all__ = ["ModelConfig", "MoeSettings", "read_config", "default_chat_template", "SUPPORTED_ARCHITECTURES", "row_slice", "split_tensor_ref", "check_layer_tensors", "sliding_layers"]


@dataclass(frozen=True)
class MoeSettings:
    """The mixture-of-experts block of the layers whose names include a router
    (`ffn_gate_inp`; see rust/src/model/moe.rs)."""

    n_experts: int
    #: Experts each token runs (top-k).
    n_experts_used: int
    #: Whether the chosen experts' probabilities are divided by their sum ("softmax" gating).
    norm_topk_prob: bool
    #: "softmax": over every expert, then the top k; "topk_softmax": over the top k logits.
    expert_gating: str = "softmax"
    #: gpt-oss's clamped SwiGLU of the experts, (alpha, limit); None: the span's activation.
    swiglu_clamp: tuple[float, float] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Everything the End model and the spans need to know about a model."""

    architecture: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    vocab_size: int
    max_positions: int
    rope_inv_freq: np.ndarray = field(repr=False)
    rope_interleaved: bool
    rope_attention_factor: float
    attn_scale: float
    embedding_name: str
    output_norm_name: str
    output_name: str
    embedding_scale: float
    layer_tensor_names: tuple[dict[str, str], ...] = field(repr=False)
    #: Added to every RMSNorm weight (1.0 for Gemma 3's `x * (1 + weight)`).
    norm_offset: float = 0.0
    #: GELU (tanh approximation) instead of SiLU gating the MLP (Gemma 3).
    gelu_tanh: bool = False
    #: Per layer: whether it attends over a sliding window of `sliding_window` positions with
    #: `rope_local_inv_freq` (Gemma 3's local layers). Empty: no layer does.
    layer_sliding: tuple[bool, ...] = ()
    sliding_window: int = 0
    rope_local_inv_freq: np.ndarray | None = field(default=None, repr=False)
    #: Rotary frequencies for positions `rope_long_from` and later (LongRoPE's long factors,
    #: Phi-3 128k / Phi-3.5 / Phi-4-mini), with `rope_inv_freq` holding the short-factor ones.
    #: None: one table for every position.
    rope_long_inv_freq: np.ndarray | None = field(default=None, repr=False)
    rope_long_from: int = 0
    #: Mixture-of-experts settings; None: every layer has a dense MLP.
    moe: MoeSettings | None = None
    #: Head width and key/value heads of the global (not sliding) layers; 0: `head_dim` /
    #: `n_kv_heads` (Gemma 4's global layers are wider).
    global_head_dim: int = 0
    global_n_kv_heads: int = 0
    #: Values RMS-normed per head without a weight before caching (Gemma 4).
    v_norm: bool = False
    #: Per layer: the earlier layer whose keys and values it attends over, or None for its own
    #: (Gemma 4's KV-shared layers). Empty: every layer has its own.
    kv_source: tuple[int | None, ...] = ()
    #: Gemma 4's per-layer inputs (E2B/E4B): width per layer (0: none), and the End model's
    #: tensors computing them: the table, the projection and the norm.
    per_layer_input: int = 0
    per_layer_names: tuple[str, str, str] | None = None
    #: `logits = cap * tanh(logits / cap)` on the End node (Gemma 4); None: no cap.
    final_logit_softcap: float | None = None

    @functools.cached_property
    def row_widths(self) -> tuple[int, ...]:
        """Values per row entering each layer boundary `0..n_layers` (`n_layers`: what the
        last span gives back): the hidden size for most models; Gemma 4 carries per-layer
        inputs and shared keys and values beside it (rust/src/model/decoder.rs,
        `DecoderConfig::row_width`, the one definition)."""
        from meshpy import _native

        span = self.span_config()
        return tuple(_native.row_width(span, b) for b in range(self.n_layers + 1))

    def layer_names(self, layer: int) -> dict[str, str]:
        """Tensor names of one layer by role (`attn_q` -> `blk.3.attn_q.weight`)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.n_layers - 1}")
        return dict(self.layer_tensor_names[layer])

    def with_sliding_window(self, window: int | None, where: str, layers: Sequence[bool] | None = None) -> ModelConfig:
        """This config with the layers `layers` marks (default: every layer) attending over the
        last `window` positions (itself included) and rotating with the one global table
        (Mistral; Qwen2/Qwen3 `layer_types`); unchanged when `window` is None or covers the
        whole context, or no layer slides. `where` names the checkpoint in errors."""
        sliding = tuple(bool(s) for s in layers) if layers is not None else (True,) * self.n_layers
        if len(sliding) != self.n_layers:
            raise CheckpointFormatError(f"{where}: {len(sliding)} layer types for {self.n_layers} layers")
        if window is None or window >= self.max_positions or not any(sliding):
            return self
        if window <= 0:
            raise CheckpointFormatError(f"{where}: sliding_window must be positive, not {window}")
        if self.rope_attention_factor != 1.0:
            # The span's local table carries no attention factor (rust/src/model/decoder.rs).
            raise CheckpointFormatError(f"{where}: a sliding window with a scaled (YaRN) RoPE is not supported")
        return dataclasses.replace(
            self, layer_sliding=sliding, sliding_window=window, rope_local_inv_freq=self.rope_inv_freq
        )

    def span_config(self, quantize: str | None = None, kv_dtype: str | None = None) -> dict[str, Any]:
        """The settings a Rust span takes. `kv_dtype` ("f16" or "f32"; None: the span's
        default, see `LocalSpan`) is how its sessions' KV caches store keys and values."""
        return {
            "hidden": self.hidden,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "eps": self.eps,
            "rope_inv_freq": [float(x) for x in self.rope_inv_freq],
            "rope_interleaved": self.rope_interleaved,
            "rope_attention_factor": self.rope_attention_factor,
            "attn_scale": self.attn_scale,
            "max_positions": self.max_positions,
            "quantize": quantize,
            "kv_dtype": kv_dtype,
            "norm_offset": self.norm_offset,
            "gelu_tanh": self.gelu_tanh,
            "layer_sliding": list(self.layer_sliding),
            "sliding_window": self.sliding_window,
            "rope_local_inv_freq": [] if self.rope_local_inv_freq is None else [float(x) for x in self.rope_local_inv_freq],
            "rope_long_inv_freq": [] if self.rope_long_inv_freq is None else [float(x) for x in self.rope_long_inv_freq],
            "rope_long_from": self.rope_long_from,
            **(dataclasses.asdict(self.moe) if self.moe else {}),
            "global_head_dim": self.global_head_dim,
            "global_n_kv_heads": self.global_n_kv_heads,
            "v_norm": self.v_norm,
            "kv_source": list(self.kv_source),
            "per_layer_input": self.per_layer_input,
            "n_layers": self.n_layers,
        }


_ROW_SLICE = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def row_slice(name: str, start: int, stop: int) -> str:
    """The reference to rows `start:stop` of tensor `name` (outermost dimension), as a role's
    name: `qkv_proj.weight[64:96]`. The Rust span loads those rows of the fused tensor as the
    role's matrix (rust/src/model/weights.rs, `tensor_ref`)."""
    return f"{name}[{start}:{stop}]"


def split_tensor_ref(ref: str, names: Container[str] = ()) -> tuple[str, range | None]:
    """A role's tensor reference as (tensor name, rows or None); a name in `names` (the
    checkpoint's) is taken as spelled, as the Rust loader does."""
    match = None if ref in names else _ROW_SLICE.match(ref)
    if match is None:
        return ref, None
    return match["name"], range(int(match["start"]), int(match["stop"]))


def sliding_layers(cfg: dict[str, Any], n_layers: int, default: Callable[[int], bool], where: str) -> tuple[bool, ...]:
    """Which layers slide: the HF config's `layer_types` ("sliding_attention" /
    "full_attention", transformers' key for every family with mixed layers), else
    `default(layer)` (the family's older keys)."""
    types = cfg.get("layer_types") or ["sliding_attention" if default(i) else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise CheckpointFormatError(f"{where}: layer_types must name {n_layers} full/sliding layers, got {types}")
    return tuple(t == "sliding_attention" for t in types)


def check_layer_tensors(
    where: str, names: Set[str], family: str, layer_prefix: str, used: Iterable[str], *, check_missing: bool = True
) -> None:
    """Every tensor one layer `used` exists in the checkpoint's `names` (unless not
    `check_missing`: the span loader then names a missing one, as for Llama), and no tensor
    under `layer_prefix` is left without a role: one the forward would skip (an o_proj bias,
    a variant's extra norm) is an error naming it, not a silently wrong model."""
    used = set(used)
    missing = sorted(n for n in used if n not in names) if check_missing else []
    if missing:
        raise CheckpointFormatError(f"{where}: missing {family} tensors: {', '.join(missing)}")
    unused = sorted(n for n in names if n.startswith(layer_prefix) and n not in used)
    if unused:
        raise CheckpointFormatError(f"{where}: tensors this {family} layer does not use: {', '.join(unused)}")


def read_config(source: ModelSource) -> ModelConfig:
    """Reads the model's settings from its checkpoint."""
    from meshpy.models import gemma3, gemma4, gpt_oss, llama, mistral, phi3, qwen, qwen_moe

    arch = architecture_of(source)
    if arch in llama.ARCHITECTURES:
        return llama.read_config(source)
    if arch in mistral.ARCHITECTURES:
        return mistral.read_config(source)
    if arch in qwen.ARCHITECTURES:
        return qwen.read_config(source)
    if arch in qwen_moe.ARCHITECTURES:
        return qwen_moe.read_config(source)
    if arch in gpt_oss.ARCHITECTURES:
        return gpt_oss.read_config(source)
    if arch in gemma3.ARCHITECTURES:
        return gemma3.read_config(source)
    if arch in gemma4.ARCHITECTURES:
        return gemma4.read_config(source)
    if arch in phi3.ARCHITECTURES:
        return phi3.read_config(source)
    raise UnsupportedArchitectureError(
        f"unsupported architecture {arch!r} in {source.path}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


SUPPORTED_ARCHITECTURES = (
    "llama (GGUF) / LlamaForCausalLM (HF)",
    "MistralForCausalLM (HF; GGUF Mistral is llama)",
    "qwen2 (GGUF) / Qwen2ForCausalLM (HF)",
    "qwen3 (GGUF) / Qwen3ForCausalLM (HF)",
    "qwen3moe (GGUF) / Qwen3MoeForCausalLM (HF)",
    "gpt-oss (GGUF) / GptOssForCausalLM (HF)",
    "gemma3 (GGUF) / Gemma3ForCausalLM (HF, gemma3_text)",
    "gemma4 (GGUF) / Gemma4ForCausalLM (HF, gemma4_text; the text model of Gemma4ForConditionalGeneration)",
    "phi3 (GGUF) / Phi3ForCausalLM (HF): Phi-3, Phi-3.5, Phi-4, Phi-4-mini",
)


def default_chat_template(source: ModelSource) -> str | None:
    """The family's own chat format, for a checkpoint that ships no template."""
    from meshpy.models import gemma3

    return gemma3.CHAT_TEMPLATE if architecture_of(source) in gemma3.ARCHITECTURES else None


def architecture_of(source: ModelSource) -> str:
    """The architecture name the checkpoint declares."""
    if source.format == "gguf":
        arch = source.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise UnsupportedArchitectureError(f"{source.path}: no general.architecture in the GGUF metadata")
        return arch
    archs = source.config.get("architectures") or []
    if archs:
        return str(archs[0])
    return str(source.config.get("model_type", "unknown"))
