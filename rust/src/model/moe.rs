//! The mixture-of-experts feed-forward block of a decoder layer: a router picks `n_used` of
//! `n_experts` gated MLPs per token, and the token's output is their outputs weighted by the
//! router's probabilities.
//!
//! Follows transformers' models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeTopKRouter: softmax
//! over all experts' logits in f32, top-k, renormalized when `norm_topk_prob`;
//! Qwen3MoeExperts: each chosen expert's SwiGLU MLP scaled by its weight, summed in expert
//! order) and llama.cpp's `build_moe_ffn` with softmax gating for GGUF `qwen3moe`, which
//! always renormalizes.
//!
//! Only the chosen experts run: a batch's rows are grouped by expert (each expert's rows
//! contiguous, "slots"), so each expert's matrices are read once per batch, for prefill and
//! for several sessions at once alike, and a decode step reads `n_used` experts' weights.

use crate::compute::{ops, QMatrix};
use crate::error::{Error, Result};
use crate::model::weights::{expect_shape, LayerTensors};

/// Settings of the mixture-of-experts layers of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per layer.
    pub n_experts: usize,
    /// Experts each token runs (top-k).
    pub n_used: usize,
    /// Whether the chosen experts' probabilities are divided by their sum
    /// (`norm_topk_prob`).
    pub norm_topk_prob: bool,
}

impl MoeConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.n_used == 0 || self.n_used > self.n_experts {
            return Err(Error::InvalidArgument(format!(
                "{} experts used per token of {} experts",
                self.n_used, self.n_experts
            )));
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
}

/// One layer's router and experts.
pub(crate) struct MoeBlock {
    /// `(n_experts, hidden)`: a token's expert logits are `router @ x`.
    pub router: QMatrix,
    pub experts: Vec<Expert>,
}

impl MoeBlock {
    /// Loads the roles `ffn_gate_inp` (router), `ffn_gate_exps`, `ffn_up_exps` and
    /// `ffn_down_exps` (see [`LayerTensors::experts`]).
    pub fn load(t: &mut LayerTensors, cfg: &MoeConfig, hidden: usize) -> Result<Self> {
        let router = t.matrix("ffn_gate_inp")?;
        expect_shape(&router, "ffn_gate_inp", cfg.n_experts, hidden)?;
        let gates = t.experts("ffn_gate_exps", cfg.n_experts)?;
        let ups = t.experts("ffn_up_exps", cfg.n_experts)?;
        let downs = t.experts("ffn_down_exps", cfg.n_experts)?;
        let ffn = gates[0].rows();
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((gate, up), down)| {
                expect_shape(&gate, "ffn_gate_exps", ffn, hidden)?;
                expect_shape(&up, "ffn_up_exps", ffn, hidden)?;
                expect_shape(&down, "ffn_down_exps", hidden, ffn)?;
                Ok(Expert { gate, up, down })
            })
            .collect::<Result<_>>()?;
        Ok(MoeBlock { router, experts })
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
    /// Routes `n` rows from their router logits (`(n, n_experts)`): softmax in f32, the
    /// `n_used` most probable experts (the lower index first among equals), their
    /// probabilities renormalized to sum 1 when `norm_topk_prob`.
    pub fn new(logits: &[f32], n: usize, cfg: &MoeConfig) -> Routing {
        let (e_n, k) = (cfg.n_experts, cfg.n_used);
        let mut chosen = Vec::with_capacity(n * k); // (expert, weight) per row, k each
        let mut probs = vec![0f32; e_n];
        let mut order: Vec<usize> = Vec::with_capacity(e_n);
        for t in 0..n {
            probs.copy_from_slice(&logits[t * e_n..(t + 1) * e_n]);
            ops::softmax(&mut probs);
            order.clear();
            order.extend(0..e_n);
            // Stable: equal probabilities keep the lower expert first.
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let top = &mut order[..k];
            let sum: f32 = top.iter().map(|&e| probs[e]).sum();
            let scale = if cfg.norm_topk_prob { 1.0 / sum } else { 1.0 };
            top.sort_unstable();
            chosen.extend(top.iter().map(|&e| (e, probs[e] * scale)));
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
        let cfg = MoeConfig { n_experts: 4, n_used: 2, norm_topk_prob: true };
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
    fn equal_logits_choose_the_lower_experts() {
        let cfg = MoeConfig { n_experts: 4, n_used: 2, norm_topk_prob: true };
        let r = Routing::new(&[0.0; 4], 1, &cfg);
        assert_eq!(r.offsets, vec![0, 1, 2, 2, 2]);
        assert_eq!(r.slot_weight, vec![0.5, 0.5]);
    }

    #[test]
    fn too_many_used_experts_are_refused() {
        assert!(MoeConfig { n_experts: 4, n_used: 5, norm_topk_prob: true }.validate().is_err());
        assert!(MoeConfig { n_experts: 4, n_used: 0, norm_topk_prob: true }.validate().is_err());
    }
}
