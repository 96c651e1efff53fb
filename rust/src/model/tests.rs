//! Span forward passes on the tiny random Llama checkpoint of `tests/data/tiny-llama` (3 layers,
//! hidden 64, 4 heads, 2 KV heads): sub-ranges of a span against the whole span, bit for bit.
//! And the Qwen options of the layer (`tests/data/tiny-qwen2`: q/k/v biases;
//! `tests/data/tiny-qwen3-tied`: q/k norms, head_dim 32 != 64 / 4) against a scalar
//! reference layer written from transformers' modeling_qwen2.py / modeling_qwen3.py, and
//! Gemma 3's and Phi-3's options (`tests/data/tiny-gemma3`, `tests/data/tiny-phi3-mini`: fused
//! qkv / gate_up tensors taken by row ranges, partial rotary, a long RoPE table from a
//! position on, every layer sliding) against the same reference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;
use crate::checkpoint::Checkpoint;
use crate::compute::ThreadPool;
use crate::model::weights::{load_vector, tensor_data, LayerNames, LayerTensors};
use crate::quant::GgmlType;
use crate::test_rng::TestRng;

/// Width of the tiny model's hidden states.
pub(crate) const TINY_HIDDEN: usize = 64;
/// Layers of the tiny model.
pub(crate) const TINY_LAYERS: usize = 3;

/// The tiny model's settings, as the Python family module reads them from its config.json
/// (rope theta 10000, HF rotary layout, context 256).
fn tiny_config(quantize: Option<GgmlType>) -> DecoderConfig {
    let head_dim = 16;
    DecoderConfig {
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
        norm_offset: 0.0,
        gelu_tanh: false,
        layer_sliding: Vec::new(),
        sliding_window: 0,
        rope_local_inv_freq: Vec::new(),
        rope_long_inv_freq: Vec::new(),
        rope_long_from: 0,
        kv_dtype: None,
        moe: None,
        global_head_dim: 0,
        global_n_kv_heads: 0,
        v_norm: false,
        kv_source: Vec::new(),
        per_layer_input: 0,
        n_layers: 0,
    }
}

/// Layers `first .. first + n` of the tiny model; `quantize` converts its f32 matrices at load.
pub(crate) fn tiny_llama(first: usize, n: usize, quantize: Option<GgmlType>) -> DecoderSpan {
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
    DecoderSpan::load(&checkpoint, tiny_config(quantize), first, names).expect("the tiny span loads")
}

/// Prefill of 5 and 3 tokens for two sessions, then two decode steps, through `run` (which
/// gets the hidden states and both sessions' caches); returns every step's output.
fn prefill_and_decode(rng_seed: u64, mut run: impl FnMut(&mut Vec<f32>, &[usize], usize)) -> Vec<Vec<f32>> {
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
fn through_ranges(span: &DecoderSpan, pool: &ThreadPool, ranges: &[std::ops::Range<usize>]) -> Vec<Vec<f32>> {
    let mut caches: Vec<[KvCache; 2]> =
        ranges.iter().map(|r| [span.new_cache_for(r.clone(), 64), span.new_cache_for(r.clone(), 64)]).collect();
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
    let mut cache = span.new_cache_for(0..2, 8);
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

/// Settings of a tiny Qwen checkpoint (tests/fixtures/tiny_qwen.py: rope theta 1e6, eps 1e-5;
/// the Qwen2 fixture's YaRN frequencies are left out, the reference layer takes the same ones).
fn tiny_qwen_config(head_dim: usize) -> DecoderConfig {
    DecoderConfig {
        head_dim,
        rope_inv_freq: (0..head_dim / 2).map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / head_dim as f32)).collect(),
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        ..tiny_config(None)
    }
}

/// Role -> HF name of one Qwen layer, with the optional roles the checkpoint has.
fn qwen_names(checkpoint: &Checkpoint, i: usize) -> LayerNames {
    let roles = [
        ("attn_norm", "input_layernorm.weight"),
        ("attn_q", "self_attn.q_proj.weight"),
        ("attn_k", "self_attn.k_proj.weight"),
        ("attn_v", "self_attn.v_proj.weight"),
        ("attn_output", "self_attn.o_proj.weight"),
        ("ffn_norm", "post_attention_layernorm.weight"),
        ("ffn_gate", "mlp.gate_proj.weight"),
        ("ffn_up", "mlp.up_proj.weight"),
        ("ffn_down", "mlp.down_proj.weight"),
        ("attn_q_bias", "self_attn.q_proj.bias"),
        ("attn_k_bias", "self_attn.k_proj.bias"),
        ("attn_v_bias", "self_attn.v_proj.bias"),
        ("attn_q_norm", "self_attn.q_norm.weight"),
        ("attn_k_norm", "self_attn.k_norm.weight"),
    ];
    roles
        .iter()
        .map(|(role, name)| (role.to_string(), format!("model.layers.{i}.{name}")))
        .filter(|(_, name)| checkpoint.data(name).is_ok())
        .collect()
}

fn open_tiny(dir: &str) -> Checkpoint {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(dir).join("model.safetensors");
    Checkpoint::open(&[path]).expect("the tiny checkpoint opens")
}

/// One decoder layer in plain f32 loops, over a whole sequence from position 0, in
/// transformers' order: RMSNorm; q/k/v = x W^T + b (Qwen2); q/k per-head RMSNorm (Qwen3);
/// rotate-half RoPE; causal GQA softmax attention; o_proj + residual; RMSNorm; SwiGLU MLP +
/// residual. Gemma 3's options as modeling_gemma3.py applies them: norms times
/// `norm_offset + weight`, the local rotary table and window on sliding layer `layer`,
/// post-norms of the attention and MLP outputs, GELU-tanh.
fn reference_layer(ck: &Checkpoint, names: &LayerNames, cfg: &DecoderConfig, layer: usize, x: &mut [f32]) {
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let n = x.len() / d;
    let load = |role: &str, len: usize| names.get(role).map(|name| load_vector(ck, name, len).unwrap());
    let ffn = tensor_data(ck, &names["ffn_gate"]).unwrap().info().shape.iter().product::<usize>() / d;
    let linear = |w: &[f32], b: Option<&Vec<f32>>, input: &[f32], rows: usize| -> Vec<f32> {
        let cols = input.len();
        let dot = |r: usize| (0..cols).map(|c| w[r * cols + c] * input[c]).sum::<f32>();
        (0..rows).map(|r| dot(r) + b.map_or(0.0, |b| b[r])).collect()
    };
    let rms = |v: &[f32], w: &[f32]| -> Vec<f32> {
        let s = 1.0 / (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32 + cfg.eps).sqrt();
        v.iter().zip(w).map(|(a, w)| a * s * (w + cfg.norm_offset)).collect()
    };
    let sliding = cfg.layer_sliding.get(layer).copied().unwrap_or(false);
    // The rotary table of position p: the sliding layers' own (Gemma 3), else the long one
    // from `rope_long_from` on (LongRoPE), else the global one; the attention factor on all
    // but the local table.
    let table = |p: usize| -> (&[f32], f32) {
        if sliding && !cfg.rope_local_inv_freq.is_empty() {
            (&cfg.rope_local_inv_freq, 1.0)
        } else if !cfg.rope_long_inv_freq.is_empty() && p >= cfg.rope_long_from {
            (&cfg.rope_long_inv_freq, cfg.rope_attention_factor)
        } else {
            (&cfg.rope_inv_freq, cfg.rope_attention_factor)
        }
    };
    let (post_attn, post_ffn) = (load("attn_post_norm", d), load("ffn_post_norm", d));
    let (wq, wk) = (load("attn_q", qd * d).unwrap(), load("attn_k", kvd * d).unwrap());
    let (wv, wo) = (load("attn_v", kvd * d).unwrap(), load("attn_output", d * qd).unwrap());
    let (bq, bk, bv) = (load("attn_q_bias", qd), load("attn_k_bias", kvd), load("attn_v_bias", kvd));
    let (qn, kn) = (load("attn_q_norm", hd), load("attn_k_norm", hd));
    let (an, fnorm) = (load("attn_norm", d).unwrap(), load("ffn_norm", d).unwrap());
    let (wg, wu) = (load("ffn_gate", ffn * d).unwrap(), load("ffn_up", ffn * d).unwrap());
    let wdn = load("ffn_down", d * ffn).unwrap();
    // Rotate-half over the first 2 * half dims only (partial rotary: apply_rotary_pos_emb's
    // `q_rot`, `q_pass`).
    let rope = |h: &mut [f32], p: usize| {
        let (inv_freq, factor) = table(p);
        let half = inv_freq.len();
        for i in 0..half {
            let a = p as f32 * inv_freq[i];
            let (c, s) = ((a as f64).cos() as f32 * factor, (a as f64).sin() as f32 * factor);
            let (x0, x1) = (h[i], h[i + half]);
            h[i] = x0 * c - x1 * s;
            h[i + half] = x1 * c + x0 * s;
        }
    };
    let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..n {
        let h = rms(&x[t * d..(t + 1) * d], &an);
        let mut q = linear(&wq, bq.as_ref(), &h, qd); // (n_heads, head_dim)
        let mut k = linear(&wk, bk.as_ref(), &h, kvd); // (n_kv_heads, head_dim)
        for (v, norm) in [(&mut q, &qn), (&mut k, &kn)] {
            for head in v.chunks_exact_mut(hd) {
                if let Some(w) = norm {
                    let normed = rms(head, w);
                    head.copy_from_slice(&normed);
                }
                rope(head, t);
            }
        }
        qs.push(q);
        ks.push(k);
        vs.push(linear(&wv, bv.as_ref(), &h, kvd));
    }
    let group = cfg.n_heads / cfg.n_kv_heads;
    for t in 0..n {
        let mut att = vec![0f32; qd];
        for h in 0..cfg.n_heads {
            let kvh = h / group;
            let q = &qs[t][h * hd..(h + 1) * hd];
            let first = if sliding { (t + 1).saturating_sub(cfg.sliding_window) } else { 0 };
            let scores: Vec<f32> = (first..=t)
                .map(|j| q.iter().zip(&ks[j][kvh * hd..]).map(|(a, b)| a * b).sum::<f32>() * cfg.attn_scale)
                .collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for (j, w) in (first..=t).zip(&e) {
                for i in 0..hd {
                    att[h * hd + i] += w / z * vs[j][kvh * hd + i];
                }
            }
        }
        let mut o = linear(&wo, None, &att, d);
        if let Some(w) = &post_attn {
            o = rms(&o, w);
        }
        let row = &mut x[t * d..(t + 1) * d];
        row.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = rms(row, &fnorm);
        let (g, u) = (linear(&wg, None, &h, ffn), linear(&wu, None, &h, ffn));
        let act = |g: f32| {
            if cfg.gelu_tanh {
                0.5 * g * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh())
            } else {
                g / (1.0 + (-g).exp())
            }
        };
        let mid: Vec<f32> = g.iter().zip(&u).map(|(&g, u)| act(g) * u).collect();
        let mut down = linear(&wdn, None, &mid, d);
        if let Some(w) = &post_ffn {
            down = rms(&down, w);
        }
        row.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }
}

/// Checks `span` (model layers `first..`) against the scalar reference layers over 7 positions
/// run as a prefill of 5 and two decode steps, with 1 and 3 threads: f32 both sides, only the
/// summation order differs, so within 1e-4 of the values' scale. `what` names the case.
fn assert_span_equals_the_reference(ck: &Checkpoint, cfg: &DecoderConfig, names: &[LayerNames], first: usize, seed: u64, what: &str) {
    let input = TestRng::new(seed).gaussians(7 * TINY_HIDDEN);
    let mut want = input.clone();
    for (i, layer) in names.iter().enumerate().skip(first) {
        reference_layer(ck, layer, cfg, i, &mut want);
    }
    let span = DecoderSpan::load(ck, cfg.clone(), first, names[first..].to_vec()).expect("the tiny span loads");
    for threads in [1, 3] {
        let pool = ThreadPool::new(threads);
        let mut cache = span.new_cache(64);
        let mut got = Vec::new();
        for rows in [0..5, 5..6, 6..7] {
            let mut hidden = input[rows.start * TINY_HIDDEN..rows.end * TINY_HIDDEN].to_vec();
            span.forward(&pool, &mut hidden, &mut [SeqChunk { cache: &mut cache, n_tokens: rows.len() }]).unwrap();
            got.extend(hidden);
        }
        let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(max_err <= 1e-4 * scale, "{what}, {threads} threads: max error {max_err} (values up to {scale})");
    }
}

#[test]
fn qwen_layers_equal_the_scalar_reference() {
    // Skipping Qwen3's k norm gives an error of ~0.25 of the values' scale.
    for (dir, head_dim, optional) in [("tiny-qwen2", 16, "attn_q_bias"), ("tiny-qwen3-tied", 32, "attn_q_norm")] {
        let ck = open_tiny(dir);
        let names: Vec<LayerNames> = (0..TINY_LAYERS).map(|i| qwen_names(&ck, i)).collect();
        assert!(names[0].contains_key(optional), "{dir} has {optional}");
        assert_span_equals_the_reference(&ck, &tiny_qwen_config(head_dim), &names, 0, 3, dir);
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // one range of layers, not a list of indices
fn qwen_sub_ranges_equal_the_whole_span_bit_for_bit() {
    for (dir, head_dim) in [("tiny-qwen2", 16), ("tiny-qwen3-tied", 32)] {
        let ck = open_tiny(dir);
        let names: Vec<LayerNames> = (0..TINY_LAYERS).map(|i| qwen_names(&ck, i)).collect();
        for quantize in [None, Some(GgmlType::Q8_0)] {
            let cfg = DecoderConfig { quantize, ..tiny_qwen_config(head_dim) };
            let span = DecoderSpan::load(&ck, cfg, 0, names.clone()).unwrap();
            let pool = ThreadPool::new(3);
            let whole = through_ranges(&span, &pool, &[0..3]);
            assert_eq!(through_ranges(&span, &pool, &[0..1, 1..3]), whole, "{dir}, {quantize:?}");
        }
    }
}

#[test]
fn a_bias_of_the_wrong_length_is_refused() {
    let ck = open_tiny("tiny-qwen2");
    let mut names = qwen_names(&ck, 0);
    // The k bias (32 values) named as the q bias (64 expected).
    names.insert("attn_q_bias".into(), "model.layers.0.self_attn.k_proj.bias".into());
    let err = DecoderSpan::load(&ck, tiny_qwen_config(16), 0, vec![names]).err().expect("refused");
    assert!(err.to_string().contains("expected 64 values"), "{err}");
}

/// Settings of the tiny Gemma 3 checkpoint (tests/fixtures/tiny_gemma3.py), with a window of 4
/// so the 7 test positions pass it: layers 0 and 1 slide with the local base 1e4, layer 2 is
/// global with base 1e6 and linear factor 2.
fn tiny_gemma3_config() -> DecoderConfig {
    let head_dim = 32;
    let inv = |base: f32, factor: f32| -> Vec<f32> {
        (0..head_dim / 2).map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32) / factor).collect()
    };
    DecoderConfig {
        head_dim,
        eps: 1e-6,
        rope_inv_freq: inv(1e6, 2.0),
        attn_scale: 1.0 / 24f32.sqrt(),
        norm_offset: 1.0,
        gelu_tanh: true,
        layer_sliding: vec![true, true, false],
        sliding_window: 4,
        rope_local_inv_freq: inv(1e4, 1.0),
        ..tiny_config(None)
    }
}

fn gemma3_names(i: usize) -> LayerNames {
    [
        ("attn_norm", "input_layernorm.weight"),
        ("attn_q", "self_attn.q_proj.weight"),
        ("attn_k", "self_attn.k_proj.weight"),
        ("attn_v", "self_attn.v_proj.weight"),
        ("attn_output", "self_attn.o_proj.weight"),
        ("attn_q_norm", "self_attn.q_norm.weight"),
        ("attn_k_norm", "self_attn.k_norm.weight"),
        ("attn_post_norm", "post_attention_layernorm.weight"),
        ("ffn_norm", "pre_feedforward_layernorm.weight"),
        ("ffn_post_norm", "post_feedforward_layernorm.weight"),
        ("ffn_gate", "mlp.gate_proj.weight"),
        ("ffn_up", "mlp.up_proj.weight"),
        ("ffn_down", "mlp.down_proj.weight"),
    ]
    .iter()
    .map(|(role, name)| (role.to_string(), format!("model.layers.{i}.{name}")))
    .collect()
}

#[test]
fn gemma3_layers_equal_the_scalar_reference() {
    let ck = open_tiny("tiny-gemma3");
    let names: Vec<LayerNames> = (0..TINY_LAYERS).map(gemma3_names).collect();
    // Spans starting at layer 0 and at layer 1 (whose first layer must still slide).
    for first in [0, 1] {
        assert_span_equals_the_reference(&ck, &tiny_gemma3_config(), &names, first, 5, &format!("from layer {first}"));
    }
}

/// Settings of the tiny Phi-4-mini-like checkpoint (tests/fixtures/tiny_phi3.py: head_dim 16,
/// 0.75 of it rotating), with the long table from position 4 and a window of 3 on every layer
/// so the 7 test positions cross both; the frequencies are made up (not the fixture's): this
/// checks the layer against the scalar reference, not the config reader.
fn tiny_phi3_config() -> DecoderConfig {
    let pairs = 6; // 12 of 16 dims rotate
    let inv = |base: f32, factor: f32| -> Vec<f32> {
        (0..pairs).map(|i| 1.0 / base.powf(2.0 * i as f32 / (2 * pairs) as f32) / factor).collect()
    };
    DecoderConfig {
        rope_inv_freq: inv(1e4, 1.5),
        rope_long_inv_freq: inv(1e4, 7.0),
        rope_long_from: 4,
        rope_attention_factor: 1.1,
        layer_sliding: vec![true; TINY_LAYERS],
        sliding_window: 3,
        ..tiny_config(None)
    }
}

/// Role -> reference of one Phi-3 layer: q/k/v and gate/up as row ranges of the fused tensors.
fn phi3_names(i: usize) -> LayerNames {
    let p = format!("model.layers.{i}.");
    let (qkv, gate_up) = (format!("{p}self_attn.qkv_proj.weight"), format!("{p}mlp.gate_up_proj.weight"));
    [
        ("attn_norm", format!("{p}input_layernorm.weight")),
        ("attn_q", format!("{qkv}[0:64]")),
        ("attn_k", format!("{qkv}[64:96]")),
        ("attn_v", format!("{qkv}[96:128]")),
        ("attn_output", format!("{p}self_attn.o_proj.weight")),
        ("ffn_norm", format!("{p}post_attention_layernorm.weight")),
        ("ffn_gate", format!("{gate_up}[0:128]")),
        ("ffn_up", format!("{gate_up}[128:256]")),
        ("ffn_down", format!("{p}mlp.down_proj.weight")),
    ]
    .into_iter()
    .map(|(role, name)| (role.to_string(), name))
    .collect()
}

#[test]
fn phi3_layers_equal_the_scalar_reference() {
    // The 5-position prefill crosses the long table's first position (4) and the window (3).
    let names: Vec<LayerNames> = (0..TINY_LAYERS).map(phi3_names).collect();
    assert_span_equals_the_reference(&open_tiny("tiny-phi3-mini"), &tiny_phi3_config(), &names, 0, 9, "phi3");
}

/// The tiny Gemma 3 span of layers `first .. first + n` (window 4: layers 0 and 1 slide).
pub(crate) fn tiny_gemma3(first: usize, n: usize) -> DecoderSpan {
    let names: Vec<LayerNames> = (first..first + n).map(gemma3_names).collect();
    DecoderSpan::load(&open_tiny("tiny-gemma3"), tiny_gemma3_config(), first, names).expect("the tiny Gemma span loads")
}

/// Step sizes of a 48-position sequence (12 windows of 4): prefill chunks shorter and longer
/// than the window, decode runs longer than the slack, a chunk right after a drop.
const LONG_STEPS: [usize; 21] = [5, 1, 1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 9, 3, 1, 1, 1, 1, 1, 8];

/// Runs `LONG_STEPS` (then decode steps up to `total` positions) of one session through
/// `span` with `cache`; returns each step's output.
fn run_steps(span: &DecoderSpan, pool: &ThreadPool, cache: &mut KvCache, input: &[f32], total: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut pos = 0;
    for n in LONG_STEPS.iter().copied().chain(std::iter::repeat(1)) {
        if pos >= total {
            break;
        }
        let mut hidden = input[pos * TINY_HIDDEN..(pos + n) * TINY_HIDDEN].to_vec();
        span.forward(pool, &mut hidden, &mut [SeqChunk { cache, n_tokens: n }]).unwrap();
        out.push(hidden);
        pos += n;
    }
    out
}

#[test]
fn sliding_layers_with_a_bounded_cache_equal_the_full_cache_bit_for_bit() {
    let w = tiny_gemma3_config().sliding_window;
    let total = 12 * w;
    assert_eq!(LONG_STEPS.iter().sum::<usize>(), total);
    let input = TestRng::new(11).gaussians(total * TINY_HIDDEN);
    let names: Vec<LayerNames> = (0..TINY_LAYERS).map(gemma3_names).collect();
    let ck = open_tiny("tiny-gemma3");
    let mut want = input.clone();
    for (i, layer) in names.iter().enumerate() {
        reference_layer(&ck, layer, &tiny_gemma3_config(), i, &mut want);
    }
    let span = tiny_gemma3(0, TINY_LAYERS);
    for threads in [1, 3] {
        let pool = ThreadPool::new(threads);
        let mut full = span.new_cache(256);
        full.set_slack(usize::MAX / 2);
        let mut bounded = span.new_cache(256);
        let want_steps = run_steps(&span, &pool, &mut full, &input, total);
        assert_eq!(run_steps(&span, &pool, &mut bounded, &input, total), want_steps, "{threads} threads");
        // And both equal the scalar reference layer over the whole sequence.
        let got: Vec<f32> = want_steps.concat();
        let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(max_err <= 1e-4 * scale, "{threads} threads: max error {max_err} (values up to {scale})");
        // The full cache held everything; the bounded one, every position of the global layer
        // and at most `w - 1 + slack + 8` (the last step) of each sliding layer.
        let layer_position = 2 * span.config().n_kv_heads * span.config().head_dim * 4;
        assert_eq!(full.held_bytes(), 3 * total * layer_position);
        let bound = KvCache::sliding_rows_bound(w, 8);
        assert!(bounded.held_bytes() <= (total + 2 * bound) * layer_position, "{}", bounded.held_bytes());
    }
}

#[test]
fn row_ranges_of_a_fused_tensor_load_as_its_rows() {
    let ck = open_tiny("tiny-phi3-mini");
    let qkv = "model.layers.1.self_attn.qkv_proj.weight";
    // Whole-tensor matrices in each type: a row range must hold exactly those rows.
    for quantize in [None, Some(GgmlType::Q8_0), Some(GgmlType::Q4_0)] {
        let take = |reference: &str| {
            let names = LayerNames::from([("m".to_string(), reference.to_string())]);
            LayerTensors::new(&ck, names, quantize).matrix("m").unwrap()
        };
        let whole = take(qkv);
        for (start, end) in [(0, 64), (64, 96), (96, 128), (17, 18)] {
            let part = take(&format!("{qkv}[{start}:{end}]"));
            assert_eq!((part.rows(), part.cols(), part.ty()), (end - start, 64, whole.ty()));
            let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
            for r in 0..end - start {
                part.dequantize_row(r, &mut a).unwrap();
                whole.dequantize_row(start + r, &mut b).unwrap();
                assert_eq!(a, b, "{quantize:?}, rows {start}..{end}, row {r}");
            }
        }
    }
    // Out of range, or naming no tensor: errors that say so.
    let names = LayerNames::from([("m".to_string(), format!("{qkv}[96:129]"))]);
    let err = LayerTensors::new(&ck, names, None).matrix("m").err().expect("rows past the end are refused");
    assert!(err.to_string().contains("outside its 128 rows"), "{err}");
    let names = LayerNames::from([("m".to_string(), "model.layers.1.self_attn.qkv[0:4]".to_string())]);
    assert!(matches!(LayerTensors::new(&ck, names, None).matrix("m"), Err(crate::Error::MissingTensor { .. })));
}

#[test]
fn sliding_layers_hold_a_bounded_number_of_positions_after_ten_windows() {
    let span = tiny_gemma3(0, 2); // both sliding
    let w = span.config().sliding_window;
    let pool = ThreadPool::new(2);
    let mut cache = span.new_cache(256);
    let layer_position = 2 * span.config().n_kv_heads * span.config().head_dim * 4;
    let total = 40 * w;
    let input = TestRng::new(2).gaussians(total * TINY_HIDDEN);
    let mut most_allocated = 0;
    for p in 0..total {
        let mut hidden = input[p * TINY_HIDDEN..(p + 1) * TINY_HIDDEN].to_vec();
        span.forward(&pool, &mut hidden, &mut [SeqChunk { cache: &mut cache, n_tokens: 1 }]).unwrap();
        let rows = cache.held_bytes() / (2 * layer_position);
        assert!(rows <= KvCache::sliding_rows_bound(w, 1).min(p + 1), "position {p}: {rows} rows");
        most_allocated = most_allocated.max(cache.nbytes());
    }
    // Allocated: one buffer of `w + slack` rows per layer for keys and values, from the start.
    assert_eq!(most_allocated, 2 * KvCache::sliding_rows_bound(w, 1) * layer_position);
    assert_eq!(cache.nbytes(), most_allocated);
    assert_eq!(cache.len(), total);
}

#[test]
fn a_retried_step_after_truncation_gives_the_same_output_and_old_rewinds_are_refused() {
    let span = tiny_gemma3(0, TINY_LAYERS);
    let w = span.config().sliding_window;
    let total = 12 * w;
    let input = TestRng::new(4).gaussians(total * TINY_HIDDEN);
    let pool = ThreadPool::new(2);
    let mut reference = span.new_cache(256);
    let want = run_steps(&span, &pool, &mut reference, &input, total);
    // Every step run, then retried from its start: same bits, and the session goes on.
    let mut cache = span.new_cache(256);
    let mut pos = 0;
    for (n, want) in LONG_STEPS.iter().zip(&want) {
        let step = |cache: &mut KvCache| {
            let mut hidden = input[pos * TINY_HIDDEN..(pos + n) * TINY_HIDDEN].to_vec();
            span.forward(&pool, &mut hidden, &mut [SeqChunk { cache, n_tokens: *n }]).unwrap();
            hidden
        };
        assert_eq!(&step(&mut cache), want, "step at {pos}");
        cache.truncate(pos).unwrap();
        assert_eq!(cache.len(), pos);
        assert_eq!(&step(&mut cache), want, "retry at {pos}");
        pos += n;
    }
    // Back to 2 after 12 windows: the sliding layers dropped positions 0 and 1; refused, unchanged.
    let before = (cache.len(), cache.held_bytes());
    let err = cache.truncate(2).unwrap_err();
    assert!(err.to_string().contains("cannot rewind"), "{err}");
    assert_eq!((cache.len(), cache.held_bytes()), before);
    // Back to 0 is starting over: the same outputs again.
    cache.truncate(0).unwrap();
    assert_eq!(cache.held_bytes(), 0);
    assert_eq!(run_steps(&span, &pool, &mut cache, &input, total), want);
    // A cache of only the global layer rewinds anywhere.
    let mut global = span.new_cache_for(2..3, 256);
    let mut hidden = input[..total * TINY_HIDDEN].to_vec();
    span.forward_layers(&pool, &mut hidden, &mut [SeqChunk { cache: &mut global, n_tokens: total }], 2..3).unwrap();
    global.truncate(0).unwrap();
}

#[test]
fn a_cache_made_for_other_layers_is_refused() {
    let span = tiny_gemma3(0, TINY_LAYERS);
    let pool = ThreadPool::new(1);
    // Layers 1..3 (sliding, global) run with a cache made for 0..2 (sliding, sliding).
    let mut cache = span.new_cache_for(0..2, 16);
    let mut hidden = vec![0.5f32; TINY_HIDDEN];
    let err = span.forward_layers(&pool, &mut hidden, &mut [SeqChunk { cache: &mut cache, n_tokens: 1 }], 1..3).unwrap_err();
    assert!(err.to_string().contains("sliding-window layers"), "{err}");
    assert_eq!(cache.len(), 0);
}

/// Gemma 4 E2B's layout in miniature: sliding layers of one 16-wide KV head, global ones of
/// one 32-wide head, the last three sharing layer 1 (sliding) and 2 (global), per-layer
/// inputs of 8.
fn kv_sharing_config() -> DecoderConfig {
    DecoderConfig {
        n_kv_heads: 1,
        head_dim: 16,
        global_head_dim: 32,
        global_n_kv_heads: 1,
        rope_inv_freq: vec![0.5; 16],
        rope_local_inv_freq: vec![0.5; 8],
        layer_sliding: vec![true, true, false, true, true, false],
        sliding_window: 8,
        kv_source: vec![None, None, None, Some(1), Some(1), Some(2)],
        per_layer_input: 8,
        n_layers: 6,
        ..tiny_config(None)
    }
}

#[test]
fn rows_between_spans_carry_per_layer_inputs_and_the_shared_keys_and_values_crossing() {
    let cfg = kv_sharing_config();
    let (sliding_kv, global_kv) = (2 * 16, 2 * 32);
    let widths: Vec<usize> = (0..=6).map(|b| cfg.row_width(b)).collect();
    let p = 8;
    assert_eq!(
        widths,
        [
            TINY_HIDDEN + 6 * p,
            TINY_HIDDEN + 5 * p,
            TINY_HIDDEN + 4 * p + sliding_kv, // layer 1 ran; 3 and 4 share it
            TINY_HIDDEN + 3 * p + sliding_kv + global_kv,
            TINY_HIDDEN + 2 * p + sliding_kv + global_kv,
            TINY_HIDDEN + p + global_kv, // only layer 5 is left, sharing layer 2
            TINY_HIDDEN,
        ]
    );
}

#[test]
fn a_kv_source_must_be_an_earlier_layer_of_the_same_type_with_its_own() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama/model.safetensors");
    let checkpoint = Checkpoint::open(&[path]).expect("the tiny checkpoint opens");
    let bad = |kv_source: Vec<Option<usize>>| DecoderConfig { kv_source, ..kv_sharing_config() };
    for kv_source in [
        vec![None, None, None, Some(2), Some(1), Some(2)], // a sliding layer sharing a global one
        vec![None, None, None, Some(4), Some(1), Some(2)], // a later layer
        vec![None, None, None, Some(1), Some(3), Some(2)], // a layer that shares itself
        vec![None, Some(1)],                               // not one per layer
    ] {
        let err = DecoderSpan::load(&checkpoint, bad(kv_source.clone()), 0, Vec::new()).err().expect("refused");
        assert!(matches!(err, crate::Error::InvalidArgument(_)), "{kv_source:?}: {err}");
    }
    DecoderSpan::load(&checkpoint, kv_sharing_config(), 0, Vec::new()).expect("the right layout loads");
}
