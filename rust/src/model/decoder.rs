//! The decoder layers of every supported family on the CPU, run as a span (layers a..b): one
//! layer whose options (biases, norms, fused tensors, sliding windows, a mixture of experts)
//! come from the config and from which roles the family module names.
//!
//! Follows transformers' models/llama/modeling_llama.py (LlamaDecoderLayer: RMSNorm ->
//! grouped-query attention with RoPE -> residual; RMSNorm -> SwiGLU MLP -> residual) and
//! llama.cpp's llm_build_llama for the GGUF layout. Rotary frequencies (with any scaling:
//! Llama 3, linear, ...) come precomputed from the Python family module.
//!
//! The Qwen families are this layer with optional parts, present when the checkpoint names
//! their tensors: q/k/v biases (Qwen2/Qwen2.5, transformers' models/qwen2/modeling_qwen2.py:
//! `q_proj`/`k_proj`/`v_proj` with `bias=True`) and a per-head RMSNorm of q and k between the
//! projection and RoPE (Qwen3, models/qwen3/modeling_qwen3.py: `q_norm(q_proj(x).view(..,
//! head_dim))`, then `apply_rotary_pos_emb`). `head_dim` is its own setting (Qwen3 sets it,
//! so `n_heads * head_dim` may differ from `hidden`).
//!
//! Gemma 3's text model (transformers' models/gemma3/modeling_gemma3.py) is this layer with
//! more options: norms computing `x * (1 + weight)` (`norm_offset`, added at load), the
//! attention and MLP outputs RMS-normed before their residual adds (`attn_post_norm`,
//! `ffn_post_norm`: Gemma3DecoderLayer's `post_attention_layernorm` /
//! `post_feedforward_layernorm`), a GELU-tanh gated MLP, and sliding-window layers that
//! attend over the last `sliding_window` positions with their own rotary table.
//!
//! The Phi-3 family (transformers' models/phi3/modeling_phi3.py) is this layer with fused
//! projections, read as row ranges of one tensor (`qkv_proj`: q, k, v rows; `gate_up_proj`:
//! gate, then up rows; see `weights::tensor_ref`), partial rotary embeddings (fewer
//! frequencies than `head_dim / 2`: only the first dims rotate, as apply_rotary_pos_emb's
//! `q_rot` / `q_pass`), LongRoPE (a second rotary table from a position on,
//! `rope_long_inv_freq`), and a sliding window on every layer that rotates with the global
//! table (`rope_local_inv_freq` empty).
//!
//! Qwen3-MoE (transformers' models/qwen3_moe/modeling_qwen3_moe.py) is the Qwen3 layer whose
//! MLP is a mixture of experts on the layers that name a router (`model::moe`).
//!
//! One forward call runs a batch of sequence chunks (each a session's next tokens with its
//! own KV cache) through every layer of the span, or through a contiguous sub-range of its
//! layers ([`DecoderSpan::forward_layers`], with caches of that many layers); all threads of the
//! pool run the whole pass and meet at barriers between ops (see `compute::pool`).

use std::ops::Range;

use crate::checkpoint::Checkpoint;
use crate::compute::{attention, fastmath, ops, ActRows, ActRowsMut, Ctx, QMatrix, SharedMut, ThreadPool};
use crate::error::{Error, Result};
use crate::model::kv_cache::{KvCache, KvDtype, KvLayout, LayerShared, RowsShared};
use crate::model::moe::{MoeBlock, MoeConfig, Routing};
use crate::model::weights::{expect_shape, LayerNames, LayerTensors};
use crate::quant::GgmlType;

/// Settings of a decoder span, read from the checkpoint by the Python family module.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// Width of the hidden states.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Rotary inverse frequencies, one per rotated pair (`n_rot / 2` values), scaling applied.
    pub rope_inv_freq: Vec<f32>,
    /// Whether rotary pairs are adjacent (GGUF Llama) or half a head apart (HF layout).
    pub rope_interleaved: bool,
    /// Factor on the rotary cos/sin (1.0 unless a scaling type such as YaRN sets it).
    pub rope_attention_factor: f32,
    /// Multiplier of q.k scores (usually `1/sqrt(head_dim)`).
    pub attn_scale: f32,
    /// Positions a session may reach (the model's context length).
    pub max_positions: usize,
    /// Convert float weight matrices to this type at load (Q8_0 or Q4_0), if set.
    pub quantize: Option<GgmlType>,
    /// Added to every RMSNorm weight at load: 0 (Llama), or 1 for Gemma 3, whose
    /// Gemma3RMSNorm computes `x_normed * (1.0 + weight)` in f32 (transformers'
    /// models/gemma3/modeling_gemma3.py), q/k norms included.
    pub norm_offset: f32,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma 3) gating the MLP
    /// instead of SiLU.
    pub gelu_tanh: bool,
    /// Per model layer (indexed from layer 0, not the span's first): whether it is a
    /// sliding-window layer. Empty: none is.
    pub layer_sliding: Vec<bool>,
    /// Positions a sliding-window layer's query sees, itself included (transformers'
    /// `sliding_window`: keys with `q - window < k <= q`).
    pub sliding_window: usize,
    /// Rotary inverse frequencies of the sliding-window layers (Gemma 3's
    /// `rope_local_base_freq`, unscaled), as many as `rope_inv_freq`; empty: sliding layers
    /// rotate as the others do (Phi-3, whose every layer slides).
    pub rope_local_inv_freq: Vec<f32>,
    /// Rotary inverse frequencies for positions `rope_long_from` and later, as many as
    /// `rope_inv_freq`, with the same attention factor; empty: one table for all positions.
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): `rope_inv_freq` holds the short-factor
    /// frequencies, this the long-factor ones, `rope_long_from` is
    /// `original_max_position_embeddings`. transformers (modeling_rope_utils.py,
    /// `longrope_frequency_update`) picks one table per forward call, long when
    /// `max(position_ids) + 1 > original_max_position_embeddings`; choosing per position equals
    /// that for token-by-token decoding (each step's one position decides, and cached keys keep
    /// the rotation they were stored with, as in transformers' cache). It differs only for a
    /// single call whose positions cross the boundary (a long prefill): transformers rotates
    /// all of that call's positions with the long table, this the ones before it with the short.
    pub rope_long_inv_freq: Vec<f32>,
    /// First position that uses `rope_long_inv_freq`.
    pub rope_long_from: usize,
    /// How sessions' KV caches store keys and values; `None`: [`DecoderSpan::default_kv_dtype`].
    pub kv_dtype: Option<KvDtype>,
    /// The mixture-of-experts settings of layers whose names include a router
    /// (`ffn_gate_inp`); `None`: no layer may have one.
    pub moe: Option<MoeConfig>,
    /// Width of one head in global (not sliding-window) layers; 0: `head_dim`. Gemma 4's
    /// global layers have wider heads (`global_head_dim`) than its sliding ones.
    pub global_head_dim: usize,
    /// Key/value heads of global layers; 0: `n_kv_heads` (Gemma 4 with `attention_k_eq_v`:
    /// `num_global_key_value_heads`).
    pub global_n_kv_heads: usize,
    /// Whether values are RMS-normed per head, without a weight, before they are cached
    /// (Gemma 4's `v_norm`).
    pub v_norm: bool,
    /// Per model layer: the earlier layer whose cached keys and values it attends over
    /// instead of computing its own (Gemma 4's KV-shared layers, `num_kv_shared_layers`), of
    /// the same attention type. Empty, or `None` for a layer: its own.
    pub kv_source: Vec<Option<usize>>,
    /// Width of each layer's per-layer input (Gemma 4's `hidden_size_per_layer_input`,
    /// computed by the End model from the token ids and sent with the hidden states); 0: the
    /// model has none.
    pub per_layer_input: usize,
    /// Layers of the whole model (what the rows between spans carry depends on it, see
    /// [`DecoderConfig::row_width`]); 0 when neither per-layer inputs nor shared keys and
    /// values are used.
    pub n_layers: usize,
}

impl DecoderConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.hidden == 0 || self.head_dim == 0 {
            return bad("hidden and head_dim must be positive".into());
        }
        for kv in [self.n_kv_heads, self.global_n_kv_heads()] {
            if self.n_heads == 0 || kv == 0 || !self.n_heads.is_multiple_of(kv) {
                return bad(format!("n_heads {} must be a multiple of the key/value heads {kv}", self.n_heads));
            }
        }
        if self.rope_inv_freq.len() * 2 > self.global_head_dim() {
            return bad(format!("{} rotary pairs exceed head_dim {}", self.rope_inv_freq.len(), self.global_head_dim()));
        }
        if let Some(moe) = &self.moe {
            moe.validate()?;
        }
        if !self.rope_long_inv_freq.is_empty() && self.rope_long_inv_freq.len() != self.rope_inv_freq.len() {
            return bad(format!(
                "{} long-context rotary frequencies, {} short ones",
                self.rope_long_inv_freq.len(),
                self.rope_inv_freq.len()
            ));
        }
        if self.layer_sliding.iter().any(|&s| s) {
            if self.sliding_window == 0 {
                return bad("sliding-window layers need a positive sliding_window".into());
            }
            let table = if self.rope_local_inv_freq.is_empty() { &self.rope_inv_freq } else { &self.rope_local_inv_freq };
            if table.len() * 2 > self.head_dim {
                return bad(format!("{} sliding-layer rotary pairs exceed head_dim {}", table.len(), self.head_dim));
            }
        }
        if (self.per_layer_input > 0 || !self.kv_source.is_empty()) && self.n_layers == 0 {
            return bad("per-layer inputs and shared keys and values need the model's n_layers".into());
        }
        if !self.kv_source.is_empty() && self.kv_source.len() != self.n_layers {
            return bad(format!("kv_source names {} layers of a {}-layer model", self.kv_source.len(), self.n_layers));
        }
        for (layer, src) in self.kv_source.iter().enumerate() {
            if let Some(src) = *src {
                if src >= layer || self.kv_source_of(src).is_some() || self.is_sliding(src) != self.is_sliding(layer) {
                    return bad(format!(
                        "layer {layer} shares the keys and values of layer {src}: a source must be an earlier layer \
                         of the same attention type with keys and values of its own"
                    ));
                }
            }
        }
        Ok(())
    }

    fn global_head_dim(&self) -> usize {
        if self.global_head_dim == 0 { self.head_dim } else { self.global_head_dim }
    }

    fn global_n_kv_heads(&self) -> usize {
        if self.global_n_kv_heads == 0 { self.n_kv_heads } else { self.global_n_kv_heads }
    }

    /// Width of one head of model layer `layer`.
    fn head_dim_of(&self, layer: usize) -> usize {
        if self.is_sliding(layer) { self.head_dim } else { self.global_head_dim() }
    }

    /// Key/value heads of model layer `layer`.
    fn n_kv_heads_of(&self, layer: usize) -> usize {
        if self.is_sliding(layer) { self.n_kv_heads } else { self.global_n_kv_heads() }
    }

    fn kv_dim_of(&self, layer: usize) -> usize {
        self.n_kv_heads_of(layer) * self.head_dim_of(layer)
    }

    fn q_dim_of(&self, layer: usize) -> usize {
        self.n_heads * self.head_dim_of(layer)
    }

    /// Whether model layer `layer` attends over a sliding window.
    fn is_sliding(&self, layer: usize) -> bool {
        self.layer_sliding.get(layer).copied().unwrap_or(false)
    }

    /// The layer whose keys and values model layer `layer` attends over, when not its own.
    fn kv_source_of(&self, layer: usize) -> Option<usize> {
        self.kv_source.get(layer).copied().flatten()
    }

    /// Source layers whose keys and values cross boundary `b` (the rows entering model layer
    /// `b`): sources before `b` shared by a layer from `b` on, in order.
    fn carried_sources(&self, b: usize) -> Vec<usize> {
        let mut out: Vec<usize> =
            self.kv_source.iter().enumerate().filter_map(|(l, src)| src.filter(|&s| l >= b && s < b)).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Values per row entering model layer `b` (a span boundary; `n_layers` is the model's
    /// end): the hidden state, then the per-layer inputs of layers `b..` (Gemma 4 E2B/E4B,
    /// computed by the End model), then this step's keys and values of the source layers
    /// that layers from `b` on share (`carried_sources`: per source, keys then values), so a
    /// split inside a KV-sharing group gives the same bits as one span. Without either, the
    /// hidden state alone.
    pub fn row_width(&self, b: usize) -> usize {
        self.hidden
            + self.n_layers.saturating_sub(b) * self.per_layer_input
            + self.carried_sources(b).iter().map(|&s| 2 * self.kv_dim_of(s)).sum::<usize>()
    }

    /// Where a run of span layers `layers` (relative to `first_layer`) keeps its keys and
    /// values: one cache layer per layer holding its own, and one per source layer outside
    /// the run that a layer of it shares.
    pub(crate) fn kv_plan(&self, first_layer: usize, layers: Range<usize>) -> KvPlan {
        let mut plan = KvPlan { layouts: Vec::new(), slot: Vec::new(), imported: Vec::new(), holders: Vec::new() };
        for l in layers {
            let own = first_layer + l;
            let holder = self.kv_source_of(own).unwrap_or(own);
            let slot = match plan.slot_of(holder) {
                Some(slot) => slot,
                None => {
                    if holder != own {
                        plan.imported.push(holder);
                    }
                    plan.layouts.push(self.kv_layout_of(holder));
                    plan.holders.push((holder, plan.layouts.len() - 1));
                    plan.layouts.len() - 1
                }
            };
            plan.slot.push(slot);
        }
        plan
    }

    /// The cache layers' shapes of a run of span layers `layers` (see `kv_plan`).
    pub fn kv_layouts(&self, first_layer: usize, layers: Range<usize>) -> Vec<KvLayout> {
        self.kv_plan(first_layer, layers).layouts
    }

    /// KV bytes one more position costs a session running span layers `layers` with caches
    /// of `dtype`, at most (sliding-window layers give theirs back once they drop old
    /// positions).
    pub fn kv_bytes_per_position(&self, first_layer: usize, layers: Range<usize>, dtype: KvDtype) -> usize {
        self.kv_layouts(first_layer, layers).iter().map(|l| 2 * l.kv_dim * dtype.size()).sum()
    }

    /// The cache shape of model layer `layer`'s keys and values.
    fn kv_layout_of(&self, layer: usize) -> KvLayout {
        KvLayout { window: self.is_sliding(layer).then_some(self.sliding_window), kv_dim: self.kv_dim_of(layer) }
    }
}

/// One decoder layer's weights.
struct DecoderLayer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    /// Key and value projections; `None` on a layer attending over another layer's keys and
    /// values (`kv_source`), and `wv` alone where values are the keys' projection (Gemma 4's
    /// `attention_k_eq_v`: `value_states = key_states` before the k norm).
    wk: Option<QMatrix>,
    wv: Option<QMatrix>,
    wo: QMatrix,
    /// q/k/v projection biases (Qwen2), `q_dim` / `kv_dim` / `kv_dim` values.
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    /// The attention output projection's bias (gpt-oss), `hidden` values.
    bo: Option<Vec<f32>>,
    /// Per query head, a logit that joins each softmax's denominator (gpt-oss's sinks).
    sinks: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of q and k before RoPE (Qwen3), `head_dim` values each.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// RMSNorm of the attention output before the residual add (Gemma 3's
    /// `post_attention_layernorm`), `hidden` values.
    attn_post_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// RMSNorm of the MLP output before the residual add (Gemma 3's
    /// `post_feedforward_layernorm`), `hidden` values.
    ffn_post_norm: Option<Vec<f32>>,
    /// Whether this layer attends over a sliding window with the local rotary table.
    sliding: bool,
    /// Its attention shape (Gemma 4's global layers differ from its sliding ones).
    head_dim: usize,
    n_kv_heads: usize,
    /// The model layer whose cached keys and values this layer attends over, when not its own.
    kv_source: Option<usize>,
    ffn: Ffn,
    /// Gemma 4's per-layer input block, after the MLP.
    per_layer: Option<PerLayerBlock>,
    /// Multiplier of the whole hidden state at the layer's end (Gemma 4's `layer_scalar`).
    output_scale: Option<f32>,
}

/// Gemma 4's per-layer input (transformers' Gemma4DecoderLayer, `hidden_size_per_layer_input`):
/// `x += post_norm(proj(gelu_tanh(gate(x)) * input))`, `input` being this layer's slice of the
/// per-layer inputs the End model computes from the token ids.
struct PerLayerBlock {
    /// `(per_layer_input, hidden)`.
    gate: QMatrix,
    /// `(hidden, per_layer_input)`.
    proj: QMatrix,
    post_norm: Vec<f32>,
}

/// A layer's feed-forward block.
#[allow(clippy::large_enum_variant)] // one per layer: boxing would only add an indirection
enum Ffn {
    /// One gated MLP: gate and up `(ffn, hidden)`, down `(hidden, ffn)`.
    Dense { gate: QMatrix, up: QMatrix, down: QMatrix },
    /// A mixture of experts (see `model::moe`).
    Moe(MoeBlock),
    /// Gemma 4's 26B-A4B block (Gemma4TextDecoderLayer with `enable_moe_block`): the dense MLP
    /// on the `ffn_norm`-normed residual and the experts on the `moe_norm`-normed one side by
    /// side, each output RMS-normed (`dense_post_norm`, `moe_post_norm`), and their sum normed
    /// by the layer's `ffn_post_norm` before the residual add.
    Parallel {
        gate: QMatrix,
        up: QMatrix,
        down: QMatrix,
        moe: MoeBlock,
        dense_post_norm: Vec<f32>,
        moe_norm: Vec<f32>,
        moe_post_norm: Vec<f32>,
    },
}

impl Ffn {
    fn matrices(&self) -> Vec<&QMatrix> {
        match self {
            Ffn::Dense { gate, up, down } => vec![gate, up, down],
            Ffn::Moe(moe) => moe_matrices(moe).collect(),
            Ffn::Parallel { gate, up, down, moe, .. } => [gate, up, down].into_iter().chain(moe_matrices(moe)).collect(),
        }
    }

    /// The dense MLP's gate, up and down, if the block has one.
    fn dense(&self) -> Option<[&QMatrix; 3]> {
        match self {
            Ffn::Dense { gate, up, down } | Ffn::Parallel { gate, up, down, .. } => Some([gate, up, down]),
            Ffn::Moe(_) => None,
        }
    }

    /// The experts, if the block has them.
    fn moe(&self) -> Option<&MoeBlock> {
        match self {
            Ffn::Moe(moe) | Ffn::Parallel { moe, .. } => Some(moe),
            Ffn::Dense { .. } => None,
        }
    }

    /// The block's norm weights beyond the layer's (Gemma 4's three).
    fn norms(&self) -> usize {
        match self {
            Ffn::Parallel { dense_post_norm, moe_norm, moe_post_norm, .. } => dense_post_norm.len() + moe_norm.len() + moe_post_norm.len(),
            _ => 0,
        }
    }
}

fn moe_matrices(moe: &MoeBlock) -> impl Iterator<Item = &QMatrix> {
    std::iter::once(&moe.router).chain(moe.experts.iter().flat_map(|e| [&e.gate, &e.up, &e.down]))
}

impl DecoderLayer {
    fn load(checkpoint: &Checkpoint, cfg: &DecoderConfig, layer: usize, names: LayerNames) -> Result<Self> {
        let mut t = LayerTensors::new(checkpoint, names, cfg.quantize);
        let (hd, kv_dim, q_dim) = (cfg.head_dim_of(layer), cfg.kv_dim_of(layer), cfg.q_dim_of(layer));
        let kv_source = cfg.kv_source_of(layer);
        // Roles a checkpoint may lack (the Qwen options): loaded when named.
        let optional = |t: &mut LayerTensors, role: &str, len: usize| -> Result<Option<Vec<f32>>> {
            if t.has(role) {
                t.vector(role, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let (bq, bk, bv) = (
            optional(&mut t, "attn_q_bias", q_dim)?,
            optional(&mut t, "attn_k_bias", kv_dim)?,
            optional(&mut t, "attn_v_bias", kv_dim)?,
        );
        let (bo, sinks) = (optional(&mut t, "attn_output_bias", cfg.hidden)?, optional(&mut t, "attn_sinks", cfg.n_heads)?);
        let (q_norm, k_norm) = (optional(&mut t, "attn_q_norm", hd)?, optional(&mut t, "attn_k_norm", hd)?);
        // A layer sharing another's keys and values has no k norm of its own.
        if q_norm.is_some() != (k_norm.is_some() || kv_source.is_some()) {
            return Err(Error::InvalidArgument("attn_q_norm and attn_k_norm come together".into()));
        }
        let (attn_post_norm, ffn_post_norm) =
            (optional(&mut t, "attn_post_norm", cfg.hidden)?, optional(&mut t, "ffn_post_norm", cfg.hidden)?);
        let (wk, wv) = match kv_source {
            Some(_) => (None, None),
            None => (Some(t.matrix("attn_k")?), if t.has("attn_v") { Some(t.matrix("attn_v")?) } else { None }),
        };
        let per_layer = if cfg.per_layer_input > 0 {
            Some(PerLayerBlock {
                gate: t.matrix("ple_gate")?,
                proj: t.matrix("ple_proj")?,
                post_norm: t.vector("ple_post_norm", cfg.hidden)?,
            })
        } else {
            None
        };
        let output_scale = optional(&mut t, "layer_output_scale", 1)?.map(|v| v[0]);
        let mut layer = DecoderLayer {
            attn_norm: t.vector("attn_norm", cfg.hidden)?,
            wq: t.matrix("attn_q")?,
            wk,
            wv,
            wo: t.matrix("attn_output")?,
            bq,
            bk,
            bv,
            bo,
            sinks,
            q_norm,
            k_norm,
            attn_post_norm,
            ffn_norm: t.vector("ffn_norm", cfg.hidden)?,
            ffn_post_norm,
            sliding: cfg.is_sliding(layer),
            head_dim: hd,
            n_kv_heads: cfg.n_kv_heads_of(layer),
            kv_source,
            ffn: if t.has("ffn_gate_inp") {
                let moe = cfg.moe.as_ref().ok_or_else(|| {
                    Error::InvalidArgument(format!("layer {layer} names a router (ffn_gate_inp) but the config has no experts"))
                })?;
                if t.has("ffn_pre_norm_2") {
                    Ffn::Parallel {
                        gate: t.matrix("ffn_gate")?,
                        up: t.matrix("ffn_up")?,
                        down: t.matrix("ffn_down")?,
                        moe: MoeBlock::load(&mut t, moe, cfg.hidden)?,
                        dense_post_norm: t.vector("ffn_post_norm_1", cfg.hidden)?,
                        moe_norm: t.vector("ffn_pre_norm_2", cfg.hidden)?,
                        moe_post_norm: t.vector("ffn_post_norm_2", cfg.hidden)?,
                    }
                } else {
                    Ffn::Moe(MoeBlock::load(&mut t, moe, cfg.hidden)?)
                }
            } else {
                Ffn::Dense { gate: t.matrix("ffn_gate")?, up: t.matrix("ffn_up")?, down: t.matrix("ffn_down")? }
            },
            per_layer,
            output_scale,
        };
        t.finish()?;
        if cfg.norm_offset != 0.0 {
            for norm in [&mut layer.attn_norm, &mut layer.ffn_norm].into_iter().chain(
                [&mut layer.q_norm, &mut layer.k_norm, &mut layer.attn_post_norm, &mut layer.ffn_post_norm].into_iter().flatten(),
            ) {
                norm.iter_mut().for_each(|w| *w += cfg.norm_offset);
            }
        }
        expect_shape(&layer.wq, "attn_q", q_dim, cfg.hidden)?;
        for (m, role) in [(&layer.wk, "attn_k"), (&layer.wv, "attn_v")] {
            if let Some(m) = m {
                expect_shape(m, role, kv_dim, cfg.hidden)?;
            }
        }
        expect_shape(&layer.wo, "attn_output", cfg.hidden, q_dim)?;
        if let Some([gate, up, down]) = layer.ffn.dense() {
            expect_shape(gate, "ffn_gate", gate.rows(), cfg.hidden)?;
            expect_shape(up, "ffn_up", gate.rows(), cfg.hidden)?;
            expect_shape(down, "ffn_down", cfg.hidden, gate.rows())?;
        }
        if let Some(p) = &layer.per_layer {
            expect_shape(&p.gate, "ple_gate", cfg.per_layer_input, cfg.hidden)?;
            expect_shape(&p.proj, "ple_proj", cfg.hidden, cfg.per_layer_input)?;
        }
        Ok(layer)
    }

    fn matrices(&self) -> impl Iterator<Item = &QMatrix> {
        [Some(&self.wq), self.wk.as_ref(), self.wv.as_ref(), Some(&self.wo)]
            .into_iter()
            .flatten()
            .chain(self.ffn.matrices())
            .chain(self.per_layer.iter().flat_map(|p| [&p.gate, &p.proj]))
    }

    fn nbytes(&self) -> usize {
        let vectors = [&self.bq, &self.bk, &self.bv, &self.bo, &self.sinks, &self.q_norm, &self.k_norm, &self.attn_post_norm, &self.ffn_post_norm]
            .iter()
            .map(|v| v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
            + self.attn_norm.len()
            + self.ffn_norm.len()
            + self.per_layer.as_ref().map_or(0, |p| p.post_norm.len())
            + self.ffn.norms()
            + usize::from(self.output_scale.is_some());
        self.matrices().map(QMatrix::nbytes).sum::<usize>() + 4 * vectors
    }
}

/// One weight of a layer as another backend takes it (the torch path, `meshpy.gpu`):
/// dequantized to f32, row-major, in the shape the forward pass uses it (a matrix
/// `(out, in)`, experts stacked `(n, out, in)`), norm offsets already added.
pub struct ExportedWeight {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// One layer as loaded, for another backend: its attention shape and its weights by role
/// (the checkpoint roles of [`LayerTensors`], e.g. `attn_q`, `ffn_gate_exps`), so the other
/// backend never re-derives what loading resolved (row slices, fused, transposed or MXFP4
/// experts, norm offsets).
pub struct LayerExport {
    pub sliding: bool,
    pub head_dim: usize,
    pub n_kv_heads: usize,
    pub kv_source: Option<usize>,
    pub weights: Vec<(String, ExportedWeight)>,
}

fn export_matrix(m: &QMatrix) -> Result<ExportedWeight> {
    let mut values = vec![0f32; m.rows() * m.cols()];
    for (r, row) in values.chunks_exact_mut(m.cols().max(1)).enumerate() {
        m.dequantize_row(r, row)?;
    }
    Ok(ExportedWeight { shape: vec![m.rows(), m.cols()], values })
}

fn export_stack<'a>(mats: impl Iterator<Item = &'a QMatrix>) -> Result<ExportedWeight> {
    let (mut shape, mut values, mut n) = (Vec::new(), Vec::new(), 0);
    for m in mats {
        let w = export_matrix(m)?;
        shape = w.shape;
        values.extend_from_slice(&w.values);
        n += 1;
    }
    shape.insert(0, n);
    Ok(ExportedWeight { shape, values })
}

fn export_vector(v: &[f32]) -> ExportedWeight {
    ExportedWeight { shape: vec![v.len()], values: v.to_vec() }
}

impl DecoderLayer {
    fn export(&self) -> Result<LayerExport> {
        let mut w: Vec<(String, ExportedWeight)> = Vec::new();
        let vector = |w: &mut Vec<(String, ExportedWeight)>, role: &str, v: &Option<Vec<f32>>| {
            if let Some(v) = v {
                w.push((role.to_string(), export_vector(v)));
            }
        };
        vector(&mut w, "attn_norm", &Some(self.attn_norm.clone()));
        vector(&mut w, "ffn_norm", &Some(self.ffn_norm.clone()));
        for (role, v) in [
            ("attn_q_bias", &self.bq),
            ("attn_k_bias", &self.bk),
            ("attn_v_bias", &self.bv),
            ("attn_output_bias", &self.bo),
            ("attn_sinks", &self.sinks),
            ("attn_q_norm", &self.q_norm),
            ("attn_k_norm", &self.k_norm),
            ("attn_post_norm", &self.attn_post_norm),
            ("ffn_post_norm", &self.ffn_post_norm),
        ] {
            vector(&mut w, role, v);
        }
        vector(&mut w, "layer_output_scale", &self.output_scale.map(|s| vec![s]));
        for (role, m) in [("attn_q", Some(&self.wq)), ("attn_k", self.wk.as_ref()), ("attn_v", self.wv.as_ref()), ("attn_output", Some(&self.wo))] {
            if let Some(m) = m {
                w.push((role.to_string(), export_matrix(m)?));
            }
        }
        if let Some([gate, up, down]) = self.ffn.dense() {
            for (role, m) in [("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)] {
                w.push((role.to_string(), export_matrix(m)?));
            }
        }
        if let Ffn::Parallel { dense_post_norm, moe_norm, moe_post_norm, .. } = &self.ffn {
            for (role, v) in [("ffn_post_norm_1", dense_post_norm), ("ffn_pre_norm_2", moe_norm), ("ffn_post_norm_2", moe_post_norm)] {
                w.push((role.to_string(), export_vector(v)));
            }
        }
        if let Some(moe) = self.ffn.moe() {
            w.push(("ffn_gate_inp".to_string(), export_matrix(&moe.router)?));
            vector(&mut w, "ffn_gate_inp_bias", &moe.router_bias);
            vector(&mut w, "ffn_gate_inp_scale", &moe.router_scale);
            vector(&mut w, "ffn_down_exps_scale", &moe.expert_scale);
            w.push(("ffn_gate_exps".to_string(), export_stack(moe.experts.iter().map(|e| &e.gate))?));
            w.push(("ffn_up_exps".to_string(), export_stack(moe.experts.iter().map(|e| &e.up))?));
            w.push(("ffn_down_exps".to_string(), export_stack(moe.experts.iter().map(|e| &e.down))?));
            let gate_biases: Option<Vec<Vec<f32>>> = moe.experts.iter().map(|e| e.gate_bias.clone()).collect();
            let up_biases: Option<Vec<Vec<f32>>> = moe.experts.iter().map(|e| e.up_bias.clone()).collect();
            let down_biases: Option<Vec<Vec<f32>>> = moe.experts.iter().map(|e| e.down_bias.clone()).collect();
            for (role, biases) in [("ffn_gate_exps_bias", gate_biases), ("ffn_up_exps_bias", up_biases), ("ffn_down_exps_bias", down_biases)] {
                if let Some(b) = biases {
                    let len = b.first().map_or(0, Vec::len);
                    w.push((role.to_string(), ExportedWeight { shape: vec![b.len(), len], values: b.concat() }));
                }
            }
        }
        if let Some(p) = &self.per_layer {
            w.push(("ple_gate".to_string(), export_matrix(&p.gate)?));
            w.push(("ple_proj".to_string(), export_matrix(&p.proj)?));
            w.push(("ple_post_norm".to_string(), export_vector(&p.post_norm)));
        }
        Ok(LayerExport { sliding: self.sliding, head_dim: self.head_dim, n_kv_heads: self.n_kv_heads, kv_source: self.kv_source, weights: w })
    }
}

/// A session's next tokens in a batched forward call. Its positions continue the cache:
/// `cache.len() .. cache.len() + n_tokens`.
pub struct SeqChunk<'a> {
    /// The session's KV cache for this span.
    pub cache: &'a mut KvCache,
    /// Rows of the batch's hidden states that belong to this session (consecutive).
    pub n_tokens: usize,
}

/// Layers `first_layer .. first_layer + n_layers` of a decoder model.
pub struct DecoderSpan {
    cfg: DecoderConfig,
    first_layer: usize,
    layers: Vec<DecoderLayer>,
    /// Distinct activation shapes needed by the matrices reading each input.
    act_shapes: ActShapes,
    /// Width of the widest dense MLP (0: none).
    max_ffn: usize,
    /// Width of the expert MLPs (0: no layer has experts).
    expert_ffn: usize,
    kv_dtype: KvDtype,
}

/// An activation buffer's shape: the type the matrices reading it take, and its row width.
type ActShape = (GgmlType, usize);

/// Activation shapes per matrix group, the union over the span's layers.
struct ActShapes {
    attn_in: Vec<ActShape>,
    attn_out: Vec<ActShape>,
    /// Dense gate and up, routers, and per-layer input gates (all read `hidden` columns).
    ffn_in: Vec<ActShape>,
    /// Dense down (as wide as each layer's MLP) and per-layer input projections.
    ffn_mid: Vec<ActShape>,
    /// Experts' gate and up (rows grouped by expert).
    moe_in: Vec<ActShape>,
    /// Experts' down.
    moe_mid: Vec<ActShape>,
}

fn union_shapes<'a>(mats: impl Iterator<Item = &'a QMatrix>) -> Vec<ActShape> {
    let mut out: Vec<ActShape> = Vec::new();
    for m in mats {
        if !out.contains(&(m.activation_type(), m.cols())) {
            out.push((m.activation_type(), m.cols()));
        }
    }
    out
}

/// Where each layer of a forward run keeps its keys and values in a session's cache: one
/// cache layer per layer with keys and values of its own, and one per source layer outside
/// the run that a layer of it shares (see `DecoderConfig::kv_source`).
pub(crate) struct KvPlan {
    layouts: Vec<KvLayout>,
    /// Per run layer: its cache layer.
    slot: Vec<usize>,
    /// Source layers outside the run (model indices).
    imported: Vec<usize>,
    /// (model layer, cache layer) of every layer whose keys and values the cache holds.
    holders: Vec<(usize, usize)>,
}

impl KvPlan {
    /// The cache layer holding model layer `layer`'s keys and values, if any.
    fn slot_of(&self, layer: usize) -> Option<usize> {
        self.holders.iter().find(|(m, _)| *m == layer).map(|&(_, slot)| slot)
    }
}

impl DecoderSpan {
    /// Loads layers `first_layer ..` with one name map per layer. Only these layers'
    /// tensors are touched, so resident memory grows with the span, not the model.
    pub fn load(checkpoint: &Checkpoint, cfg: DecoderConfig, first_layer: usize, layer_names: Vec<LayerNames>) -> Result<Self> {
        Self::load_with_progress(checkpoint, cfg, first_layer, layer_names, &mut |_| {})
    }

    /// [`Self::load`], calling `on_layer(layers_done)` after each layer.
    pub fn load_with_progress(
        checkpoint: &Checkpoint,
        cfg: DecoderConfig,
        first_layer: usize,
        layer_names: Vec<LayerNames>,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        cfg.validate()?;
        let mut layers = Vec::with_capacity(layer_names.len());
        for names in layer_names {
            layers.push(DecoderLayer::load(checkpoint, &cfg, first_layer + layers.len(), names)?);
            on_layer(layers.len());
        }
        let dense = || layers.iter().filter_map(|l| l.ffn.dense());
        let moes = || layers.iter().filter_map(|l| l.ffn.moe());
        let per_layer = || layers.iter().filter_map(|l| l.per_layer.as_ref());
        let act_shapes = ActShapes {
            attn_in: union_shapes(layers.iter().flat_map(|l| [Some(&l.wq), l.wk.as_ref(), l.wv.as_ref()]).flatten()),
            attn_out: union_shapes(layers.iter().map(|l| &l.wo)),
            ffn_in: union_shapes(
                dense().flat_map(|[g, u, _]| [g, u]).chain(moes().map(|m| &m.router)).chain(per_layer().map(|p| &p.gate)),
            ),
            ffn_mid: union_shapes(dense().map(|[_, _, d]| d).chain(per_layer().map(|p| &p.proj))),
            moe_in: union_shapes(moes().flat_map(MoeBlock::input_matrices)),
            moe_mid: union_shapes(moes().flat_map(|m| m.experts.iter().map(|e| &e.down))),
        };
        let max_ffn = dense().map(|[g, _, _]| g.rows()).max().unwrap_or(0);
        let expert_ffn = moes().next().map_or(0, MoeBlock::ffn);
        if moes().any(|m| m.ffn() != expert_ffn) {
            return Err(Error::Shape("expert layers of one span must share the expert width".into()));
        }
        let kv_dtype = cfg.kv_dtype.unwrap_or_else(|| Self::default_kv_dtype(&layers));
        Ok(DecoderSpan { cfg, first_layer, layers, act_shapes, max_ffn, expert_ffn, kv_dtype })
    }

    /// The KV cache type when the config names none: f16 (half the memory and the bytes
    /// attention reads, llama.cpp's default), except f32 when every K and V projection is
    /// f32: a full-precision checkpoint keeps full-precision keys and values, so it matches
    /// transformers to f32 rounding.
    fn default_kv_dtype(layers: &[DecoderLayer]) -> KvDtype {
        if layers.iter().flat_map(|l| [l.wk.as_ref(), l.wv.as_ref()]).flatten().all(|m| m.ty() == GgmlType::F32) {
            KvDtype::F32
        } else {
            KvDtype::F16
        }
    }

    /// How this span's KV caches store keys and values.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// The span's settings.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Index of the first layer in the whole model.
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    /// Number of layers in the span.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Span layer `layer` as loaded, dequantized for another backend (see [`LayerExport`]).
    pub fn export_layer(&self, layer: usize) -> Result<LayerExport> {
        self.layers
            .get(layer)
            .ok_or_else(|| Error::InvalidArgument(format!("layer {layer} of a span of {} layers", self.layers.len())))?
            .export()
    }

    /// Bytes of weights the span holds.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(DecoderLayer::nbytes).sum()
    }

    /// A new, empty KV cache for this span holding up to `max_len` positions (at most the
    /// model's context).
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        self.new_cache_for(0..self.layers.len(), max_len)
    }

    /// A new, empty KV cache for layers `layers` of this span (indices relative to its first
    /// layer; a sub-range run with [`Self::forward_layers`]), holding up to `max_len`
    /// positions (at most the model's context). Sliding-window layers keep only their window
    /// (see `model::kv_cache`); a layer sharing another's keys and values keeps none. Indices
    /// past the span are refused by `forward_layers`.
    pub fn new_cache_for(&self, layers: Range<usize>, max_len: usize) -> KvCache {
        let layers = layers.start.min(self.layers.len())..layers.end.min(self.layers.len());
        KvCache::with_layers(&self.kv_plan(layers).layouts, max_len.min(self.cfg.max_positions), self.kv_dtype)
    }

    /// KV bytes one more position costs a session running span layers `layers`, at most
    /// (sliding-window layers give theirs back once they drop old positions).
    pub fn kv_bytes_per_position(&self, layers: Range<usize>) -> usize {
        let layers = layers.start.min(self.layers.len())..layers.end.min(self.layers.len());
        self.cfg.kv_bytes_per_position(self.first_layer, layers, self.kv_dtype)
    }

    /// The cache layers of a run of span layers `layers`.
    fn kv_plan(&self, layers: Range<usize>) -> KvPlan {
        self.cfg.kv_plan(self.first_layer, layers)
    }

    /// Runs the batch through every layer: `rows` holds `(sum of n_tokens, row_width(first
    /// layer))` rows, sequence after sequence, and is replaced by the span's output rows
    /// (`row_width(end)`; see [`DecoderConfig::row_width`]: the hidden state alone for most
    /// models). Each sequence's cache grows by its token count; on error no cache changes.
    pub fn forward(&self, pool: &ThreadPool, rows: &mut Vec<f32>, seqs: &mut [SeqChunk]) -> Result<()> {
        self.forward_layers(pool, rows, seqs, 0..self.layers.len())
    }

    /// The width of the rows entering span layer `layer` (`n_layers`: leaving the span).
    pub fn row_width(&self, layer: usize) -> usize {
        self.cfg.row_width(self.first_layer + layer)
    }

    /// [`Self::forward`] through layers `layers` of the span only (indices relative to its
    /// first layer; a non-empty range within `0..n_layers`): rows of `row_width(layers.start)`
    /// in, of `row_width(layers.end)` out. Every cache must have been made for these layers
    /// ([`Self::new_cache_for`]). Running `a..m` then `m..b` gives the same bits as running
    /// `a..b`.
    pub fn forward_layers(&self, pool: &ThreadPool, rows: &mut Vec<f32>, seqs: &mut [SeqChunk], layers: Range<usize>) -> Result<()> {
        if layers.is_empty() || layers.end > self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "layers {}..{} of a span of {} layers",
                layers.start,
                layers.end,
                self.layers.len()
            )));
        }
        let (cfg, d) = (&self.cfg, self.cfg.hidden);
        let (w_in, w_out) = (self.row_width(layers.start), self.row_width(layers.end));
        let n_tok: usize = seqs.iter().map(|s| s.n_tokens).sum();
        if rows.len() != n_tok * w_in {
            return Err(Error::Shape(format!("rows have {} values, expected {n_tok} tokens x {w_in}", rows.len())));
        }
        if w_in == d && w_out == d {
            return self.run(pool, rows, seqs, layers, &[], &[], &mut []);
        }
        // Cut each row into its parts (see `DecoderConfig::row_width`).
        let (first, end) = (self.first_layer + layers.start, self.first_layer + layers.end);
        let p = cfg.per_layer_input;
        let (ple_in, ple_run) = (cfg.n_layers.saturating_sub(first) * p, layers.len() * p);
        let mut hidden = Vec::with_capacity(n_tok * d);
        let mut per_layer = Vec::with_capacity(n_tok * ple_run);
        let mut carry_in = Vec::with_capacity(n_tok * (w_in - d - ple_in));
        for row in rows.chunks_exact(w_in) {
            hidden.extend_from_slice(&row[..d]);
            per_layer.extend_from_slice(&row[d..d + ple_run]);
            carry_in.extend_from_slice(&row[d + ple_in..]);
        }
        let carry_out_width = w_out - d - cfg.n_layers.saturating_sub(end) * p;
        let mut carry_out = vec![0f32; n_tok * carry_out_width];
        self.run(pool, &mut hidden, seqs, layers, &per_layer, &carry_in, &mut carry_out)?;
        let mut out = Vec::with_capacity(n_tok * w_out);
        for (t, row) in rows.chunks_exact(w_in).enumerate() {
            out.extend_from_slice(&hidden[t * d..(t + 1) * d]);
            out.extend_from_slice(&row[d + ple_run..d + ple_in]);
            out.extend_from_slice(&carry_out[t * carry_out_width..(t + 1) * carry_out_width]);
        }
        *rows = out;
        Ok(())
    }

    /// One forward pass over the hidden states `hidden`, with the run layers' per-layer
    /// inputs and the source keys and values carried in (`carry_in`, laid out for the run's
    /// first boundary) and out (`carry_out`, for its end).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        pool: &ThreadPool,
        hidden: &mut [f32],
        seqs: &mut [SeqChunk],
        layers: Range<usize>,
        per_layer: &[f32],
        carry_in: &[f32],
        carry_out: &mut [f32],
    ) -> Result<()> {
        let cfg = &self.cfg;
        let d = cfg.hidden;
        let run_layers = &self.layers[layers.clone()];
        let plan = self.kv_plan(layers.clone());
        let n_tok: usize = seqs.iter().map(|s| s.n_tokens).sum();
        if n_tok == 0 {
            return Ok(());
        }
        if hidden.len() != n_tok * d {
            return Err(Error::Shape(format!(
                "hidden states have {} values, expected {n_tok} tokens x {d}",
                hidden.len()
            )));
        }
        for s in seqs.iter() {
            if s.cache.slot().is_some() {
                return Err(Error::InvalidArgument("a KV cache kept by another backend (torch) runs there, not on the CPU".into()));
            }
            if s.cache.layouts() != plan.layouts {
                return Err(Error::InvalidArgument(format!(
                    "KV cache was made for {} layers, this pass runs {} layers with {} cache layers \
                     (or other sliding-window layers or widths: make it with new_cache_for(layers))",
                    s.cache.n_layers(),
                    run_layers.len(),
                    plan.layouts.len()
                )));
            }
            let needed = s.cache.len() + s.n_tokens;
            if needed > s.cache.max_len() {
                return Err(Error::ContextOverflow { needed, limit: s.cache.max_len() });
            }
        }
        // Per row: which sequence, which position; rotary tables per row.
        let mut row_seq = Vec::with_capacity(n_tok);
        let mut row_pos = Vec::with_capacity(n_tok);
        for (i, s) in seqs.iter().enumerate() {
            for j in 0..s.n_tokens {
                row_seq.push(i);
                row_pos.push(s.cache.len() + j);
            }
        }
        // `long`: the frequencies from a position on (LongRoPE, see `rope_long_inv_freq`).
        let tables = |inv_freq: &[f32], long: Option<(&[f32], usize)>, factor: f32| {
            let half = inv_freq.len();
            let mut cos = vec![0f32; n_tok * half];
            let mut sin = vec![0f32; n_tok * half];
            for (r, &p) in row_pos.iter().enumerate() {
                let freqs = match long {
                    Some((long_freq, from)) if p >= from => long_freq,
                    _ => inv_freq,
                };
                ops::rope_table(p, freqs, &mut cos[r * half..(r + 1) * half], &mut sin[r * half..(r + 1) * half]);
            }
            if factor != 1.0 {
                cos.iter_mut().chain(sin.iter_mut()).for_each(|v| *v *= factor);
            }
            (cos, sin)
        };
        let long = (!cfg.rope_long_inv_freq.is_empty()).then(|| (&cfg.rope_long_inv_freq[..], cfg.rope_long_from));
        let (cos, sin) = tables(&cfg.rope_inv_freq, long, cfg.rope_attention_factor);
        // Sliding-window layers' own table (Gemma 3: the local base, no scaling), when any
        // runs and the model has one; else they share the global table (Phi-3).
        let (cos_local, sin_local) = if run_layers.iter().any(|l| l.sliding) && !cfg.rope_local_inv_freq.is_empty() {
            tables(&cfg.rope_local_inv_freq, None, 1.0)
        } else {
            (Vec::new(), Vec::new())
        };

        // Scratch for the whole pass, as wide as the widest layer's.
        let qd = run_layers.iter().map(|l| cfg.n_heads * l.head_dim).max().unwrap_or(0);
        let kvd = run_layers.iter().map(|l| l.n_kv_heads * l.head_dim).max().unwrap_or(0);
        let mut q = vec![0f32; n_tok * qd];
        let mut k = vec![0f32; n_tok * kvd];
        let mut v = vec![0f32; n_tok * kvd];
        let mut att = vec![0f32; n_tok * qd];
        // Attention or MLP output awaiting its post-norm (Gemma 3), when a layer has one.
        let has_post = run_layers.iter().any(|l| {
            l.attn_post_norm.is_some() || l.ffn_post_norm.is_some() || l.per_layer.is_some() || matches!(l.ffn, Ffn::Parallel { .. })
        });
        let mut post = vec![0f32; if has_post { n_tok * d } else { 0 }];
        // A mixture-of-experts layer runs `n_used` rows ("slots") per token, grouped by expert;
        // its gate/up products share the dense MLP's buffers.
        let moe = run_layers.iter().any(|l| l.ffn.moe().is_some());
        let (n_slots, n_experts) = match (&cfg.moe, moe) {
            (Some(m), true) => (n_tok * m.n_used, m.n_experts),
            _ => (0, 0),
        };
        let ffn_len = (n_tok * self.max_ffn).max(n_slots * self.expert_ffn).max(n_tok * cfg.per_layer_input);
        let mut gate = vec![0f32; ffn_len];
        let mut up = vec![0f32; ffn_len];
        let mut router = vec![0f32; n_tok * n_experts];
        let mut expert_out = vec![0f32; n_slots * d];
        let make = |shapes: &[ActShape], rows: usize| -> Result<Vec<ActRows>> {
            shapes.iter().map(|&(t, cols)| ActRows::new(t, cols, rows)).collect()
        };
        // Activation rows are quantized by every thread into its own buffers (the products
        // read all rows): no barrier between a quantization and the product that reads it.
        let nth = pool.n_threads();
        let mut owned: Vec<[Vec<ActRows>; 6]> = (0..nth)
            .map(|_| -> Result<[Vec<ActRows>; 6]> {
                let t = &self.act_shapes;
                Ok([
                    make(&t.attn_in, n_tok)?,
                    make(&t.attn_out, n_tok)?,
                    make(&t.ffn_in, n_tok)?,
                    make(&t.ffn_mid, n_tok)?,
                    make(if moe { &t.moe_in } else { &[] }, n_slots)?,
                    make(if moe { &t.moe_mid } else { &[] }, n_slots)?,
                ])
            })
            .collect::<Result<_>>()?;
        let shared_acts = |rows: &mut Vec<ActRows>| rows.iter_mut().map(|a| a.shared()).collect::<Vec<_>>();
        let acts = owned
            .iter_mut()
            .map(|[attn_in, attn_out, ffn_in, ffn_mid, moe_in, moe_mid]| ThreadActs {
                attn_in: shared_acts(attn_in),
                attn_out: shared_acts(attn_out),
                ffn_in: shared_acts(ffn_in),
                ffn_mid: shared_acts(ffn_mid),
                moe_in: shared_acts(moe_in),
                moe_mid: shared_acts(moe_mid),
            })
            .collect();
        let bufs = Buffers {
            x: SharedMut::new(hidden),
            q: SharedMut::new(&mut q),
            k: SharedMut::new(&mut k),
            v: SharedMut::new(&mut v),
            att: SharedMut::new(&mut att),
            post: SharedMut::new(&mut post),
            gate: SharedMut::new(&mut gate),
            up: SharedMut::new(&mut up),
            router: SharedMut::new(&mut router),
            expert_out: SharedMut::new(&mut expert_out),
            acts,
        };
        // Last fallible step, after every allocation that may fail: a sliding layer may drop
        // old rows here, which a failed pass could not undo.
        for s in seqs.iter_mut() {
            s.cache.reserve(s.n_tokens)?;
        }
        let caches: Vec<Vec<LayerShared>> = seqs
            .iter_mut()
            .map(|s| (0..plan.layouts.len()).map(|l| s.cache.layer_shared(l)).collect())
            .collect();
        let max_ctx = seqs.iter().map(|s| s.cache.len() + s.n_tokens).max().unwrap_or(0);
        let pass = Pass {
            span: self,
            layers: run_layers,
            kv_slot: &plan.slot,
            n_tok,
            row_seq: &row_seq,
            row_pos: &row_pos,
            cos: &cos,
            sin: &sin,
            cos_local: &cos_local,
            sin_local: &sin_local,
            per_layer,
            bufs: &bufs,
            caches: &caches,
            max_ctx,
        };

        // This step's keys and values of the source layers other spans computed, into their
        // mirrors in the caches, before any layer reads them.
        let (first, end) = (self.first_layer + layers.start, self.first_layer + layers.end);
        let carried = |b: usize| -> Vec<(usize, usize, usize)> {
            // (source, its width, offset in a row's carried part)
            let mut at = 0;
            cfg.carried_sources(b)
                .into_iter()
                .map(|src| {
                    let w = cfg.kv_dim_of(src);
                    at += 2 * w;
                    (src, w, at - 2 * w)
                })
                .collect()
        };
        let (carry_in_at, carry_out_at) = (carried(first), carried(end));
        let (win, wout) = (carry_in_at.iter().map(|c| 2 * c.1).sum::<usize>(), carry_out_at.iter().map(|c| 2 * c.1).sum::<usize>());
        for &(src, w, at) in &carry_in_at {
            // Only the mirrors: a source this run holds writes its own rows.
            if !plan.imported.contains(&src) {
                continue;
            }
            let slot = plan.slot_of(src).expect("an imported source has a cache layer");
            for t in 0..n_tok {
                let c = caches[row_seq[t]][slot];
                let r = row_pos[t] - c.base;
                // SAFETY: no job runs; the rows were reserved above.
                unsafe {
                    c.keys.write(r * w, &carry_in[t * win + at..t * win + at + w]);
                    c.values.write(r * w, &carry_in[t * win + at + w..t * win + at + 2 * w]);
                }
            }
        }

        pool.run(|ctx| pass.run(ctx));

        // The sources later spans share: from the caches (rounded as stored, so they read the
        // same values one span would), or passed through when this run does not hold them.
        for &(src, w, at) in &carry_out_at {
            for t in 0..n_tok {
                let out = &mut carry_out[t * wout + at..t * wout + at + 2 * w];
                match plan.slot_of(src) {
                    Some(slot) => {
                        let c = caches[row_seq[t]][slot];
                        let r = row_pos[t] - c.base;
                        // SAFETY: the job has ended.
                        unsafe {
                            c.keys.read(r * w, &mut out[..w]);
                            c.values.read(r * w, &mut out[w..]);
                        }
                    }
                    None => {
                        let (_, _, from) = carry_in_at.iter().find(|c| c.0 == src).expect("a source passed through came in");
                        out.copy_from_slice(&carry_in[t * win + from..t * win + from + 2 * w]);
                    }
                }
            }
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.n_tokens);
        }
        Ok(())
    }
}

/// Scratch buffers of one forward call, shared by the job's threads.
struct Buffers {
    x: SharedMut<f32>,
    q: SharedMut<f32>,
    k: SharedMut<f32>,
    v: SharedMut<f32>,
    att: SharedMut<f32>,
    /// `(n_tok, hidden)` when a layer has post-norms, else empty.
    post: SharedMut<f32>,
    /// `(n_tok, max_ffn)`, or `(slots, expert_ffn)` in a mixture-of-experts layer.
    gate: SharedMut<f32>,
    up: SharedMut<f32>,
    /// `(n_tok, n_experts)` router logits when a mixture-of-experts layer runs, else empty.
    router: SharedMut<f32>,
    /// `(slots, hidden)`: each slot's expert output, before its router weight.
    expert_out: SharedMut<f32>,
    /// Per thread (indexed by `Ctx::tid`): its quantized activation rows.
    acts: Vec<ThreadActs>,
}

/// One thread's activation buffers, one per distinct activation type of each input.
struct ThreadActs {
    attn_in: Vec<ActRowsMut>,
    attn_out: Vec<ActRowsMut>,
    ffn_in: Vec<ActRowsMut>,
    ffn_mid: Vec<ActRowsMut>,
    moe_in: Vec<ActRowsMut>,
    moe_mid: Vec<ActRowsMut>,
}

fn act_for(acts: &[ActRowsMut], m: &QMatrix) -> ActRowsMut {
    *acts
        .iter()
        .find(|a| a.ty() == m.activation_type() && a.cols() == m.cols())
        .expect("activation shapes are collected from these matrices at load")
}

/// One forward call's shared state; `run` is what every thread executes.
struct Pass<'a> {
    span: &'a DecoderSpan,
    /// The layers this pass runs (the span's, or a sub-range).
    layers: &'a [DecoderLayer],
    /// Per run layer: the cache layer holding its keys and values (see `KvPlan`).
    kv_slot: &'a [usize],
    n_tok: usize,
    row_seq: &'a [usize],
    row_pos: &'a [usize],
    cos: &'a [f32],
    sin: &'a [f32],
    /// The sliding-window layers' rotary table (empty when none runs or they share the
    /// global one).
    cos_local: &'a [f32],
    sin_local: &'a [f32],
    /// Per row, the run layers' per-layer inputs (empty without them).
    per_layer: &'a [f32],
    bufs: &'a Buffers,
    /// Per sequence, per cache layer: the cache rows (row `p - base` holds position `p`).
    caches: &'a [Vec<LayerShared>],
    max_ctx: usize,
}

impl Pass<'_> {
    /// Six barriers per dense layer: after q/k/v, after RoPE and the cache append, after
    /// attention, after the output projection, after gate/up + SwiGLU, after the down
    /// projection (one more after each projection with a post-norm, Gemma 3); a mixture of
    /// experts has five instead of the MLP's two (`moe_residual`). Norms and
    /// quantization run on every thread for all rows into its own buffers (cheaper than a
    /// barrier for decode's single row), SwiGLU on the columns the thread itself computed.
    fn run(&self, ctx: &Ctx) {
        let cfg = &self.span.cfg;
        let d = cfg.hidden;
        let n = self.n_tok;
        let b = self.bufs;
        let acts = &b.acts[ctx.tid];
        let my_rows = ctx.split(n);
        let max_hd = self.layers.iter().map(|l| l.head_dim).max().unwrap_or(0);
        let max_group = self.layers.iter().map(|l| cfg.n_heads / l.n_kv_heads).max().unwrap_or(0);
        // Scores of the heads of one KV group over the longest context.
        let mut scores = vec![0f32; self.max_ctx * max_group];
        let mut xn = vec![0f32; d];
        let mut head_tmp = vec![0f32; max_hd];
        // The weight of a norm without one (Gemma 4's v_norm).
        let ones = vec![1f32; if cfg.v_norm { max_hd } else { 0 }];
        // This thread's copy of the normed rows a mixture-of-experts layer regroups.
        let mut normed = vec![0f32; if b.router.is_empty() { 0 } else { n * d }];
        // Quantizes every row of `src` (width `w`) into this thread's `dst` buffer of that width.
        // SAFETY (all SharedMut accesses below): each thread writes only its own rows,
        // matrix rows or private buffers between barriers; reads of others' data follow a
        // barrier.
        let quantize_all = |src: SharedMut<f32>, w: usize, dst: &[ActRowsMut]| {
            for t in 0..n {
                let row = unsafe { src.slice(t * w..(t + 1) * w) };
                for a in dst.iter().filter(|a| a.cols() == w) {
                    unsafe { a.set_row(t, row) };
                }
            }
        };
        let norm_all = |norm: &[f32], dst: &[ActRowsMut], xn: &mut [f32]| {
            for t in 0..n {
                ops::rms_norm(unsafe { b.x.slice(t * d..(t + 1) * d) }, norm, cfg.eps, xn);
                for a in dst.iter().filter(|a| a.cols() == d) {
                    unsafe { a.set_row(t, xn) };
                }
            }
        };

        for (li, layer) in self.layers.iter().enumerate() {
            let hd = layer.head_dim;
            let (qd, kvd) = (cfg.n_heads * hd, layer.n_kv_heads * hd);
            let slot = self.kv_slot[li];
            // Attention input: RMSNorm, quantize, q/k/v (k and v unless the layer shares
            // another's; v unless it is k's projection).
            norm_all(&layer.attn_norm, &acts.attn_in, &mut xn);
            // Biases (Qwen2) are added by the product, as nn.Linear(bias=True) does.
            layer.wq.matmul_part(ctx, act_for(&acts.attn_in, &layer.wq), n, b.q, qd, false, layer.bq.as_deref());
            if let Some(wk) = &layer.wk {
                wk.matmul_part(ctx, act_for(&acts.attn_in, wk), n, b.k, kvd, false, layer.bk.as_deref());
            }
            if let Some(wv) = &layer.wv {
                wv.matmul_part(ctx, act_for(&acts.attn_in, wv), n, b.v, kvd, false, layer.bv.as_deref());
            }
            ctx.barrier();

            // Per-head q/k RMSNorm (Qwen3, before RoPE as in modeling_qwen3.py), RoPE on q
            // and k, then append k and v to each row's session cache.
            let (cos, sin, half) = if layer.sliding && !self.cos_local.is_empty() {
                (self.cos_local, self.sin_local, cfg.rope_local_inv_freq.len())
            } else {
                (self.cos, self.sin, cfg.rope_inv_freq.len())
            };
            // Each head of a row: its RMSNorm when the layer has one, then RoPE.
            let mut norm_heads = |row: &mut [f32], norm: Option<&[f32]>, rope: Option<(&[f32], &[f32])>| {
                for h in row.chunks_exact_mut(hd) {
                    if let Some(w) = norm {
                        ops::rms_norm(h, w, cfg.eps, &mut head_tmp[..hd]);
                        h.copy_from_slice(&head_tmp[..hd]);
                    }
                    if let Some((c, s)) = rope {
                        ops::rope_apply(h, c, s, cfg.rope_interleaved);
                    }
                }
            };
            for t in my_rows.clone() {
                let rope = Some((&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]));
                let qrow = unsafe { b.q.slice_mut(t * qd..(t + 1) * qd) }; // (n_heads, head_dim)
                norm_heads(qrow, layer.q_norm.as_deref(), rope);
                if layer.kv_source.is_some() {
                    continue;
                }
                let krow = unsafe { b.k.slice_mut(t * kvd..(t + 1) * kvd) }; // (n_kv_heads, head_dim)
                let vrow = unsafe { b.v.slice_mut(t * kvd..(t + 1) * kvd) };
                if layer.wv.is_none() {
                    // Gemma 4's attention_k_eq_v: values are the keys' projection, before
                    // the k norm and RoPE (modeling_gemma4.py, Gemma4Attention).
                    vrow.copy_from_slice(krow);
                }
                norm_heads(krow, layer.k_norm.as_deref(), rope);
                if cfg.v_norm {
                    norm_heads(vrow, Some(&ones[..hd]), None);
                }
                let c = self.caches[self.row_seq[t]][slot];
                let r = self.row_pos[t] - c.base;
                unsafe {
                    c.keys.write(r * kvd, krow);
                    c.values.write(r * kvd, vrow);
                }
            }
            ctx.barrier();

            // Attention over (row, KV head, query heads) items: the query heads sharing a KV
            // head are attended together, reading its keys and values once. Several rows:
            // (row, KV head) items dealt round-robin, which balances the causal triangle. One
            // row (decode): contiguous query heads per thread, grouped by KV head.
            let group = cfg.n_heads / layer.n_kv_heads;
            let mut attend_heads = |t: usize, heads: Range<usize>| {
                let kvh = heads.start / group;
                let p = self.row_pos[t];
                // A sliding-window layer sees keys `p - window < k <= p` (transformers'
                // sliding-window causal mask), a global layer all of `0..=p`.
                let first = if layer.sliding { (p + 1).saturating_sub(cfg.sliding_window) } else { 0 };
                // Cache rows are positions from `base` on (a sliding layer drops only rows
                // before every window of the step: `base <= first`).
                let c = self.caches[self.row_seq[t]][slot];
                let (first, last) = (first - c.base, p - c.base);
                let rows = kvh * hd..(last + 1) * kvd;
                let q = t * qd + heads.start * hd..t * qd + heads.end * hd;
                let (qh, out) = unsafe { (b.q.slice(q.clone()), b.att.slice_mut(q)) };
                let scale = cfg.attn_scale;
                let sinks = layer.sinks.as_deref().map_or(&[][..], |s| &s[heads.clone()]);
                // SAFETY: this layer's rows were written before the barrier above; nothing
                // writes them until the next layer.
                unsafe {
                    match (c.keys, c.values) {
                        (RowsShared::F32(k), RowsShared::F32(v)) => {
                            attention::attend(qh, hd, k.slice(rows.clone()), v.slice(rows), kvd, first, last, scale, sinks, &mut scores, out)
                        }
                        (RowsShared::F16(k), RowsShared::F16(v)) => {
                            attention::attend(qh, hd, k.slice(rows.clone()), v.slice(rows), kvd, first, last, scale, sinks, &mut scores, out)
                        }
                        _ => unreachable!("a cache stores keys and values in one type"),
                    }
                }
            };
            if n == 1 {
                let mine = ctx.split(cfg.n_heads);
                let mut h = mine.start;
                while h < mine.end {
                    let end = ((h / group + 1) * group).min(mine.end);
                    attend_heads(0, h..end);
                    h = end;
                }
            } else {
                for item in (ctx.tid..n * layer.n_kv_heads).step_by(ctx.nth) {
                    let (t, kvh) = (item / layer.n_kv_heads, item % layer.n_kv_heads);
                    attend_heads(t, kvh * group..(kvh + 1) * group);
                }
            }
            ctx.barrier();
            quantize_all(b.att, qd, &acts.attn_out);
            let wo_act = act_for(&acts.attn_out, &layer.wo);
            self.project_residual(ctx, &layer.wo, wo_act, layer.bo.as_deref(), layer.attn_post_norm.as_deref(), &mut xn);

            match &layer.ffn {
                Ffn::Moe(moe) => {
                    // The router reads the normed rows as a dense MLP would; the experts read
                    // them regrouped by expert, from this thread's f32 copy.
                    for t in 0..n {
                        let row = &mut normed[t * d..(t + 1) * d];
                        ops::rms_norm(unsafe { b.x.slice(t * d..(t + 1) * d) }, &layer.ffn_norm, cfg.eps, row);
                        for a in acts.ffn_in.iter().filter(|a| a.cols() == d) {
                            unsafe { a.set_row(t, row) };
                        }
                    }
                    self.moe_residual(ctx, moe, &normed, None, layer.ffn_post_norm.as_deref(), &mut xn);
                }
                Ffn::Dense { gate, up, down } => {
                    // MLP: RMSNorm, SwiGLU, down projection added to the residual.
                    norm_all(&layer.ffn_norm, &acts.ffn_in, &mut xn);
                    let act = self.gated_mlp(ctx, gate, up, down);
                    self.project_residual(ctx, down, act, None, layer.ffn_post_norm.as_deref(), &mut xn);
                }
                Ffn::Parallel { gate, up, down, moe, dense_post_norm, moe_norm, moe_post_norm } => {
                    // The dense MLP's output waits in `post` (the router's barrier in
                    // `moe_residual` comes before anyone reads it).
                    norm_all(&layer.ffn_norm, &acts.ffn_in, &mut xn);
                    let act = self.gated_mlp(ctx, gate, up, down);
                    down.matmul_part(ctx, act, n, b.post, d, false, None);
                    // Experts on the moe_norm-normed residual; the router on the residual
                    // normed without a weight, times its scale and hidden^-0.5
                    // (Gemma4TextRouter), quantized after this thread's dense products read
                    // its activation buffers.
                    let root = (d as f32).powf(-0.5);
                    for t in 0..n {
                        let x = unsafe { b.x.slice(t * d..(t + 1) * d) };
                        ops::rms_norm(x, moe_norm, cfg.eps, &mut normed[t * d..(t + 1) * d]);
                        match &moe.router_scale {
                            Some(scale) => {
                                ops::rms_norm(x, scale, cfg.eps, &mut xn);
                                xn.iter_mut().for_each(|v| *v *= root);
                            }
                            None => xn.copy_from_slice(&normed[t * d..(t + 1) * d]),
                        }
                        unsafe { act_for(&acts.ffn_in, &moe.router).set_row(t, &xn) };
                    }
                    let dense = Some((&dense_post_norm[..], &moe_post_norm[..]));
                    self.moe_residual(ctx, moe, &normed, dense, layer.ffn_post_norm.as_deref(), &mut xn);
                }
            }

            // Gemma 4's per-layer input: `x += post_norm(proj(gelu_tanh(gate(x)) * input))`,
            // `input` this layer's slice of the row's per-layer inputs.
            if let Some(ple) = &layer.per_layer {
                let p = cfg.per_layer_input;
                let width = self.layers.len() * p;
                quantize_all(b.x, d, &acts.ffn_in);
                ple.gate.matmul_part(ctx, act_for(&acts.ffn_in, &ple.gate), n, b.gate, p, false, None);
                ctx.barrier();
                for t in my_rows.clone() {
                    let g = unsafe { b.gate.slice_mut(t * p..(t + 1) * p) };
                    fastmath::gelu_tanh_mul(g, &self.per_layer[t * width + li * p..t * width + (li + 1) * p]);
                }
                ctx.barrier();
                quantize_all(b.gate, p, &acts.ffn_mid);
                self.project_residual(ctx, &ple.proj, act_for(&acts.ffn_mid, &ple.proj), None, Some(&ple.post_norm), &mut xn);
            }
            // Gemma 4's layer_scalar scales the whole hidden state, residual included.
            if let Some(scale) = layer.output_scale {
                for t in my_rows.clone() {
                    unsafe { b.x.slice_mut(t * d..(t + 1) * d) }.iter_mut().for_each(|x| *x *= scale);
                }
                ctx.barrier();
            }
        }
    }

    /// The gate and up products of a dense MLP on this thread's `ffn_in` rows (quantized by the
    /// caller), the GLU, and the result quantized for `down`: the activation `down` reads.
    fn gated_mlp(&self, ctx: &Ctx, w_gate: &QMatrix, w_up: &QMatrix, w_down: &QMatrix) -> ActRowsMut {
        let (b, n) = (self.bufs, self.n_tok);
        let acts = &b.acts[ctx.tid];
        let ffn = w_gate.rows();
        w_gate.matmul_part(ctx, act_for(&acts.ffn_in, w_gate), n, b.gate, ffn, false, None);
        w_up.matmul_part(ctx, act_for(&acts.ffn_in, w_up), n, b.up, ffn, false, None);
        // SwiGLU (or GeGLU with tanh GELU, Gemma 3) on the columns this thread computed in
        // both products (else after a barrier). Both are split alike, on every thread, when
        // both are repacked or neither is: the same decision on every thread, so all take the
        // same barriers.
        let cols = w_gate.part_rows(ctx);
        let own = w_gate.is_repacked() == w_up.is_repacked();
        if !own {
            ctx.barrier();
        }
        let cols = if own { cols } else { ctx.split(ffn) };
        for t in 0..n {
            // SAFETY: as in `run`.
            let g = unsafe { b.gate.slice_mut(t * ffn + cols.start..t * ffn + cols.end) };
            let u = unsafe { b.up.slice(t * ffn + cols.start..t * ffn + cols.end) };
            self.glu(g, u);
        }
        ctx.barrier();
        let act = act_for(&acts.ffn_mid, w_down);
        for t in 0..n {
            unsafe { act.set_row(t, b.gate.slice(t * ffn..(t + 1) * ffn)) };
        }
        act
    }

    /// `gate = act(gate) * up`: SwiGLU, or GeGLU with tanh GELU (Gemma 3).
    fn glu(&self, gate: &mut [f32], up: &[f32]) {
        if self.span.cfg.gelu_tanh {
            fastmath::gelu_tanh_mul(gate, up);
        } else {
            fastmath::silu_mul(gate, up);
        }
    }

    /// A mixture-of-experts block on the normed rows (`normed`, this thread's `(n_tok,
    /// hidden)` copy, also quantized for the router): route every row, run each chosen
    /// expert's MLP on its rows only, and add each row's weighted expert outputs, summed in
    /// expert order, to the residual (RMS-normed first with a post-norm). Five barriers, however
    /// many experts run; ends at one.
    #[allow(clippy::type_complexity)]
    fn moe_residual(
        &self,
        ctx: &Ctx,
        moe: &MoeBlock,
        normed: &[f32],
        dense: Option<(&[f32], &[f32])>,
        post_norm: Option<&[f32]>,
        xn: &mut [f32],
    ) {
        let (cfg, b, n) = (&self.span.cfg, self.bufs, self.n_tok);
        let acts = &b.acts[ctx.tid];
        let d = cfg.hidden;
        let m = cfg.moe.as_ref().expect("a layer with experts loads only with a MoE config");
        let router_act = act_for(&acts.ffn_in, &moe.router);
        moe.router.matmul_part(ctx, router_act, n, b.router, m.n_experts, false, moe.router_bias.as_deref());
        ctx.barrier();
        // SAFETY (all SharedMut accesses below): as in `run`.
        // Every thread routes every row (cheap), so no thread waits for another's choice.
        let mut routing = Routing::new(unsafe { b.router.slice(0..n * m.n_experts) }, n, m);
        if let Some(scale) = &moe.expert_scale {
            routing.scale_experts(scale);
        }
        for (s, &t) in routing.slot_row.iter().enumerate() {
            for a in &acts.moe_in {
                unsafe { a.set_row(s, &normed[t * d..(t + 1) * d]) };
            }
        }
        let ffn = moe.ffn();
        for (e, slots) in routing.used() {
            let (ex, rows) = (&moe.experts[e], slots.len());
            for (w, bias, out) in [(&ex.gate, &ex.gate_bias, b.gate), (&ex.up, &ex.up_bias, b.up)] {
                let act = act_for(&acts.moe_in, w).from_row(slots.start);
                w.matmul_part(ctx, act, rows, out.offset(slots.start * ffn), ffn, false, bias.as_deref());
            }
        }
        ctx.barrier();
        let n_slots = routing.slot_row.len();
        for s in ctx.split(n_slots) {
            let (g, u) = unsafe { (b.gate.slice_mut(s * ffn..(s + 1) * ffn), b.up.slice(s * ffn..(s + 1) * ffn)) };
            match &m.clamped_swiglu {
                Some(act) => act.apply(g, u),
                None => self.glu(g, u),
            }
        }
        ctx.barrier();
        for s in 0..n_slots {
            let row = unsafe { b.gate.slice(s * ffn..(s + 1) * ffn) };
            for a in &acts.moe_mid {
                unsafe { a.set_row(s, row) };
            }
        }
        for (e, slots) in routing.used() {
            let ex = &moe.experts[e];
            let act = act_for(&acts.moe_mid, &ex.down).from_row(slots.start);
            ex.down.matmul_part(ctx, act, slots.len(), b.expert_out.offset(slots.start * d), d, false, ex.down_bias.as_deref());
        }
        ctx.barrier();
        let k = m.n_used;
        let (mut sum, mut both) = (vec![0f32; d], vec![0f32; if dense.is_some() { d } else { 0 }]);
        for t in ctx.split(n) {
            sum.fill(0.0);
            for &s in &routing.row_slots[t * k..(t + 1) * k] {
                ops::axpy(routing.slot_weight[s], unsafe { b.expert_out.slice(s * d..(s + 1) * d) }, &mut sum);
            }
            // Gemma 4: each branch normed, then summed (the outer norm follows).
            if let Some((dense_norm, moe_norm)) = dense {
                ops::rms_norm(unsafe { b.post.slice(t * d..(t + 1) * d) }, dense_norm, cfg.eps, &mut both);
                ops::rms_norm(&sum, moe_norm, cfg.eps, xn);
                sum.iter_mut().zip(both.iter().zip(xn.iter())).for_each(|(s, (&a, &e))| *s = a + e);
            }
            let x = unsafe { b.x.slice_mut(t * d..(t + 1) * d) };
            let add: &[f32] = match post_norm {
                Some(w) => {
                    ops::rms_norm(&sum, w, cfg.eps, xn);
                    xn
                }
                None => &sum,
            };
            x.iter_mut().zip(add).for_each(|(x, &y)| *x += y);
        }
        ctx.barrier();
    }

    /// `x += m @ act (+ bias)`, or with a post-norm (Gemma 3) `x += rms_norm(m @ act)`: the
    /// product goes to `post`, then each thread normalizes and adds its own rows. Ends at a
    /// barrier.
    fn project_residual(&self, ctx: &Ctx, m: &QMatrix, act: ActRowsMut, bias: Option<&[f32]>, post_norm: Option<&[f32]>, xn: &mut [f32]) {
        let (cfg, b, n) = (&self.span.cfg, self.bufs, self.n_tok);
        let d = cfg.hidden;
        match post_norm {
            None => m.matmul_part(ctx, act, n, b.x, d, true, bias),
            Some(w) => {
                m.matmul_part(ctx, act, n, b.post, d, false, bias);
                ctx.barrier();
                for t in ctx.split(n) {
                    // SAFETY: row t of `post` and `x` belongs to this thread after the barrier.
                    let (o, x) = unsafe { (b.post.slice(t * d..(t + 1) * d), b.x.slice_mut(t * d..(t + 1) * d)) };
                    ops::rms_norm(o, w, cfg.eps, xn);
                    x.iter_mut().zip(xn.iter()).for_each(|(x, &y)| *x += y);
                }
            }
        }
        ctx.barrier();
    }
}
