"""The Qwen2 and Qwen3 span forward (the Llama layer with q/k/v biases, q/k norms and its own
head_dim) against transformers on tiny random f32 checkpoints (tests/fixtures/tiny_qwen.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from meshpy.generation import Model
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from tests import family_checks as checks
from tests.conftest import DATA
from tests.fixtures import llama_gguf, tiny_qwen
from tests.fixtures.llama_gguf import gguf_logits

VARIANTS = list(tiny_qwen.VARIANTS)


def test_config_names_the_optional_tensors() -> None:
    qwen2 = read_config(open_model_source(DATA / "tiny-qwen2"))
    assert qwen2.architecture == "Qwen2ForCausalLM"
    assert qwen2.layer_names(1)["attn_q_bias"] == "model.layers.1.self_attn.q_proj.bias"
    assert {"attn_k_bias", "attn_v_bias"} <= set(qwen2.layer_names(0))
    assert "attn_q_norm" not in qwen2.layer_names(0)
    assert qwen2.output_name == "lm_head.weight"
    assert not qwen2.rope_interleaved
    # YaRN, factor 4: transformers' attention factor 0.1 ln 4 + 1 on cos/sin.
    assert qwen2.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1.0)

    qwen3 = read_config(open_model_source(DATA / "tiny-qwen3-tied"))
    assert (qwen3.hidden, qwen3.n_heads, qwen3.head_dim) == (64, 4, 32)
    assert qwen3.attn_scale == pytest.approx(32**-0.5)
    assert qwen3.layer_names(2)["attn_k_norm"] == "model.layers.2.self_attn.k_norm.weight"
    assert "attn_q_bias" not in qwen3.layer_names(0)
    assert qwen3.output_name == "model.embed_tokens.weight"
    np.testing.assert_allclose(qwen3.rope_inv_freq[1], 1e6 ** (-2 / 32), rtol=1e-6)


def test_sliding_window_layers_from_max_window_layers() -> None:
    """Qwen2Config: with use_sliding_window, layers from max_window_layers on slide."""
    cfg = read_config(open_model_source(DATA / "tiny-qwen2-swa"))
    assert cfg.layer_sliding == (False, True, True)
    assert cfg.sliding_window == 16
    np.testing.assert_array_equal(cfg.rope_local_inv_freq, cfg.rope_inv_freq)
    # Without use_sliding_window the window is ignored, as Qwen2Config does.
    assert read_config(open_model_source(DATA / "tiny-qwen2")).layer_sliding == ()


def test_the_window_matters(tmp_path: Path) -> None:
    """Dropping the window changes the logits from position 16 on, and only there."""
    model_dir = checks.with_config(DATA / "tiny-qwen2-swa", tmp_path / "no-window", use_sliding_window=False, layer_types=None)
    windowed = Model.load(DATA / "tiny-qwen2-swa", threads=2).logits_all(tiny_qwen.PREFILL_IDS)
    full = Model.load(model_dir, threads=2).logits_all(tiny_qwen.PREFILL_IDS)
    np.testing.assert_allclose(windowed[:16], full[:16], atol=1e-5, rtol=0)
    assert np.abs(windowed[16:] - full[16:]).max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    checks.check_stored_reference(DATA / variant)


@checks.live_transformers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_qwen.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    checks.check_live_transformers(model_dir, tiny_qwen.reference_logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_spans_give_the_same_greedy_tokens(variant: str) -> None:
    checks.check_spans_give_the_same_tokens(DATA / variant, layers={2: [range(0, 2), range(2, 3)]})


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("quant", "max_rel_rms"), [("Q8_0", 0.06), ("Q4_0", 0.5)])
def test_quantize_on_load_stays_close(variant: str, quant: str, max_rel_rms: float) -> None:
    """Float matrices converted at load: relative RMS logit error, with the tiny Llama's bounds
    (tests/test_llama_forward.py; an unconverted or mis-converted matrix gives ~1.4). Biases
    and norms stay f32. Measured: Q8_0 0.020 / 0.025, Q4_0 0.30 / 0.37 (Qwen2 / Qwen3)."""
    checks.check_quantize_on_load(DATA / variant, quant, max_rel_rms)


# HF name pieces -> llama.cpp's (convert_hf_to_gguf.py's tensor map for qwen2 / qwen3): the
# Llama layer's, with q/k/v biases and q/k norms.
GGUF_NAMES = {
    **llama_gguf.GGUF_NAMES,
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def write_gguf(model_dir: Path, out: Path, vocab: bool = False) -> Path:
    """The HF checkpoint as llama.cpp's converter writes it for qwen2 / qwen3: `blk.N.*` names,
    q/k rows NOT permuted (llama.cpp runs these archs with NeoX, rotate-half RoPE), YaRN as
    type, factor and original context, f32. `vocab` adds a placeholder vocabulary so
    llama.cpp will load the file."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(out), arch)
    llama_gguf.add_hf_shape(w, cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    llama_gguf.add_rope_scaling(w, cfg["rope_parameters"])
    if vocab:
        llama_gguf.add_placeholder_vocab(w, cfg["vocab_size"])
    for name, t in sorted(load_file(model_dir / "model.safetensors").items()):
        w.add_tensor(llama_gguf.gguf_name(name, GGUF_NAMES), np.ascontiguousarray(t, dtype=np.float32))
    llama_gguf.finish(w)
    return out


def _without_window(tmp_path: Path, variant: str) -> Path:
    """The variant with its sliding window dropped: llama.cpp's qwen2 / qwen3 GGUFs carry none."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(DATA / variant, hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(use_sliding_window=False, layer_types=None)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    return hf_dir


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_layout_matches_the_hf_layout(tmp_path: Path, variant: str) -> None:
    """The GGUF path (qwen2 / qwen3 metadata keys, `blk.N.*` names, rotate-half RoPE, YaRN keys)
    gives the HF path's logits, and transformers' where the window is not dropped: for
    tiny-qwen2, YaRN x4 over an original context of 64, as llama.cpp applies it from the GGUF,
    equals transformers' (measured: 0 from the HF path, 5e-6 from transformers). Embedding,
    spans and head run directly: the tiny GGUF carries no tokenizer."""
    hf_dir = _without_window(tmp_path, variant)
    path = write_gguf(hf_dir, tmp_path / f"{variant}.gguf")
    config = read_config(open_model_source(path))
    assert config.architecture == tiny_qwen.VARIANTS[variant][0].lower()
    assert not config.rope_interleaved
    got = gguf_logits(path)
    checks.assert_logits_close(got, checks.prefill_and_decode(hf_dir), atol=1e-5)
    if not json.loads((DATA / variant / "config.json").read_text()).get("use_sliding_window"):
        checks.assert_logits_close(got, checks.stored_reference(DATA / variant))


def test_gguf_yarn_config_equals_the_hf_config(tmp_path: Path) -> None:
    """The converter's YaRN keys (type, factor, original context) give the HF path's table and
    attention factor: llama.cpp's YaRN and transformers' agree here (rope.yarn_extrapolation)."""
    hf = read_config(open_model_source(DATA / "tiny-qwen2"))
    gg = read_config(open_model_source(write_gguf(DATA / "tiny-qwen2", tmp_path / "yarn.gguf")))
    np.testing.assert_allclose(gg.rope_inv_freq, hf.rope_inv_freq, rtol=1e-6, atol=0)
    assert gg.rope_attention_factor == pytest.approx(hf.rope_attention_factor, rel=1e-7)
    assert gg.rope_attention_factor == pytest.approx(1 + 0.1 * np.log(4.0))


def test_gguf_yarn_keys_llama_cpp_ignores_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """beta_fast / beta_slow, an explicit YaRN attention factor and the log multiplier, which
    the converter writes from an HF config but llama.cpp never reads for qwen2 (checked live
    with llama-cpp-python 0.3.36: the logits do not move), change nothing here either, and
    say so in a warning."""
    import gguf

    plain = read_config(open_model_source(write_gguf(DATA / "tiny-qwen2", tmp_path / "plain.gguf")))
    path = tmp_path / "keys.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_vocab_size(4)
    for key, value in [("embedding_length", 64), ("block_count", 1), ("attention.head_count", 4)]:
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_rope_freq_base(1e6)
    llama_gguf.add_rope_scaling(w, json.loads((DATA / "tiny-qwen2" / "config.json").read_text())["rope_parameters"])
    w.add_rope_scaling_yarn_beta_fast(8.0)
    w.add_rope_scaling_yarn_beta_slow(2.0)
    w.add_rope_scaling_yarn_attn_factor(1.0)
    w.add_rope_scaling_yarn_log_mul(0.1)
    w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    llama_gguf.finish(w)
    with caplog.at_level("WARNING", logger="meshpy.models.llama"):
        config = read_config(open_model_source(path))
    np.testing.assert_array_equal(config.rope_inv_freq, plain.rope_inv_freq)
    assert config.rope_attention_factor == plain.rope_attention_factor
    for key in ("yarn_beta_fast", "yarn_beta_slow", "yarn_attn_factor", "yarn_log_multiplier"):
        assert f"qwen2.rope.scaling.{key}" in caplog.text
    assert "as llama.cpp does" in caplog.text


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.parametrize("variant", ["tiny-qwen2", "tiny-qwen3-tied"])
def test_gguf_logits_equal_llama_cpp(tmp_path: Path, variant: str) -> None:
    """llama.cpp runs the same GGUF (f32 KV cache, token ids fed directly) to the same logits:
    an independent check of the qwen2 / qwen3 names, biases, q/k norms, NeoX RoPE and, for
    tiny-qwen2, YaRN (ramp, factor, original context, cos/sin factor 1 + 0.1 ln 4) from the
    GGUF keys. Measured: 4e-6. Without the YaRN keys tiny-qwen2's logits move by ~4."""
    path = write_gguf(DATA / variant, tmp_path / "m.gguf", vocab=True)
    theirs = llama_gguf.llama_cpp_logits(path, tiny_qwen.PREFILL_IDS + tiny_qwen.DECODE_IDS)
    ours = np.concatenate(gguf_logits(path))
    np.testing.assert_allclose(ours, theirs, atol=checks.LOGIT_ATOL, rtol=0)
    if variant == "tiny-qwen2":
        unscaled_dir = checks.with_config(DATA / variant, tmp_path / "unscaled", rope_parameters={"rope_theta": 1e6})
        unscaled = np.concatenate(gguf_logits(write_gguf(unscaled_dir, tmp_path / "unscaled.gguf")))
        assert np.abs(unscaled - theirs).max() > 100 * checks.LOGIT_ATOL


def test_a_tensor_no_role_takes_is_refused(tmp_path: Path) -> None:
    """An o_proj bias (Qwen3 with attention_bias) is not in this layer: refused, named."""
    checks.check_an_unused_tensor_is_refused(
        DATA / "tiny-qwen3-tied", tmp_path / "qwen3-obias", "model.layers.1.self_attn.o_proj.bias", (64,)
    )


@pytest.mark.timeout(120)
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """Qwen3 (q/k norms, head_dim != hidden / heads, tied head) split over two in-process
    workers on 127.0.0.1: f32 hidden states on the wire, so the tokens equal exactly."""
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-qwen3-tied", ["0-1", "2-2"], tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_checkpoint_equals_its_values_in_f32(tmp_path: Path, variant: str) -> None:
    """bf16 weights (biases and q/k norms included, read as f32 vectors) give the logits of
    the same values widened to f32, to 1e-4 (measured: bit-equal); Q8_0 on load from bf16
    stays within the f32 checkpoint's Q8_0 bound (measured ~0.02 relative RMS). Real Qwen
    checkpoints ship bf16."""
    checks.check_bf16_equals_its_values_in_f32(DATA / variant, tmp_path, q8_max_rel_rms=0.06)
