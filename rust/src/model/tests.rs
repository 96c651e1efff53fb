//! Span forward passes on the tiny random Llama checkpoint of `tests/data/tiny-llama` (3 layers,
//! hidden 64, 4 heads, 2 KV heads): sub-ranges of a span against the whole span, bit for bit.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;
use crate::checkpoint::Checkpoint;
use crate::compute::ThreadPool;
use crate::quant::GgmlType;
use crate::test_rng::TestRng;

/// Width of the tiny model's hidden states.
pub(crate) const TINY_HIDDEN: usize = 64;
/// Layers of the tiny model.
pub(crate) const TINY_LAYERS: usize = 3;

/// The tiny model's settings, as the Python family module reads them from its config.json
/// (rope theta 10000, HF rotary layout, context 256).
fn tiny_config(quantize: Option<GgmlType>) -> LlamaConfig {
    let head_dim = 16;
    LlamaConfig {
        hidden: TINY_HIDDEN,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim,
        eps: 1e-5,
        rope_inv_freq: (0..head_dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32)).collect(),
        rope_interleaved: false,
        rope_attention_factor: 1.0,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        max_positions: 256,
        quantize,
    }
}

/// Layers `first .. first + n` of the tiny model; `quantize` converts its f32 matrices at load.
pub(crate) fn tiny_llama(first: usize, n: usize, quantize: Option<GgmlType>) -> LlamaSpan {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama/model.safetensors");
    let checkpoint = Checkpoint::open(&[path]).expect("the tiny checkpoint opens");
    let roles = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    let names = (first..first + n)
        .map(|i| {
            roles
                .iter()
                .map(|(role, name)| (role.to_string(), format!("model.layers.{i}.{name}.weight")))
                .collect::<BTreeMap<_, _>>()
        })
        .collect();
    LlamaSpan::load(&checkpoint, tiny_config(quantize), first, names).expect("the tiny span loads")
}

/// Prefill of 5 and 3 tokens for two sessions, then two decode steps, through `run` (which
/// gets the hidden states and both sessions' caches); returns every step's output.
fn prefill_and_decode(rng_seed: u64, mut run: impl FnMut(&mut [f32], &[usize], usize)) -> Vec<Vec<f32>> {
    let mut rng = TestRng::new(rng_seed);
    let mut outputs = Vec::new();
    for (step, tokens) in [[5usize, 3], [1, 1], [1, 1]].iter().enumerate() {
        let rows: usize = tokens.iter().sum();
        let mut hidden = rng.gaussians(rows * TINY_HIDDEN);
        run(&mut hidden, tokens, step);
        outputs.push(hidden);
    }
    outputs
}

/// A batch of two sessions through layers `ranges`, one after the other, each range with its
/// own pair of caches (as workers serving consecutive spans hold them).
fn through_ranges(span: &LlamaSpan, pool: &ThreadPool, ranges: &[std::ops::Range<usize>]) -> Vec<Vec<f32>> {
    let mut caches: Vec<[KvCache; 2]> =
        ranges.iter().map(|r| [span.new_cache_for(r.len(), 64), span.new_cache_for(r.len(), 64)]).collect();
    prefill_and_decode(7, |hidden, tokens, _| {
        for (range, [a, b]) in ranges.iter().zip(caches.iter_mut()) {
            let mut seqs = [SeqChunk { cache: a, n_tokens: tokens[0] }, SeqChunk { cache: b, n_tokens: tokens[1] }];
            span.forward_layers(pool, hidden, &mut seqs, range.clone()).unwrap();
        }
    })
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // one range of layers, not a list of indices
fn sub_ranges_of_a_span_equal_the_whole_span_bit_for_bit() {
    for quantize in [None, Some(GgmlType::Q8_0)] {
        let span = tiny_llama(0, TINY_LAYERS, quantize);
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut caches = [span.new_cache(64), span.new_cache(64)];
            let whole = prefill_and_decode(7, |hidden, tokens, _| {
                let [a, b] = &mut caches;
                let mut seqs = [SeqChunk { cache: a, n_tokens: tokens[0] }, SeqChunk { cache: b, n_tokens: tokens[1] }];
                span.forward(&pool, hidden, &mut seqs).unwrap();
            });
            assert_eq!(caches[0].len(), 7);
            for ranges in [vec![0..1, 1..3], vec![0..2, 2..3], vec![0..1, 1..2, 2..3], vec![0..3]] {
                assert_eq!(through_ranges(&span, &pool, &ranges), whole, "{ranges:?}, {quantize:?}, {threads} threads");
            }
        }
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // one range of layers, not a list of indices
fn a_span_loaded_from_a_middle_layer_equals_that_range_of_a_wider_span() {
    let pool = ThreadPool::new(2);
    let wide = tiny_llama(0, TINY_LAYERS, None);
    let narrow = tiny_llama(1, 2, None);
    let via_wide = through_ranges(&wide, &pool, &[1..3]);
    let via_narrow = through_ranges(&narrow, &pool, &[0..2]);
    assert_eq!(via_wide, via_narrow);
}

#[test]
fn bad_ranges_and_caches_are_refused_without_touching_the_caches() {
    let span = tiny_llama(0, TINY_LAYERS, None);
    let pool = ThreadPool::new(1);
    let mut cache = span.new_cache_for(2, 8);
    let mut hidden = vec![0.5f32; TINY_HIDDEN];
    for range in [0..0, 2..4, 3..5] {
        let mut seqs = [SeqChunk { cache: &mut cache, n_tokens: 1 }];
        let err = span.forward_layers(&pool, &mut hidden, &mut seqs, range).unwrap_err();
        assert!(matches!(err, crate::Error::InvalidArgument(_)), "{err}");
    }
    // A 2-layer cache on a 1-layer or 3-layer pass.
    for range in [0..1, 0..3] {
        let mut seqs = [SeqChunk { cache: &mut cache, n_tokens: 1 }];
        let err = span.forward_layers(&pool, &mut hidden, &mut seqs, range).unwrap_err();
        assert!(err.to_string().contains("made for 2 layers"), "{err}");
    }
    assert_eq!(cache.len(), 0);
    assert!(hidden.iter().all(|&v| v == 0.5));
    let mut seqs = [SeqChunk { cache: &mut cache, n_tokens: 1 }];
    span.forward_layers(&pool, &mut hidden, &mut seqs, 1..3).unwrap();
    assert_eq!(cache.len(), 1);
}
