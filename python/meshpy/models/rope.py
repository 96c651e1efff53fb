"""Rotary position embedding frequencies, with the scaling types checkpoints configure.

Computed here once per model and handed to the Rust span as a float32 array of inverse
frequencies (one per rotated pair), so every family and scaling type shares one kernel.
Follows transformers' modeling_rope_utils.py (`_compute_default_rope_parameters`,
`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
`_compute_yarn_parameters`, `_compute_longrope_parameters`: Phi-3's, read by phi3.py).

Not supported, refused by name: `dynamic` (dynamic NTK). transformers'
`dynamic_rope_update` recomputes the frequencies from the longest position of each forward
call once it passes `max_position_embeddings`, so a prompt's keys and every later decode
step rotate with different tables (and positions below the limit with the default one): one
table per model cannot give its results. Also `proportional`, `longrope` outside Phi-3, and
any other type transformers may add.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshpy.errors import CheckpointFormatError

__all__ = [
    "default_inv_freq",
    "scaled_inv_freq",
    "yarn_extrapolation",
    "yarn_mscale",
    "longrope_inv_freq",
    "LongRope",
    "SUPPORTED_ROPE_TYPES",
]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")

# Why a type transformers knows is refused (any other type is simply unknown).
_REFUSED = {
    "dynamic": "dynamic NTK recomputes the frequencies from each call's sequence length past "
    "max_position_embeddings, which one fixed table cannot reproduce",
}


def default_inv_freq(base: float, n_rot: int) -> np.ndarray:
    """`1 / base^(2i / n_rot)` for i < n_rot/2, computed in float32 as transformers does."""
    exponents = np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / np.float32(n_rot)
    return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def scaled_inv_freq(base: float, n_rot: int, scaling: Mapping[str, Any] | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the attention factor for an HF `rope_scaling` dict."""
    inv_freq = default_inv_freq(base, n_rot)
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(base, n_rot, scaling)
    if kind == "proportional":
        return _proportional(inv_freq, scaling), 1.0
    why = f" ({_REFUSED[kind]})" if kind in _REFUSED else ""
    raise CheckpointFormatError(
        f"unsupported rope scaling type {kind!r}{why}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _proportional(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Gemma 4's global layers (transformers' `_compute_proportional_rope_parameters`): the
    first `partial_rotary_factor * n_rot // 2` pairs keep their frequencies over the whole
    head's `n_rot`, the rest are 0 (they do not rotate), all divided by `factor`; so the pairs
    stay half a head apart, unlike partial rotary elsewhere."""
    angles = int(float(scaling.get("partial_rotary_factor", 1.0)) * inv_freq.size * 2 // 2)
    out = inv_freq.copy()
    out[angles:] = 0.0
    return (out / np.float32(scaling.get("factor", 1.0))).astype(np.float32)


def _llama3(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor `0.1 mscale ln(factor) + 1` (1 when factor <= 1), as
    transformers' `get_mscale` and llama.cpp's llama_context (`get_mscale`) compute it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_extrapolation(
    base: float, dim: int, old_ctx: float, beta_fast: float, beta_slow: float, truncate: bool = True
) -> np.ndarray:
    """Per rotated pair, YaRN's weight on the unscaled (extrapolated) frequency: 1 for pairs
    that turn more than `beta_fast` times over `old_ctx` positions, 0 for those turning less
    than `beta_slow` times, a linear ramp between (float32, one value per pair).

    transformers (`find_correction_range`, `linear_ramp_factor`) and ggml
    (`ggml_rope_yarn_corr_dims`, `rope_yarn_ramp`) agree: correction dims
    `dim ln(old_ctx / (2 pi beta)) / (2 ln base)`, floored / ceiled, clamped to [0, dim - 1],
    ramp `1 - clamp((i - low) / (high - low), 0, 1)`. They differ only where no checkpoint
    goes: ggml computes the dims in float32 (a floor or ceil could flip exactly on an
    integer) and always truncates; it divides by `max(0.001, high - low)` where transformers
    adds 0.001 to `high` when the two are equal, the same unless high < low, which needs an
    original context above about 200 base^2 positions."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    return (np.float32(1.0) - ramp.astype(np.float32)).astype(np.float32)


def _yarn(base: float, dim: int, scaling: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """YaRN (Qwen2.5 / Qwen3 long context): interpolated low frequencies, extrapolated high
    ones, a linear ramp between; cos/sin scaled by the attention factor. float32 as in
    transformers' `_compute_yarn_parameters`."""
    if scaling.get("factor") is None:
        raise CheckpointFormatError("yarn rope scaling without a factor is not supported")
    factor = float(scaling["factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    extrapolation_factor = yarn_extrapolation(base, dim, old_ctx, beta_fast, beta_slow, scaling.get("truncate", True))
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


@dataclass(frozen=True)
class LongRope:
    """LongRoPE's two frequency tables (Phi-3 128k, Phi-3.5, Phi-4-mini): `short` for
    positions before `original_max`, `long` from it on, both with `attention_factor` on cos/sin."""

    short: np.ndarray
    long: np.ndarray
    original_max: int
    attention_factor: float


def longrope_inv_freq(
    base: float, n_rot: int, scaling: Mapping[str, Any], max_positions: int, original_max: int
) -> LongRope:
    """Both tables as transformers' `_compute_longrope_parameters` makes them: per-pair
    divisors `short_factor` / `long_factor` on the default frequencies (`1 / (factor *
    base^(2i/n_rot))`, float32), and the attention factor given, else
    `sqrt(1 + ln(factor) / ln(original_max))` with `factor` given or
    `max_positions / original_max` (1 when factor <= 1)."""
    half = n_rot // 2
    tables = []
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if factors is None or len(factors) != half:
            got = "none" if factors is None else f"{len(factors)} values"
            raise CheckpointFormatError(f"longrope {key} must give {half} values (one per rotated pair), got {got}")
        exponents = np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / np.float32(n_rot)
        powers = (np.float32(base) ** exponents).astype(np.float32)
        tables.append((np.float32(1.0) / (np.asarray(factors, dtype=np.float32) * powers)).astype(np.float32))
    factor = scaling.get("factor")
    if factor is None:
        factor = max_positions / original_max
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    return LongRope(tables[0], tables[1], int(original_max), float(attention_factor))
