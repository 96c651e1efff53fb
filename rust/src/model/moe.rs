//! The mixture-of-experts feed-forward block of a decoder layer: a router picks `n_used` of
//! `n_experts` gated MLPs per token, and the token's output is their outputs weighted by the
//! router's probabilities.
//!
//! Follows transformers' models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeTopKRouter: softmax
//! over all experts' logits in f32, top-k, renormalized when `norm_topk_prob`;
//! Qwen3MoeExperts: each chosen expert's SwiGLU MLP scaled by its weight, summed in expert
//! order) and llama.cpp's `build_moe_ffn` with softmax gating for GGUF `qwen3moe`, which
//! always renormalizes. gpt-oss (transformers' models/gpt_oss/modeling_gpt_oss.py,
//! GptOssTopKRouter and GptOssExperts; llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT`
//! and `LLM_FFN_SWIGLU_OAI_MOE`) adds a router bias, a softmax over the top-k logits only,
//! biases on every expert matrix and a clamped SwiGLU.
//!
//! Only the chosen experts run: a batch's rows are grouped by expert (each expert's rows
//! contiguous, "slots"), so each expert's matrices are read once per batch, for prefill and
//! for several sessions at once alike, and a decode step reads `n_used` experts' weights.

use crate::compute::{ops, QMatrix};
use crate::error::{Error, Result};
use crate::model::weights::{expect_shape, LayerTensors};

/// How the router's logits become the chosen experts' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over every expert, then the top k (Qwen3-MoE), renormalized with
    /// `norm_topk_prob`.
    Softmax,
    /// The top k logits, then a softmax over those k (gpt-oss).
    TopKSoftmax,
}

/// gpt-oss's expert activation: `min(gate, limit)`, `clamp(up, -limit, limit)`, then
/// `gate * sigmoid(alpha * gate) * (up + 1)` (GptOssExperts._apply_gate; ggml's
/// `swiglu_oai`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClampedSwiglu {
    /// Slope inside the sigmoid (1.702).
    pub alpha: f32,
    /// Upper clamp of the gate, and symmetric clamp of up (7).
    pub limit: f32,
}

impl ClampedSwiglu {
    /// `gate = act(gate, up)` element-wise.
    pub fn apply(&self, gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            let x = g.min(self.limit);
            let y = u.clamp(-self.limit, self.limit);
            *g = x / (1.0 + (-self.alpha * x).exp()) * (y + 1.0);
        }
    }
}

/// Settings of the mixture-of-experts layers of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per layer.
    pub n_experts: usize,
    /// Experts each token runs (top-k).
    pub n_used: usize,
    /// Whether the chosen experts' probabilities are divided by their sum
    /// (`norm_topk_prob`; [`Gating::Softmax`] only).
    pub norm_topk_prob: bool,
    /// How the router's logits become weights.
    pub gating: Gating,
    /// The experts' activation when not the span's SwiGLU / GeGLU.
    pub clamped_swiglu: Option<ClampedSwiglu>,
}

impl MoeConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.n_used == 0 || self.n_used > self.n_experts {
            return Err(Error::InvalidArgument(format!(
                "{} experts used per token of {} experts",
                self.n_used, self.n_experts
            )));
        }
        if let Some(c) = self.clamped_swiglu {
            if !(c.alpha.is_finite() && c.limit.is_finite() && c.limit >= 0.0) {
                return Err(Error::InvalidArgument(format!("clamped SwiGLU needs a finite alpha and limit >= 0, got {c:?}")));
            }
        }
        Ok(())
    }
}

/// One expert's gated MLP.
pub(crate) struct Expert {
    /// `(ffn, hidden)`.
    pub gate: QMatrix,
    /// `(ffn, hidden)`.
    pub up: QMatrix,
    /// `(hidden, ffn)`.
    pub down: QMatrix,
    /// Biases of the three products (gpt-oss), `ffn`, `ffn` and `hidden` values.
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
}

/// One layer's router and experts.
pub(crate) struct MoeBlock {
    /// `(n_experts, hidden)`: a token's expert logits are `router @ x (+ router_bias)`.
    pub router: QMatrix,
    /// `n_experts` values (gpt-oss).
    pub router_bias: Option<Vec<f32>>,
    /// Gemma 4's router input (Gemma4TextRouter): the layer's residual RMS-normed without a
    /// weight, times these `hidden` values and `hidden^-0.5`; `None`: the MLP's normed input.
    pub router_scale: Option<Vec<f32>>,
    /// Gemma 4's `per_expert_scale`: each chosen expert's weight times its value.
    pub expert_scale: Option<Vec<f32>>,
    pub experts: Vec<Expert>,
}

impl MoeBlock {
    /// Loads the roles `ffn_gate_inp` (router), `ffn_gate_exps`, `ffn_up_exps` and
    /// `ffn_down_exps` (see [`LayerTensors::experts`]; or `ffn_gate_up_exps` fused, see
    /// [`LayerTensors::fused_experts`]), the optional biases `ffn_gate_inp_bias`,
    /// `ffn_gate_exps_bias`, `ffn_up_exps_bias`, `ffn_down_exps_bias` (see
    /// [`LayerTensors::expert_vectors`]), and Gemma 4's `ffn_gate_inp_scale` and
    /// `ffn_down_exps_scale`.
    pub fn load(t: &mut LayerTensors, cfg: &MoeConfig, hidden: usize) -> Result<Self> {
        // Never converted on load: a rounded router may choose other experts (llama.cpp's
        // quantizer leaves `ffn_gate_inp` as it is too).
        let router = t.matrix_as_stored("ffn_gate_inp")?;
        expect_shape(&router, "ffn_gate_inp", cfg.n_experts, hidden)?;
        let router_bias = if t.has("ffn_gate_inp_bias") { Some(t.vector("ffn_gate_inp_bias", cfg.n_experts)?) } else { None };
        let n = cfg.n_experts;
        let router_scale = if t.has("ffn_gate_inp_scale") { Some(t.vector("ffn_gate_inp_scale", hidden)?) } else { None };
        let expert_scale = if t.has("ffn_down_exps_scale") { Some(t.vector("ffn_down_exps_scale", n)?) } else { None };
        // transformers' gpt-oss layout: gate and up fused, transposed, alternating columns.
        let (gates, ups) = if t.has("ffn_gate_up_exps") {
            // Gemma 4: gate rows, then up rows, of each stacked expert.
            let mut parts = t.fused_experts("ffn_gate_up_exps", n, 2)?;
            let up = parts.pop().expect("two parts");
            (parts.pop().expect("two parts"), up)
        } else if t.has("ffn_gate_up_exps_blocks") {
            let mut parts = t.mxfp4_experts("ffn_gate_up_exps_blocks", "ffn_gate_up_exps_scales", n, 2)?;
            let up = parts.pop().expect("two parts");
            (parts.pop().expect("two parts"), up)
        } else if t.has("ffn_gate_up_exps_t") {
            let mut parts = t.transposed_experts("ffn_gate_up_exps_t", n, 2)?;
            let up = parts.pop().expect("two parts");
            (parts.pop().expect("two parts"), up)
        } else {
            (t.experts("ffn_gate_exps", n)?, t.experts("ffn_up_exps", n)?)
        };
        let downs = if t.has("ffn_down_exps_blocks") {
            t.mxfp4_experts("ffn_down_exps_blocks", "ffn_down_exps_scales", n, 1)?.pop().expect("one part")
        } else if t.has("ffn_down_exps_t") {
            t.transposed_experts("ffn_down_exps_t", n, 1)?.pop().expect("one part")
        } else {
            t.experts("ffn_down_exps", n)?
        };
        let ffn = gates[0].rows();
        if ffn == 0 {
            return Err(Error::Shape("experts of width 0".into()));
        }
        let (mut gate_biases, mut up_biases) = if t.has("ffn_gate_up_exps_bias") {
            let mut parts = t.interleaved_expert_vectors("ffn_gate_up_exps_bias", n, 2, ffn)?;
            let up = parts.pop();
            (parts.pop(), up)
        } else {
            (t.expert_vectors("ffn_gate_exps_bias", n, ffn)?, t.expert_vectors("ffn_up_exps_bias", n, ffn)?)
        };
        let mut down_biases = t.expert_vectors("ffn_down_exps_bias", n, hidden)?;
        // Expert `j`'s vector out of one role's `n` (moved, not copied).
        fn take(biases: &mut Option<Vec<Vec<f32>>>, j: usize) -> Option<Vec<f32>> {
            biases.as_mut().map(|b| std::mem::take(&mut b[j]))
        }
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .enumerate()
            .map(|(j, ((gate, up), down))| {
                expect_shape(&gate, "ffn_gate_exps", ffn, hidden)?;
                expect_shape(&up, "ffn_up_exps", ffn, hidden)?;
                expect_shape(&down, "ffn_down_exps", hidden, ffn)?;
                Ok(Expert {
                    gate,
                    up,
                    down,
                    gate_bias: take(&mut gate_biases, j),
                    up_bias: take(&mut up_biases, j),
                    down_bias: take(&mut down_biases, j),
                })
            })
            .collect::<Result<_>>()?;
        Ok(MoeBlock { router, router_bias, router_scale, expert_scale, experts })
    }

    /// Width of each expert's MLP.
    pub fn ffn(&self) -> usize {
        self.experts[0].gate.rows()
    }

    /// Every matrix read by the normed hidden state: the experts' gate and up.
    pub fn input_matrices(&self) -> impl Iterator<Item = &QMatrix> {
        self.experts.iter().flat_map(|e| [&e.gate, &e.up])
    }
}

/// Where a batch's rows go: `n_used` slots per row, grouped by expert.
#[derive(Debug, PartialEq)]
pub(crate) struct Routing {
    /// Slots of expert `e` are `offsets[e]..offsets[e + 1]` (ascending token order).
    pub offsets: Vec<usize>,
    /// The row each slot reads.
    pub slot_row: Vec<usize>,
    /// The router's weight of each slot's expert for its row.
    pub slot_weight: Vec<f32>,
    /// Per row, its `n_used` slots in ascending expert order (the order transformers sums
    /// the experts' outputs in).
    pub row_slots: Vec<usize>,
}

impl Routing {
    /// Multiplies each slot's weight by its expert's `scale` (Gemma 4's `per_expert_scale`,
    /// after the renormalization).
    pub fn scale_experts(&mut self, scale: &[f32]) {
        for (e, w) in scale.iter().enumerate() {
            for s in self.offsets[e]..self.offsets[e + 1] {
                self.slot_weight[s] *= w;
            }
        }
    }

    /// Routes `n` rows from their router logits (`(n, n_experts)`) by `cfg.gating`: the
    /// `n_used` experts of highest logit (the lower index first among equals), weighted by
    /// their softmax probability over all experts (renormalized to sum 1 when
    /// `norm_topk_prob`), or by a softmax over the chosen logits only.
    pub fn new(logits: &[f32], n: usize, cfg: &MoeConfig) -> Routing {
        let (e_n, k) = (cfg.n_experts, cfg.n_used);
        let mut chosen = Vec::with_capacity(n * k); // (expert, weight) per row, k each
        let mut probs = vec![0f32; e_n];
        let mut order: Vec<usize> = Vec::with_capacity(e_n);
        for t in 0..n {
            let row = &logits[t * e_n..(t + 1) * e_n];
            order.clear();
            order.extend(0..e_n);
            // Stable: equal logits keep the lower expert first. Softmax keeps the order.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let top = &mut order[..k];
            top.sort_unstable();
            match cfg.gating {
                Gating::Softmax => {
                    probs.copy_from_slice(row);
                    ops::softmax(&mut probs);
                    let sum: f32 = top.iter().map(|&e| probs[e]).sum();
                    let scale = if cfg.norm_topk_prob { 1.0 / sum } else { 1.0 };
                    chosen.extend(top.iter().map(|&e| (e, probs[e] * scale)));
                }
                Gating::TopKSoftmax => {
                    let w = &mut probs[..k];
                    w.iter_mut().zip(top.iter()).for_each(|(w, &e)| *w = row[e]);
                    ops::softmax(w);
                    chosen.extend(top.iter().zip(w.iter()).map(|(&e, &w)| (e, w)));
                }
            }
        }
        let mut offsets = vec![0usize; e_n + 1];
        for &(e, _) in &chosen {
            offsets[e + 1] += 1;
        }
        for e in 0..e_n {
            offsets[e + 1] += offsets[e];
        }
        let mut next = offsets.clone();
        let mut slot_row = vec![0usize; n * k];
        let mut slot_weight = vec![0f32; n * k];
        let mut row_slots = vec![0usize; n * k];
        for (i, &(e, w)) in chosen.iter().enumerate() {
            let s = next[e];
            next[e] += 1;
            slot_row[s] = i / k;
            slot_weight[s] = w;
            row_slots[i] = s;
        }
        Routing { offsets, slot_row, slot_weight, row_slots }
    }

    /// The experts with at least one slot, with their slot ranges.
    pub fn used(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        self.offsets.windows(2).enumerate().filter(|(_, w)| w[1] > w[0]).map(|(e, w)| (e, w[0]..w[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_picks_the_most_probable_experts_and_groups_slots_by_expert() {
        let cfg = MoeConfig { n_experts: 4, n_used: 2, norm_topk_prob: true, gating: Gating::Softmax, clamped_swiglu: None };
        // Row 0 prefers experts 2 then 0; row 1 prefers 3 then 2.
        let logits = [1.0, -1.0, 2.0, 0.0, -3.0, 0.0, 1.0, 2.0];
        let r = Routing::new(&logits, 2, &cfg);
        assert_eq!(r.offsets, vec![0, 1, 1, 3, 4]);
        assert_eq!(r.slot_row, vec![0, 0, 1, 1]);
        // Row 0's slots in expert order: expert 0 (slot 0), expert 2 (slot 1).
        assert_eq!(r.row_slots, vec![0, 1, 2, 3]);
        let (p0, p2) = (1f32.exp(), 2f32.exp());
        assert!((r.slot_weight[0] - p0 / (p0 + p2)).abs() < 1e-6);
        assert!((r.slot_weight[1] - p2 / (p0 + p2)).abs() < 1e-6);
        assert_eq!(r.used().map(|(e, s)| (e, s.len())).collect::<Vec<_>>(), vec![(0, 1), (2, 2), (3, 1)]);

        let raw = Routing::new(&logits, 2, &MoeConfig { norm_topk_prob: false, ..cfg });
        let total: f32 = [1.0f32, -1.0, 2.0, 0.0].iter().map(|x| x.exp()).sum();
        assert!((raw.slot_weight[1] - p2 / total).abs() < 1e-6);
    }

    #[test]
    fn top_k_softmax_weighs_the_chosen_logits_only() {
        let cfg = MoeConfig { n_experts: 4, n_used: 2, norm_topk_prob: false, gating: Gating::TopKSoftmax, clamped_swiglu: None };
        let r = Routing::new(&[1.0, -1.0, 2.0, 0.0], 1, &cfg);
        assert_eq!(r.offsets, vec![0, 1, 1, 2, 2]);
        let (p0, p2) = (1f32.exp(), 2f32.exp());
        assert!((r.slot_weight[0] - p0 / (p0 + p2)).abs() < 1e-6);
        assert!((r.slot_weight[1] - p2 / (p0 + p2)).abs() < 1e-6);
    }

    #[test]
    fn clamped_swiglu_matches_torch() {
        // transformers' GptOssExperts._apply_gate (alpha 1.702, limit 7) on
        // gate = [-2, 0.5, 9], up = [1, -8, 3], computed with torch.
        let act = ClampedSwiglu { alpha: 1.702, limit: 7.0 };
        let mut g = [-2.0f32, 0.5, 9.0];
        act.apply(&mut g, &[1.0, -8.0, 3.0]);
        let sig = |x: f32| 1.0 / (1.0 + (-1.702 * x).exp());
        let want = [-2.0 * sig(-2.0) * 2.0, 0.5 * sig(0.5) * -6.0, 7.0 * sig(7.0) * 4.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn equal_logits_choose_the_lower_experts() {
        let cfg = MoeConfig { n_experts: 4, n_used: 2, norm_topk_prob: true, gating: Gating::Softmax, clamped_swiglu: None };
        let r = Routing::new(&[0.0; 4], 1, &cfg);
        assert_eq!(r.offsets, vec![0, 1, 2, 2, 2]);
        assert_eq!(r.slot_weight, vec![0.5, 0.5]);
    }

    #[test]
    fn a_clamp_that_would_panic_is_refused() {
        for (alpha, limit) in [(1.702, -1.0), (1.702, f32::NAN), (f32::INFINITY, 7.0)] {
            let cfg = MoeConfig {
                n_experts: 4,
                n_used: 2,
                norm_topk_prob: false,
                gating: Gating::TopKSoftmax,
                clamped_swiglu: Some(ClampedSwiglu { alpha, limit }),
            };
            assert!(cfg.validate().is_err(), "{alpha} {limit}");
        }
    }

    #[test]
    fn too_many_used_experts_are_refused() {
        assert!(MoeConfig { n_experts: 4, n_used: 5, norm_topk_prob: true, gating: Gating::Softmax, clamped_swiglu: None }.validate().is_err());
        assert!(MoeConfig { n_experts: 4, n_used: 0, norm_topk_prob: true, gating: Gating::Softmax, clamped_swiglu: None }.validate().is_err());
    }
}
