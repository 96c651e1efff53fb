"""The Phi-3 family's span forward (the Llama layer with fused qkv / gate_up tensors split by
row ranges, partial rotary, LongRoPE, an all-layer sliding window) against transformers on tiny
random f32 checkpoints (tests/fixtures/tiny_phi3.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from meshpy.errors import CheckpointFormatError
from meshpy.generation import Model
from meshpy.mesh.placement import layer_nbytes
from meshpy.models.config import read_config, split_tensor_ref
from meshpy.models.source import open_model_source
from tests import family_checks as checks
from tests.conftest import DATA
from tests.family_checks import LOGIT_ATOL
from tests.fixtures import llama_gguf, tiny_phi3
from tests.fixtures.llama_gguf import gguf_logits

VARIANTS = list(tiny_phi3.VARIANTS)
MINI = DATA / "tiny-phi3-mini"


def _with_config(tmp_path: Path, src: Path = MINI, **changes: object) -> Path:
    """A copy of `src` with `changes` in its config.json, None leaving a key out."""
    return checks.with_config(src, tmp_path / src.name, drop_none=True, **changes)


def test_config_splits_the_fused_tensors_by_rows() -> None:
    cfg = read_config(open_model_source(DATA / "tiny-phi3"))
    assert cfg.architecture == "Phi3ForCausalLM"
    names = cfg.layer_names(2)
    qkv = "model.layers.2.self_attn.qkv_proj.weight"
    # q: 4 heads x 16, k and v: 2 heads x 16 each (Phi3Attention.forward's slices).
    assert (names["attn_q"], names["attn_k"], names["attn_v"]) == (f"{qkv}[0:64]", f"{qkv}[64:96]", f"{qkv}[96:128]")
    # gate first, then up (Phi3MLP.forward: `gate, up_states = up_states.chunk(2, dim=-1)`).
    gate_up = "model.layers.2.mlp.gate_up_proj.weight"
    assert (names["ffn_gate"], names["ffn_up"]) == (f"{gate_up}[0:128]", f"{gate_up}[128:256]")
    assert split_tensor_ref(names["attn_k"]) == (qkv, range(64, 96))
    assert split_tensor_ref(names["attn_output"]) == ("model.layers.2.self_attn.o_proj.weight", None)
    assert cfg.output_name == "lm_head.weight"
    assert not cfg.rope_interleaved
    assert len(cfg.rope_inv_freq) == 8 and cfg.rope_long_inv_freq is None
    np.testing.assert_allclose(cfg.rope_inv_freq[1], 250000.0 ** (-2 / 16), rtol=1e-6)
    assert (cfg.layer_sliding, cfg.rope_attention_factor) == ((), 1.0)


def test_config_reads_partial_rotary_longrope_and_the_window() -> None:
    cfg = read_config(open_model_source(MINI))
    # 0.75 of a 16-wide head rotates: 12 dims, 6 pairs.
    assert len(cfg.rope_inv_freq) == 6
    assert cfg.rope_long_inv_freq is not None and len(cfg.rope_long_inv_freq) == 6
    default = 10000.0 ** (-np.arange(0, 12, 2) / 12)
    np.testing.assert_allclose(cfg.rope_inv_freq, default / np.array(tiny_phi3.SHORT_FACTOR), rtol=1e-6)
    np.testing.assert_allclose(cfg.rope_long_inv_freq, default / np.array(tiny_phi3.LONG_FACTOR), rtol=1e-6)
    assert cfg.rope_long_from == 100
    # No `factor`: max_position_embeddings / original = 2.56 (_compute_longrope_parameters).
    assert cfg.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(2.56) / math.log(100)))
    assert (cfg.layer_sliding, cfg.sliding_window) == ((True, True, True), 24)
    assert cfg.rope_local_inv_freq is None  # sliding layers rotate as global ones
    assert cfg.output_name == "model.embed_tokens.weight"


def test_older_config_keys_give_the_same_settings(tmp_path: Path) -> None:
    """Released Phi-3.5 / Phi-4-mini config.json files spell RoPE as `rope_scaling` (type
    "longrope", or the older "su") with top-level `rope_theta`, `partial_rotary_factor` and
    `original_max_position_embeddings`; Phi3Config reads them into the same parameters."""
    new = read_config(open_model_source(MINI))
    params = json.loads((MINI / "config.json").read_text())["rope_parameters"]
    for kind in ("longrope", "su"):
        model_dir = _with_config(
            tmp_path / kind, rope_parameters=None, rope_theta=params["rope_theta"],
            rope_scaling={"type": kind, "short_factor": params["short_factor"], "long_factor": params["long_factor"]},
        )
        old = read_config(open_model_source(model_dir))
        np.testing.assert_array_equal(old.rope_inv_freq, new.rope_inv_freq)
        assert old.rope_long_inv_freq is not None and new.rope_long_inv_freq is not None
        np.testing.assert_array_equal(old.rope_long_inv_freq, new.rope_long_inv_freq)
        assert (old.rope_long_from, old.rope_attention_factor) == (new.rope_long_from, new.rope_attention_factor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    checks.check_stored_reference(DATA / variant)


@checks.live_transformers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_phi3.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    checks.check_live_transformers(model_dir, tiny_phi3.reference_logits)


def test_the_long_factors_and_the_window_matter(tmp_path: Path) -> None:
    """The fixture exercises both: with the long factors set to the short ones, the decode
    steps before position 100 stay and those from it change; with a window wider than the
    context, the prefill changes past position 24 only."""
    ref = np.load(MINI / "reference_logits.npz")
    params = json.loads((MINI / "config.json").read_text())["rope_parameters"]
    short_only = _with_config(tmp_path / "short", rope_parameters={**params, "long_factor": params["short_factor"]})
    prefill, decode = checks.prefill_and_decode(short_only)
    np.testing.assert_allclose(prefill, ref["prefill"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode[:4], ref["decode"][:4], atol=LOGIT_ATOL, rtol=0)
    assert np.abs(decode[4:] - ref["decode"][4:]).max(axis=1).min() > 100 * LOGIT_ATOL

    wide = Model.load(_with_config(tmp_path / "wide", sliding_window=256), threads=2).logits_all(tiny_phi3.PREFILL_IDS)
    np.testing.assert_allclose(wide[:24], ref["prefill"][:24], atol=LOGIT_ATOL, rtol=0)
    assert np.abs(wide[24:] - ref["prefill"][24:]).max() > 100 * LOGIT_ATOL


def test_a_prefill_past_the_original_context_equals_decoding_to_it() -> None:
    """The table is chosen per position, so one call over positions 0..111 gives the logits of
    the 96-token prefill and 16 decode steps. (transformers would rotate every position of
    that one call with the long factors; see DecoderConfig::rope_long_inv_freq.)"""
    prefill, decode = checks.prefill_and_decode(MINI)
    model = Model.load(MINI, threads=2)
    whole = model.logits_all(tiny_phi3.PREFILL_IDS + tiny_phi3.DECODE_IDS)
    np.testing.assert_allclose(whole[:96], prefill, atol=1e-5, rtol=0)
    np.testing.assert_allclose(whole[96:], decode, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_spans_give_the_same_greedy_tokens(variant: str) -> None:
    checks.check_spans_give_the_same_tokens(DATA / variant, layers={2: [range(0, 2), range(2, 3)]})


@pytest.mark.timeout(120)
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """Phi-4-mini-like (fused tensors, partial rotary, LongRoPE, window, tied head) split over
    two in-process workers on 127.0.0.1: f32 hidden states on the wire, so the tokens equal."""
    checks.check_mesh_gives_the_one_process_tokens(MINI, ["0-1", "2-2"], tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("quant", "max_rel_rms"), [("Q8_0", 0.06), ("Q4_0", 0.6)])
def test_quantize_on_load_stays_close(variant: str, quant: str, max_rel_rms: float) -> None:
    """Row ranges of the fused f32 tensors converted at load: relative RMS logit error within
    the tiny Llama's bounds (tests/test_llama_forward.py, as tests/test_qwen.py) for Q8_0;
    Q4_0 measures 0.47 (tiny-phi3) and 0.51 (tiny-phi3-mini), over the Llama's 0.5, and the
    f32 model of the same Q4_0-rounded weights measures the same (the test below), so the
    error is Q4_0's on these random weights, not the loader's: bound 0.6. (An unconverted or
    mis-split matrix gives ~1.4.)"""
    checks.check_quantize_on_load(DATA / variant, quant, max_rel_rms)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantize_on_load_equals_the_rounded_weights_in_f32(tmp_path: Path, variant: str, quant: str) -> None:
    """Each row range of a fused tensor quantized at load is the same rows of the fused tensor
    quantized whole (rows are independent blocks): the logits equal those of an f32 copy
    whose layer matrices hold the quantize-dequantize round trip of every row, up to the
    activations' 8-bit rounding (measured ~1.5e-4 relative RMS)."""
    from safetensors.numpy import load_file, save_file

    from meshpy import _native

    rounded_dir = tmp_path / "rounded"
    shutil.copytree(DATA / variant, rounded_dir)
    tensors = load_file(rounded_dir / "model.safetensors")
    for name, w in tensors.items():
        if w.ndim == 2 and name.startswith("model.layers."):
            rows = [_native.dequantize(quant, _native.quantize(quant, r.astype(np.float32)), r.size) for r in w]
            tensors[name] = np.stack(rows).astype(np.float32)
    save_file(tensors, rounded_dir / "model.safetensors")
    want = Model.load(rounded_dir, threads=2).logits_all(tiny_phi3.PREFILL_IDS)
    got = Model.load(DATA / variant, threads=2, quantize=quant).logits_all(tiny_phi3.PREFILL_IDS)
    rel_rms = checks.relative_rms(got, want)
    assert rel_rms < 1e-3, f"{quant} on load vs rounded f32: relative RMS {rel_rms:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_checkpoint_equals_its_values_in_f32(tmp_path: Path, variant: str) -> None:
    """bf16 fused tensors split by rows give the logits of the same values widened to f32, to
    1e-4; Q8_0 on load from bf16 stays within the f32 checkpoint's Q8_0 bound."""
    checks.check_bf16_equals_its_values_in_f32(DATA / variant, tmp_path, q8_max_rel_rms=0.06)


def test_layer_bytes_count_each_fused_tensor_once() -> None:
    source = open_model_source(DATA / "tiny-phi3")
    cfg = read_config(source)
    f32 = 4 * (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128 + 64 + 64)  # qkv, o, gate_up, down, norms
    assert layer_nbytes(source, cfg, 1) == f32


def test_other_rope_types_and_activations_are_refused(tmp_path: Path) -> None:
    linear = _with_config(tmp_path / "linear", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(CheckpointFormatError, match="rope type 'linear'"):
        read_config(open_model_source(linear))
    gelu = _with_config(tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(CheckpointFormatError, match="hidden_act"):
        read_config(open_model_source(gelu))


def test_a_tensor_no_role_takes_is_refused(tmp_path: Path) -> None:
    checks.check_an_unused_tensor_is_refused(
        DATA / "tiny-phi3", tmp_path / "phi3-bias", "model.layers.1.self_attn.qkv_proj.bias", (128,)
    )


# HF name pieces -> llama.cpp's (convert_hf_to_gguf.py's tensor map for phi3: the fused
# tensors keep their rows as they are).
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model_dir: Path, out: Path, quant: str | None = None, vocab: bool = False) -> Path:
    """The HF checkpoint as llama.cpp's converter (Phi3MiniModel) writes it: `blk.N.*` names,
    fused attn_qkv / ffn_up, q/k rows not permuted (NeoX RoPE), LongRoPE as the global
    rope_factors_short/long tensors with the original context and attention factor as
    metadata; the layer matrices in `quant` (Q8_0) if given, else f32. `vocab` adds a
    placeholder SentencePiece vocabulary (one token per id) so llama.cpp will load the file."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    params = cfg["rope_parameters"]
    w = gguf.GGUFWriter(str(out), "phi3")
    llama_gguf.add_hf_shape(w, cfg)
    w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
    w.add_rope_dimension_count(int(params["partial_rotary_factor"] * cfg["hidden_size"]) // cfg["num_attention_heads"])
    w.add_rope_freq_base(params["rope_theta"])
    w.add_sliding_window(cfg.get("sliding_window") or 0)
    if vocab:
        llama_gguf.add_placeholder_vocab(w, cfg["vocab_size"])
    if params["rope_type"] == "longrope":
        original = cfg["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.array(params["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(params["short_factor"], np.float32))
    for name, t in sorted(load_file(model_dir / "model.safetensors").items()):
        gname = llama_gguf.gguf_name(name, GGUF_NAMES)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if quant is not None and gname.startswith("blk.") and t.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, t)
    llama_gguf.finish(w)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_config_equals_the_hf_config(tmp_path: Path, variant: str) -> None:
    hf = read_config(open_model_source(DATA / variant))
    gg = read_config(open_model_source(write_gguf(DATA / variant, tmp_path / "m.gguf")))
    assert gg.architecture == "phi3" and not gg.rope_interleaved
    np.testing.assert_array_equal(gg.rope_inv_freq, hf.rope_inv_freq)
    if hf.rope_long_inv_freq is None:
        assert gg.rope_long_inv_freq is None
    else:
        assert gg.rope_long_inv_freq is not None
        np.testing.assert_array_equal(gg.rope_long_inv_freq, hf.rope_long_inv_freq)
    assert gg.rope_attention_factor == pytest.approx(hf.rope_attention_factor, rel=1e-6)  # f32 in GGUF
    assert (gg.rope_long_from, gg.layer_sliding, gg.sliding_window) == (hf.rope_long_from, hf.layer_sliding, hf.sliding_window)
    assert gg.layer_names(1)["attn_v"] == "blk.1.attn_qkv.weight[96:128]"
    assert gg.layer_names(1)["ffn_up"] == "blk.1.ffn_up.weight[128:256]"


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_layout_matches_the_hf_layout(tmp_path: Path, variant: str) -> None:
    """The GGUF path (phi3 keys, fused `attn_qkv` / `ffn_up`, rope factor tensors) gives the
    HF path's logits and transformers'."""
    got = gguf_logits(write_gguf(DATA / variant, tmp_path / "m.gguf"))
    checks.assert_logits_close(got, checks.prefill_and_decode(DATA / variant), atol=1e-5)
    checks.assert_logits_close(got, checks.stored_reference(DATA / variant))


def test_a_q8_0_gguf_splits_its_fused_rows_as_quantize_on_load_does(tmp_path: Path) -> None:
    """Row ranges of a Q8_0 tensor stored fused (gguf-py's quantizer) are the rows the f32
    checkpoint's ranges quantize to on load (ggml's reference quantizer, ours): the logits
    agree to f32 rounding."""
    path = write_gguf(MINI, tmp_path / "q8.gguf", quant="Q8_0")
    assert open_model_source(path).checkpoint.tensor_info("blk.0.attn_qkv.weight") == ("Q8_0", (128, 64))
    want = gguf_logits(write_gguf(MINI, tmp_path / "f32.gguf"), quantize="Q8_0")
    checks.assert_logits_close(gguf_logits(path), want, atol=1e-5)


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_logits_equal_llama_cpp(tmp_path: Path, variant: str) -> None:
    """llama.cpp runs the same GGUF (f32 KV cache) to the same logits: an independent check of
    the phi3 names, the fused rows' order, partial rotary, the rope factor tensors and the
    attention factor. llama.cpp rotates every position with one factor set, long when its
    context exceeds the original one, and turns Phi-3's window off, so for the mini variant
    both sides run without the window and with an original context (512) past the context
    used (256): short factors everywhere."""
    model_dir = DATA / variant
    if variant == "tiny-phi3-mini":
        model_dir = _with_config(tmp_path, sliding_window=None, original_max_position_embeddings=512)
    path = write_gguf(model_dir, tmp_path / "m.gguf", vocab=True)
    prefill, decode = gguf_logits(path)
    theirs = llama_gguf.llama_cpp_logits(path, tiny_phi3.PREFILL_IDS + tiny_phi3.DECODE_IDS)
    np.testing.assert_allclose(np.concatenate([prefill, decode]), theirs, atol=LOGIT_ATOL, rtol=0)


def test_gguf_with_one_rope_factor_tensor_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    for key, value in [("context_length", 256), ("embedding_length", 8), ("block_count", 1), ("attention.head_count", 2), ("vocab_size", 4)]:
        w.add_uint32(f"phi3.{key}", value)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("rope_factors_long.weight", np.ones(2, np.float32))
    llama_gguf.finish(w)
    with pytest.raises(CheckpointFormatError, match="come together"):
        read_config(open_model_source(path))
