"""A span's forward pass in torch, with its sessions' KV caches on the same device.

Mirrors the CPU forward of rust/src/model/decoder.rs step for step (`DecoderSpan::forward_layers`,
`run` and `Pass::run`; `model::moe` for the experts; `compute::ops` for the norms and rotary
tables), from the weights as the Rust loader resolved them (`DecoderSpan.layer_weights`:
dequantized, fused and transposed layouts undone, norm offsets added), so every family the CPU
path runs runs here with no family code. The Rust span server keeps the sessions' book-keeping
(lengths, budgets, windows) and calls `TorchSpan` once per batch.

Norms, rotary embeddings, softmax, the router and the residual stream are float32; the weight
matrices are `dtype` and their products take activations cast to it. Attention is float32 over
keys and values read back from the cache, which stores them rounded to the span's KV dtype as the
CPU cache does, so f16 caches give the same values on both paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meshpy import _native
from meshpy.errors import ContextOverflowError, InvalidArgumentError, ShapeError
from meshpy.gpu.quant import QuantLinear

__all__ = ["TorchSpan"]

_KV_DTYPES = {"f16": torch.float16, "f32": torch.float32}
_NUMPY_KV_DTYPES = {"f16": np.float16, "f32": np.float32}

#: Roles stored as `dtype` (the products); every other role stays float32 (norms, biases,
#: sinks, scales and the router, which the CPU path never quantizes either: moe.rs `load`).
_MATRICES = frozenset(
    {
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
        "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ple_gate", "ple_proj",
    }
)  # fmt: skip
_FLOAT32 = frozenset(
    {
        "attn_norm", "ffn_norm", "attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_output_bias",
        "attn_sinks", "attn_q_norm", "attn_k_norm", "attn_post_norm", "ffn_post_norm",
        "layer_output_scale", "ffn_gate_inp", "ffn_gate_inp_bias", "ffn_gate_inp_scale",
        "ffn_down_exps_scale", "ffn_gate_exps_bias", "ffn_up_exps_bias", "ffn_down_exps_bias",
        "ffn_post_norm_1", "ffn_pre_norm_2", "ffn_post_norm_2", "ple_post_norm",
    }
)  # fmt: skip
_LAYER_INFO = frozenset({"sliding", "head_dim", "n_kv_heads", "kv_source"})

#: Positions a new cache layer holds before it grows (geometrically, never shrinking).
_MIN_CAPACITY = 64


@dataclass(frozen=True)
class _Moe:
    """decoder.rs `MoeConfig` (model/moe.rs)."""

    n_experts: int
    n_used: int
    norm_topk_prob: bool
    topk_softmax: bool  # `Gating::TopKSoftmax` (gpt-oss); else `Gating::Softmax`
    swiglu_clamp: tuple[float, float] | None  # (alpha, limit): `ClampedSwiglu`


@dataclass(frozen=True)
class _Settings:
    """The span config as decoder.rs `DecoderConfig` holds it (keys and defaults as
    rust/src/py/model.rs `decoder_config` reads them), with its per-layer shape helpers."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope_inv_freq: tuple[float, ...]
    rope_interleaved: bool
    rope_attention_factor: float
    attn_scale: float
    max_positions: int
    gelu_tanh: bool
    layer_sliding: tuple[bool, ...]
    sliding_window: int
    rope_local_inv_freq: tuple[float, ...]
    rope_long_inv_freq: tuple[float, ...]
    rope_long_from: int
    moe: _Moe | None
    global_head_dim: int
    global_n_kv_heads: int
    v_norm: bool
    kv_source: tuple[int | None, ...]
    per_layer_input: int
    n_layers: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _Settings:
        def required(key: str) -> Any:
            if d.get(key) is None:
                raise InvalidArgumentError(f"span config lacks {key!r}")
            return d[key]

        def optional(key: str, default: Any) -> Any:
            return default if d.get(key) is None else d[key]

        moe = None
        if optional("n_experts", None) is not None:
            gating = optional("expert_gating", "softmax")
            if gating not in ("softmax", "topk_softmax"):
                raise InvalidArgumentError(f'config["expert_gating"]: {gating!r} is not softmax or topk_softmax')
            clamp = optional("swiglu_clamp", None)
            moe = _Moe(
                n_experts=int(d["n_experts"]),
                n_used=int(required("n_experts_used")),
                norm_topk_prob=bool(required("norm_topk_prob")),
                topk_softmax=gating == "topk_softmax",
                swiglu_clamp=None if clamp is None else (float(clamp[0]), float(clamp[1])),
            )
        return cls(
            hidden=int(required("hidden")),
            n_heads=int(required("n_heads")),
            n_kv_heads=int(required("n_kv_heads")),
            head_dim=int(required("head_dim")),
            eps=float(required("eps")),
            rope_inv_freq=tuple(float(x) for x in required("rope_inv_freq")),
            rope_interleaved=bool(required("rope_interleaved")),
            rope_attention_factor=float(required("rope_attention_factor")),
            attn_scale=float(required("attn_scale")),
            max_positions=int(required("max_positions")),
            gelu_tanh=bool(optional("gelu_tanh", False)),
            layer_sliding=tuple(bool(s) for s in optional("layer_sliding", ())),
            sliding_window=int(optional("sliding_window", 0)),
            rope_local_inv_freq=tuple(float(x) for x in optional("rope_local_inv_freq", ())),
            rope_long_inv_freq=tuple(float(x) for x in optional("rope_long_inv_freq", ())),
            rope_long_from=int(optional("rope_long_from", 0)),
            moe=moe,
            global_head_dim=int(optional("global_head_dim", 0)),
            global_n_kv_heads=int(optional("global_n_kv_heads", 0)),
            v_norm=bool(optional("v_norm", False)),
            kv_source=tuple(None if s is None else int(s) for s in optional("kv_source", ())),
            per_layer_input=int(optional("per_layer_input", 0)),
            n_layers=int(optional("n_layers", 0)),
        )

    # The shape helpers of decoder.rs `DecoderConfig`, by model layer index.
    def is_sliding(self, layer: int) -> bool:
        return layer < len(self.layer_sliding) and self.layer_sliding[layer]

    def head_dim_of(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else (self.global_head_dim or self.head_dim)

    def kv_dim_of(self, layer: int) -> int:
        n_kv = self.n_kv_heads if self.is_sliding(layer) else (self.global_n_kv_heads or self.n_kv_heads)
        return n_kv * self.head_dim_of(layer)

    def carried(self, b: int) -> list[tuple[int, int, int]]:
        """`carried_sources(b)` with their layout in a row's carried part: (source layer, its
        kv_dim, offset); per source, keys then values (`run`'s `carried`)."""
        sources = sorted({s for layer, s in enumerate(self.kv_source) if s is not None and layer >= b and s < b})
        out, at = [], 0
        for src in sources:
            w = self.kv_dim_of(src)
            out.append((src, w, at))
            at += 2 * w
        return out

    def row_width(self, b: int) -> int:
        """`DecoderConfig::row_width`: hidden | per-layer inputs of layers b.. | carried K, V."""
        return self.hidden + max(self.n_layers - b, 0) * self.per_layer_input + sum(2 * w for _, w, _ in self.carried(b))


@dataclass(frozen=True)
class _Layer:
    """One loaded layer (decoder.rs `DecoderLayer`): its attention shape and weights by role."""

    sliding: bool
    head_dim: int
    n_kv_heads: int
    kv_source: int | None
    w: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Plan:
    """decoder.rs `KvPlan` of a run of span layers a..b."""

    kv_dims: list[int]  # per cache layer
    slot: list[int]  # per run layer: its cache layer
    imported: list[int]  # source layers outside the run (model indices)
    holders: dict[int, int]  # model layer -> cache layer holding its keys and values


@dataclass
class _Cache:
    """One session's keys and values for one layer range: per cache layer, `(capacity,
    kv_dim)` in the KV dtype, row `p` holding position `p`."""

    layers: tuple[int, int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class TorchSpan:
    """Layers of a loaded span as torch tensors on `device`, with its sessions' KV caches.

    A session's cache is a slot: an int the caller picks, made on first use for the span layer
    range it is used with (always the same one until freed). It holds the cache layers of
    decoder.rs `kv_plan` for that range, each keys and values `(capacity, kv_dim)` indexed by
    absolute position, grown geometrically and never shrunk: sliding-window layers mask keys
    outside the window rather than dropping them. A step from position `start` overwrites the
    positions from `start` on (a retry after the caller truncated rewrites them).

    Every sequence's rows go through each product together; attention runs per sequence.
    """

    def __init__(
        self, native: _native.DecoderSpan, config: dict[str, Any], device: torch.device | str, dtype: torch.dtype,
        quantized: Sequence[Mapping[str, QuantLinear]] | None = None,
    ) -> None:
        """Copies every layer of `native` (loaded with span config `config`) to `device`: the
        matrices as `dtype`, norms, biases, sinks, scales and the router as float32. Per
        layer, `quantized` may give some matrices as their stored GGUF blocks instead
        (`meshpy.gpu.quant`: multiplied by dequantize-in-the-matmul kernels, inputs as
        `dtype`)."""
        self.first_layer: int = native.first_layer
        self.n_layers: int = native.n_layers
        self.kv_dtype: str = native.kv_dtype
        self.device = torch.device(device)
        self.dtype = dtype
        self._cfg = _Settings.from_dict(config)
        # The row layout is decoder.rs's, rebuilt here to cut rows into their parts: checked.
        for b in range(self.first_layer, self.first_layer + self.n_layers + 1):
            here, there = self._cfg.row_width(b), _native.row_width(config, b)
            if here != there:
                raise InvalidArgumentError(f"row width at layer {b}: {here} here, {there} in Rust")
        blocks = quantized or [{}] * self.n_layers
        self._layers = [self._load_layer(native.layer_weights(i), blocks[i]) for i in range(self.n_layers)]
        # Rotary inverse frequencies (global, long from `rope_long_from` on, sliding layers').
        cfg = self._cfg
        freqs = {"global": cfg.rope_inv_freq, "long": cfg.rope_long_inv_freq, "local": cfg.rope_local_inv_freq}
        self._freqs = {name: torch.tensor(f, dtype=torch.float32, device=self.device) for name, f in freqs.items() if f}
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._caches: dict[int, _Cache] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of weights held on the device."""
        return sum(_nbytes(t) for layer in self._layers for t in layer.w.values())

    def _load_layer(self, exported: Mapping[str, Any], quantized: Mapping[str, QuantLinear]) -> _Layer:
        unknown = sorted(set(exported) - _MATRICES - _FLOAT32 - _LAYER_INFO)
        if unknown:
            raise InvalidArgumentError(f"layer weights with roles the torch span does not use: {unknown}")
        if set(quantized) - set(exported):
            raise InvalidArgumentError(f"stored blocks for roles this layer does not have: {sorted(set(quantized) - set(exported))}")
        w: dict[str, Any] = {
            role: _tensor(a).to(self.device, self.dtype if role in _MATRICES else torch.float32)
            for role, a in exported.items()
            if role not in _LAYER_INFO and role not in quantized
        }
        for role, linear in quantized.items():
            if (linear.rows, linear.cols) != exported[role].shape:
                raise InvalidArgumentError(f"{role}: stored blocks of {linear.rows}x{linear.cols}, loaded {exported[role].shape}")
            w[role] = _Quantized(linear, self.dtype)
        source = exported["kv_source"]
        return _Layer(
            sliding=bool(exported["sliding"]),
            head_dim=int(exported["head_dim"]),
            n_kv_heads=int(exported["n_kv_heads"]),
            kv_source=None if source is None else int(source),
            w=w,
        )

    # ---- KV store -------------------------------------------------------------------------

    def _plan(self, layers: tuple[int, int]) -> _Plan:
        """decoder.rs `kv_plan`: one cache layer per distinct holder (the layer's kv_source, or
        itself), in order of first appearance; a holder outside the run is imported."""
        a, b = layers
        if not 0 <= a < b <= self.n_layers:
            raise InvalidArgumentError(f"layers {a}..{b} of a span of {self.n_layers} layers")
        if (a, b) not in self._plans:
            plan = _Plan([], [], [], {})
            for li in range(a, b):
                own = self.first_layer + li
                holder = own if self._layers[li].kv_source is None else self._layers[li].kv_source
                if holder not in plan.holders:
                    if holder != own:
                        plan.imported.append(holder)
                    plan.holders[holder] = len(plan.kv_dims)
                    plan.kv_dims.append(self._cfg.kv_dim_of(holder))
                plan.slot.append(plan.holders[holder])
            self._plans[(a, b)] = plan
        return self._plans[(a, b)]

    def cache_widths(self, layers: tuple[int, int]) -> list[int]:
        """kv_dim of each cache layer of a session running span layers `layers` (the
        `cache_layer` indices of `read_rows` / `write_rows`)."""
        return list(self._plan((int(layers[0]), int(layers[1]))).kv_dims)

    def _cache(self, slot: int, layers: tuple[int, int]) -> _Cache:
        """Slot `slot`'s cache, made empty on first use for `layers`."""
        layers = (int(layers[0]), int(layers[1]))
        plan = self._plan(layers)
        cache = self._caches.get(slot)
        if cache is None:
            kv = _KV_DTYPES[self.kv_dtype]
            empty = [torch.zeros((0, w), dtype=kv, device=self.device) for w in plan.kv_dims]
            cache = self._caches[slot] = _Cache(layers, empty, [t.clone() for t in empty])
        elif cache.layers != layers:
            (a, b), (c, d) = cache.layers, layers
            raise InvalidArgumentError(f"slot {slot} holds layers {a}..{b}, not {c}..{d}")
        return cache

    def _reserve(self, cache: _Cache, n_positions: int) -> None:
        """Room for positions 0..n_positions in every cache layer; new rows are zeros (never
        garbage: a masked key's value still meets a zero weight in attention's product)."""
        if n_positions > self._cfg.max_positions:
            raise ContextOverflowError(f"{n_positions} positions; the model's context holds {self._cfg.max_positions}")
        for store in (cache.keys, cache.values):
            for i, t in enumerate(store):
                if t.shape[0] < n_positions:
                    capacity = min(max(n_positions, 2 * t.shape[0], _MIN_CAPACITY), self._cfg.max_positions)
                    grown = torch.zeros((capacity, t.shape[1]), dtype=t.dtype, device=t.device)
                    grown[: t.shape[0]] = t
                    store[i] = grown

    @torch.inference_mode()
    def fork(self, source: int, target: int, n_positions: int, layers: tuple[int, int]) -> None:
        """Slot `target` (made anew, replacing any) holds a copy of slot `source`'s first
        `n_positions` positions."""
        if source == target:
            raise InvalidArgumentError(f"slot {source} forked into itself")
        if source not in self._caches:
            if n_positions:
                raise InvalidArgumentError(f"slot {source} holds no positions to fork")
            self._caches.pop(target, None)  # made on first use
            return
        src = self._cache(source, layers)
        held = min(t.shape[0] for t in src.keys) if src.keys else n_positions
        if n_positions > held:
            raise InvalidArgumentError(f"slot {source} holds {held} positions, not {n_positions}")
        self._caches.pop(target, None)
        dst = self._cache(target, layers)
        self._reserve(dst, n_positions)
        for s, d in ((src.keys, dst.keys), (src.values, dst.values)):
            for i in range(len(s)):
                d[i][:n_positions] = s[i][:n_positions]

    @torch.inference_mode()
    def read_rows(
        self, slot: int, layers: tuple[int, int], cache_layer: int, start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions `start..end` of one cache layer, `(end - start, kv_dim)`
        numpy arrays in the KV dtype (float16 or float32)."""
        if slot not in self._caches:
            if start == end:  # a session that never ran here: nothing to hand over
                empty = np.zeros((0, self.cache_widths(layers)[cache_layer]), _NUMPY_KV_DTYPES[self.kv_dtype])
                return empty, empty.copy()
            raise InvalidArgumentError(f"slot {slot} holds no cache")
        cache = self._cache(slot, layers)
        keys, values = cache.keys[cache_layer], cache.values[cache_layer]
        if not 0 <= start <= end <= keys.shape[0]:
            raise InvalidArgumentError(f"positions {start}..{end} of a cache holding {keys.shape[0]}")
        # Copies, never views of the store (which later steps overwrite).
        return keys[start:end].to("cpu", copy=True).numpy(), values[start:end].to("cpu", copy=True).numpy()

    @torch.inference_mode()
    def write_rows(
        self, slot: int, layers: tuple[int, int], cache_layer: int, start: int, keys: np.ndarray, values: np.ndarray
    ) -> None:
        """Stores keys and values `(n, kv_dim)` at positions `start..start + n` of one cache
        layer (a session handed over from another worker)."""
        cache = self._cache(slot, layers)
        width = cache.keys[cache_layer].shape[1]
        if keys.shape != values.shape or keys.ndim != 2 or keys.shape[1] != width:
            raise ShapeError(f"keys {keys.shape} and values {values.shape} for a cache layer {width} wide")
        self._reserve(cache, start + keys.shape[0])
        kv = _KV_DTYPES[self.kv_dtype]
        for store, rows in ((cache.keys, keys), (cache.values, values)):
            store[cache_layer][start : start + rows.shape[0]] = _tensor(rows).to(self.device, kv)

    # ---- forward --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self, rows: np.ndarray, seqs: Sequence[tuple[int, int, int]], layers: tuple[int, int], freed: Sequence[int]
    ) -> np.ndarray:
        """Runs span layers `layers` = (a, b) over a batch: `rows` float32 `(sum of n_tokens,
        row_width(first_layer + a))`, sequence after sequence; `seqs` (slot, start, n_tokens),
        positions start..start + n_tokens (from `start` on, a slot's cached positions are
        overwritten). Returns float32 `(n_tok, row_width(first_layer + b))`: what
        decoder.rs `forward_layers` gives. The slots in `freed` are dropped first."""
        for slot in freed:
            self._caches.pop(slot, None)
        cfg, d = self._cfg, self._cfg.hidden
        a, b = int(layers[0]), int(layers[1])
        plan = self._plan((a, b))
        first, end = self.first_layer + a, self.first_layer + b
        w_in, w_out = cfg.row_width(first), cfg.row_width(end)
        n_tok = sum(n for _, _, n in seqs)
        if rows.shape != (n_tok, w_in):
            raise ShapeError(f"rows have shape {rows.shape}, expected {n_tok} tokens x {w_in}")
        if len({slot for slot, _, _ in seqs}) != len(seqs):
            raise InvalidArgumentError("a slot appears twice in one batch")
        if any(start + n > cfg.max_positions for _, start, n in seqs):
            raise ContextOverflowError(f"positions past the model's context of {cfg.max_positions}")
        caches = [self._cache(slot, (a, b)) for slot, _, _ in seqs]
        for cache, (_, start, n) in zip(caches, seqs):
            self._reserve(cache, start + n)
        if n_tok == 0:
            return np.zeros((0, w_out), np.float32)
        x = _tensor(rows.astype(np.float32, copy=False)).to(self.device)
        # Cut each row into its parts (`forward_layers`): hidden | per-layer inputs of the run's
        # layers, then of the layers after it | the carried sources' keys and values.
        p = cfg.per_layer_input
        ple_in, ple_run = max(cfg.n_layers - first, 0) * p, (b - a) * p
        hidden, per_layer, carry_in = x[:, :d], x[:, d : d + ple_run], x[:, d + ple_in :]
        spans = [(cache, start, n) for cache, (_, start, n) in zip(caches, seqs)]
        positions = torch.cat([torch.arange(start, start + n) for _, start, n in seqs]).to(self.device)

        # `run`: the carried sources this run imports into their cache mirrors, before any
        # layer reads them.
        carried_in, carried_out = cfg.carried(first), cfg.carried(end)
        for src, w, at in carried_in:
            if src in plan.imported:
                self._store(spans, plan.holders[src], carry_in[:, at : at + w], carry_in[:, at + w : at + 2 * w])

        tables = self._rope_tables(positions, any(layer.sliding for layer in self._layers[a:b]))
        for li in range(a, b):
            hidden = self._layer(li, li - a, hidden, per_layer, spans, plan.slot[li - a], tables)

        # The sources later spans share: read back from the caches (rounded as stored), or
        # passed through when this run does not hold them.
        parts = [hidden, x[:, d + ple_run : d + ple_in]]
        for src, w, _ in carried_out:
            if src in plan.holders:
                parts.append(_step_rows(spans, plan.holders[src]))
            else:
                at = next(at for s, _, at in carried_in if s == src)
                parts.append(carry_in[:, at : at + 2 * w])
        return torch.cat(parts, dim=1).cpu().numpy()

    def _store(self, spans: list[tuple[_Cache, int, int]], cache_layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Each sequence's rows of k and v `(n_tok, kv_dim)` at its positions of one cache
        layer, rounded to the KV dtype (the CPU cache's `write`)."""
        row = 0
        for cache, start, n in spans:
            cache.keys[cache_layer][start : start + n] = k[row : row + n]
            cache.values[cache_layer][start : start + n] = v[row : row + n]
            row += n

    def _rope_tables(self, positions: torch.Tensor, any_sliding: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`run`'s `tables`: per row, cos and sin of the global table (long frequencies from
        `rope_long_from` on, times the attention factor), and the sliding layers' own table
        when one of the run's layers slides and the model has one."""
        cfg, freqs = self._cfg, self._freqs
        long = (freqs["long"], cfg.rope_long_from) if "long" in freqs else None
        tables = {"global": _rope_table(positions, freqs["global"], long, cfg.rope_attention_factor)}
        if any_sliding and "local" in freqs:
            tables["local"] = _rope_table(positions, freqs["local"], None, 1.0)
        return tables

    def _layer(
        self,
        li: int,
        run_index: int,
        x: torch.Tensor,
        per_layer: torch.Tensor,
        spans: list[tuple[_Cache, int, int]],
        cache_layer: int,
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """One layer over the batch's hidden states `x` (n_tok, hidden), float32 (`Pass::run`'s
        loop body)."""
        cfg, layer = self._cfg, self._layers[li]
        w, eps = layer.w, cfg.eps
        x = x + self._attention(layer, x, spans, cache_layer, tables)

        # The feed-forward block (`Ffn`), then its residual add (`project_residual` /
        # `moe_residual`), RMS-normed first where the layer has `ffn_post_norm`.
        if "ffn_gate_inp" not in w:  # Ffn::Dense
            out = self._mlp(w, _rms_norm(x, w["ffn_norm"], eps))
        elif "ffn_pre_norm_2" not in w:  # Ffn::Moe: the router reads the MLP's normed input
            normed = _rms_norm(x, w["ffn_norm"], eps)
            out = self._experts(w, normed, normed)
        else:
            # Ffn::Parallel (Gemma 4): the dense MLP on the ffn_norm-normed residual, the experts
            # on the moe_norm-normed one; the router on the residual normed with its scale
            # times hidden^-0.5 (Gemma4TextRouter); each branch normed, then summed.
            dense = self._mlp(w, _rms_norm(x, w["ffn_norm"], eps))
            normed = _rms_norm(x, w["ffn_pre_norm_2"], eps)
            router_in = normed
            if "ffn_gate_inp_scale" in w:
                router_in = _rms_norm(x, w["ffn_gate_inp_scale"], eps) * np.float32(cfg.hidden) ** np.float32(-0.5)
            moe = self._experts(w, normed, router_in)
            out = _rms_norm(dense, w["ffn_post_norm_1"], eps) + _rms_norm(moe, w["ffn_post_norm_2"], eps)
        if "ffn_post_norm" in w:
            out = _rms_norm(out, w["ffn_post_norm"], eps)
        x = x + out

        # Gemma 4's per-layer input: x += post_norm(proj(gelu_tanh(gate(x)) * input)).
        if "ple_gate" in w:
            p = cfg.per_layer_input
            g = _linear(x, w["ple_gate"])
            g = F.gelu(g, approximate="tanh") * per_layer[:, run_index * p : (run_index + 1) * p]
            x = x + _rms_norm(_linear(g, w["ple_proj"]), w["ple_post_norm"], eps)
        # Gemma 4's layer_scalar scales the whole hidden state, residual included.
        if "layer_output_scale" in w:
            x = x * w["layer_output_scale"]
        return x

    def _attention(
        self,
        layer: _Layer,
        x: torch.Tensor,
        spans: list[tuple[_Cache, int, int]],
        cache_layer: int,
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The attention branch's residual term (`Pass::run` up to `project_residual` of wo):
        q/k/v, per-head norms, RoPE, the cache write, attention, the output projection."""
        cfg, w = self._cfg, layer.w
        n_tok, hd, n_kv = x.shape[0], layer.head_dim, layer.n_kv_heads
        xn = _rms_norm(x, w["attn_norm"], cfg.eps)
        q = _linear(xn, w["attn_q"], w.get("attn_q_bias")).view(n_tok, cfg.n_heads, hd)
        cos, sin = tables["local"] if layer.sliding and "local" in tables else tables["global"]
        q = _rope(_head_norm(q, w.get("attn_q_norm"), cfg.eps), cos, sin, cfg.rope_interleaved)
        if layer.kv_source is None:
            k = _linear(xn, w["attn_k"], w.get("attn_k_bias")).view(n_tok, n_kv, hd)
            # Gemma 4's attention_k_eq_v: values are the keys' projection before k norm and RoPE.
            v = k if "attn_v" not in w else _linear(xn, w["attn_v"], w.get("attn_v_bias")).view(n_tok, n_kv, hd)
            k = _rope(_head_norm(k, w.get("attn_k_norm"), cfg.eps), cos, sin, cfg.rope_interleaved)
            if cfg.v_norm:
                v = _rms_norm(v, 1.0, cfg.eps)  # without a weight
            self._store(spans, cache_layer, k.reshape(n_tok, -1), v.reshape(n_tok, -1))

        # Attention per sequence over its cached keys and values, read back as stored (the
        # step's own included): `attend_heads` / compute::attention `attend`.
        window = cfg.sliding_window if layer.sliding else 0
        outs, row = [], 0
        for cache, start, n in spans:
            outs.append(
                _attend(
                    q[row : row + n],
                    cache.keys[cache_layer],
                    cache.values[cache_layer],
                    start,
                    window,
                    n_kv,
                    cfg.attn_scale,
                    w.get("attn_sinks"),
                )
            )
            row += n
        att = torch.cat(outs).reshape(n_tok, cfg.n_heads * hd)
        out = _linear(att, w["attn_output"], w.get("attn_output_bias"))
        if "attn_post_norm" in w:
            out = _rms_norm(out, w["attn_post_norm"], cfg.eps)
        return out

    def _mlp(self, w: dict[str, torch.Tensor], xn: torch.Tensor) -> torch.Tensor:
        """A dense gated MLP on normed rows (`gated_mlp` then the down projection)."""
        return _linear(_glu(_linear(xn, w["ffn_gate"]), _linear(xn, w["ffn_up"]), self._cfg.gelu_tanh), w["ffn_down"])

    def _experts(self, w: dict[str, torch.Tensor], normed: torch.Tensor, router_in: torch.Tensor) -> torch.Tensor:
        """The mixture of experts on `normed` rows routed by `router_in` (`moe_residual`, before
        its post-norm): each chosen expert's MLP over its rows, grouped by expert as
        moe.rs `Routing` groups its slots, and per row the weighted outputs summed in ascending
        expert order."""
        moe = self._cfg.moe
        if moe is None:
            raise InvalidArgumentError("a layer names a router (ffn_gate_inp) but the config has no experts")
        n_tok, k = normed.shape[0], moe.n_used
        logits = F.linear(router_in, w["ffn_gate_inp"])
        if "ffn_gate_inp_bias" in w:
            logits = logits + w["ffn_gate_inp_bias"]
        chosen, weight = _route(logits, moe)  # (n_tok, k) each, experts ascending per row
        if "ffn_down_exps_scale" in w:
            weight = weight * w["ffn_down_exps_scale"][chosen]
        flat = chosen.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # slots grouped by expert, rows ascending
        counts = torch.bincount(flat, minlength=moe.n_experts).tolist()
        slot_out = torch.empty((n_tok * k, normed.shape[1]), dtype=torch.float32, device=normed.device)
        offset = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[offset : offset + count]
            xe = normed[slots // k]
            gate = _linear(xe, w["ffn_gate_exps"][e], _expert_bias(w, "ffn_gate_exps_bias", e))
            up = _linear(xe, w["ffn_up_exps"][e], _expert_bias(w, "ffn_up_exps_bias", e))
            if moe.swiglu_clamp is None:
                act = _glu(gate, up, self._cfg.gelu_tanh)
            else:
                act = _clamped_swiglu(gate, up, *moe.swiglu_clamp)
            slot_out[slots] = _linear(act, w["ffn_down_exps"][e], _expert_bias(w, "ffn_down_exps_bias", e))
            offset += count
        weighted = (slot_out * weight.reshape(-1, 1)).view(n_tok, k, -1)
        total = torch.zeros_like(normed)
        for j in range(k):  # ops::axpy per slot, in expert order
            total = total + weighted[:, j]
        return total


# ---- helpers: compute::ops and moe.rs, on whole batches ----------------------------------


@dataclass(frozen=True)
class _Quantized:
    """A matrix kept in its GGUF blocks, multiplied with inputs cast to `dtype`."""

    linear: QuantLinear
    dtype: torch.dtype


def _nbytes(weight: torch.Tensor | _Quantized) -> int:
    if isinstance(weight, _Quantized):
        return weight.linear.blocks.numel()
    return weight.numel() * weight.element_size()


def _linear(x: torch.Tensor, weight: torch.Tensor | _Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` with x cast to the weight's dtype, the result float32 (the bias,
    float32, added after; `QMatrix::matmul_part`)."""
    if isinstance(weight, _Quantized):
        y = weight.linear.forward(x.to(weight.dtype)).float()
    else:
        y = F.linear(x.to(weight.dtype), weight).float()
    return y if bias is None else y + bias


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor of `a`'s values (copied when `a` is read-only, e.g. `np.frombuffer` of
    bytes, or not contiguous: torch takes neither)."""
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, order="C")
    return torch.from_numpy(a)


def _step_rows(spans: list[tuple[_Cache, int, int]], cache_layer: int) -> torch.Tensor:
    """Each sequence's keys, then values, at its step's positions of one cache layer, as
    stored, widened to float32 `(n_tok, 2 * kv_dim)` (a carried source's layout)."""
    rows = [torch.cat((c.keys[cache_layer][s : s + n], c.values[cache_layer][s : s + n]), dim=1) for c, s, n in spans]
    return torch.cat(rows).float()


def _expert_bias(w: dict[str, torch.Tensor], role: str, e: int) -> torch.Tensor | None:
    return w[role][e] if role in w else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | float, eps: float) -> torch.Tensor:
    """ops::rms_norm over the last dimension: `x * (1 / sqrt(mean(x^2) + eps)) * weight`."""
    scale = 1.0 / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + np.float32(eps))
    return x * scale * weight


def _head_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Per-head RMSNorm `(n, heads, head_dim)` when the layer has one (`norm_heads`)."""
    return x if weight is None else _rms_norm(x, weight, eps)


def _rope_table(
    positions: torch.Tensor, inv_freq: torch.Tensor, long: tuple[torch.Tensor, int] | None, factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ops::rope_table per row `(n_tok, len(inv_freq))`: the angle `position * f` formed in
    float32, its cos and sin in float64 rounded once; frequencies `long` from its position on
    (LongRoPE); times `factor` (YaRN's attention factor) when not 1."""
    freqs = inv_freq.expand(positions.shape[0], -1)
    if long is not None:
        freqs = torch.where((positions >= long[1])[:, None], long[0], freqs)
    angle = (positions.float()[:, None] * freqs).double()
    cos, sin = angle.cos().float(), angle.sin().float()
    if factor != 1.0:
        cos, sin = cos * np.float32(factor), sin * np.float32(factor)
    return cos, sin


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """ops::rope_apply on `(n, heads, head_dim)` with per-row tables `(n, half)`: pairs (2i,
    2i+1) when `interleaved` (GGUF Llama), else (i, i + half); dims past 2 * half pass."""
    half = cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        pairs = rot.unflatten(-1, (half, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rot = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    else:
        x0, x1 = rot[..., :half], rot[..., half:]
        rot = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    window: int,
    n_kv: int,
    scale: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One sequence's attention: queries `(n, heads, hd)` at positions start..start + n over
    cache rows `(capacity, n_kv * hd)`; position p sees keys `p - window < k <= p` (`window`
    0: all of 0..=p). Query head h reads KV head h // (heads / n_kv). With `sinks`, one logit
    per head joins each softmax's denominator (attention.rs `attend`). Returns `(n, heads, hd)`."""
    n, n_heads, hd = q.shape
    lo = max(0, start + 1 - window) if window else 0
    k = keys[lo : start + n].float().view(-1, n_kv, hd).transpose(0, 1)  # (n_kv, L, hd)
    v = values[lo : start + n].float().view(-1, n_kv, hd).transpose(0, 1)
    qh = q.transpose(0, 1)  # (heads, n, hd)
    mask = None
    if n > 1:  # a single row sees every key from lo on
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(lo, start + n, device=q.device)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
    if sinks is None:
        out = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]
        return out.transpose(0, 1)
    group = n_heads // n_kv
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = torch.matmul(qh, k.transpose(1, 2)) * np.float32(scale)  # (heads, n, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # The sink's logit joins the softmax; its probability is dropped.
    probs = torch.softmax(torch.cat((scores, sinks[:, None, None].expand(-1, n, 1)), dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, v).transpose(0, 1)


def _glu(gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    """ops::silu_mul (SwiGLU) or ops::gelu_tanh_mul (GeGLU, Gemma)."""
    return (F.gelu(gate, approximate="tanh") if gelu_tanh else F.silu(gate)) * up


def _clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """moe.rs `ClampedSwiglu::apply` (gpt-oss)."""
    x = gate.clamp(max=limit)
    y = up.clamp(-limit, limit)
    return x * torch.sigmoid(x * np.float32(alpha)) * (y + 1.0)


def _route(logits: torch.Tensor, moe: _Moe) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.rs `Routing::new`: per row the `n_used` experts of highest logit (the lower index
    first among equals), ascending, with their softmax probability over every expert
    (renormalized when `norm_topk_prob`), or a softmax over the chosen logits only."""
    top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : moe.n_used]
    top = torch.sort(top, dim=1).values
    if moe.topk_softmax:
        return top, torch.softmax(logits.gather(1, top), dim=1)
    probs = torch.softmax(logits, dim=1).gather(1, top)
    if moe.norm_topk_prob:
        probs = probs * (1.0 / probs.sum(dim=1, keepdim=True))
    return top, probs
