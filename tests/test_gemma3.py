"""The Gemma 3 text span forward (the Llama layer with Gemma's options: `1 + weight` norms,
post-attention / post-MLP norms, GELU-tanh MLP, query_pre_attn_scalar, sliding-window layers
with their own RoPE base, the sqrt(hidden) embedding scale) against transformers on a tiny
random f32 checkpoint (tests/fixtures/tiny_gemma3.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meshpy.errors import CheckpointFormatError
from meshpy.generation import Model
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from tests import family_checks as checks
from tests.conftest import DATA
from tests.family_checks import LOGIT_ATOL
from tests.fixtures import tiny_gemma3

MODEL_DIR = DATA / tiny_gemma3.NAME


def _with_config(tmp_path: Path, **changes: object) -> Path:
    return checks.with_config(MODEL_DIR, tmp_path / "gemma3", **changes)


def test_config_reads_gemma_settings() -> None:
    cfg = read_config(open_model_source(MODEL_DIR))
    assert cfg.architecture == "Gemma3ForCausalLM"
    assert (cfg.hidden, cfg.n_heads, cfg.head_dim) == (64, 4, 32)
    assert cfg.attn_scale == pytest.approx(24**-0.5)
    assert cfg.embedding_scale == np.float32(64**0.5)
    assert (cfg.norm_offset, cfg.gelu_tanh) == (1.0, True)
    assert cfg.layer_sliding == (True, True, False)
    assert cfg.sliding_window == 8
    # Global: theta 1e6, linear factor 2; local: theta 1e4, unscaled.
    np.testing.assert_allclose(cfg.rope_inv_freq[1], 1e6 ** (-2 / 32) / 2, rtol=1e-6)
    assert cfg.rope_local_inv_freq is not None
    np.testing.assert_allclose(cfg.rope_local_inv_freq[1], 1e4 ** (-2 / 32), rtol=1e-6)
    assert cfg.layer_names(0)["attn_post_norm"] == "model.layers.0.post_attention_layernorm.weight"
    assert cfg.layer_names(0)["ffn_norm"] == "model.layers.0.pre_feedforward_layernorm.weight"
    assert cfg.output_name == "model.embed_tokens.weight"


def test_sliding_window_pattern_without_layer_types(tmp_path: Path) -> None:
    """Older configs give `sliding_window_pattern` (every Nth layer global) and flat RoPE keys."""
    model_dir = _with_config(
        tmp_path, layer_types=None, sliding_window_pattern=2, rope_parameters=None,
        rope_theta=500000.0, rope_local_base_freq=20000.0,
    )
    cfg = read_config(open_model_source(model_dir))
    assert cfg.layer_sliding == (True, False, True)
    np.testing.assert_allclose(cfg.rope_inv_freq[1], 5e5 ** (-2 / 32), rtol=1e-6)
    assert cfg.rope_local_inv_freq is not None
    np.testing.assert_allclose(cfg.rope_local_inv_freq[1], 2e4 ** (-2 / 32), rtol=1e-6)


def test_softcapping_is_refused(tmp_path: Path) -> None:
    model_dir = _with_config(tmp_path, final_logit_softcapping=30.0)
    with pytest.raises(CheckpointFormatError, match="softcapping"):
        read_config(open_model_source(model_dir))


def test_an_unsupported_rope_type_is_refused_naming_the_checkpoint(tmp_path: Path) -> None:
    model_dir = _with_config(tmp_path, rope_parameters=None, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(CheckpointFormatError, match=f"{model_dir}.*'dynamic'"):
        read_config(open_model_source(model_dir))


def test_logits_match_stored_transformers_reference() -> None:
    checks.check_stored_reference(MODEL_DIR)


def test_the_window_matters(tmp_path: Path) -> None:
    """The same weights with a window wider than the prompt (or all layers global) give
    other logits past position 8, and the same before it: the fixture exercises the window."""
    ref = np.load(MODEL_DIR / "reference_logits.npz")["prefill"]
    wide = Model.load(_with_config(tmp_path, sliding_window=256), threads=2).logits_all(tiny_gemma3.PREFILL_IDS)
    np.testing.assert_allclose(wide[:8], ref[:8], atol=LOGIT_ATOL, rtol=0)
    assert np.abs(wide[8:] - ref[8:]).max() > 100 * LOGIT_ATOL


@checks.live_transformers
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int) -> None:
    model_dir = tiny_gemma3.build_checkpoint(tmp_path / "tiny", seed=seed)
    checks.check_live_transformers(model_dir, tiny_gemma3.reference_logits)


#: 25 windows of the fixture's 8 positions (its context is 256).
LONG_IDS = [int(i) for i in np.random.default_rng(3).integers(3, 512, size=200)]


def decode_long(model_dir: Path, n_spans: int = 1) -> tuple[np.ndarray, list[int]]:
    """Logits at every position of LONG_IDS, run as prefill chunks shorter and longer than the
    window, then one token at a time; and each span cache's held bytes at the end."""
    model = Model.load(model_dir, threads=2, n_spans=n_spans)
    session = model.new_session()
    parts, start = [], 0
    for n in (5, 1, 1, 13, 3, 20):
        parts.append(model.logits_all(LONG_IDS[start : start + n], session))
        start += n
    parts += [model.logits_all([t], session) for t in LONG_IDS[start:]]
    return np.concatenate(parts), [cache.held_bytes for cache in session.caches]


def test_a_long_generation_keeps_only_the_window_and_the_same_logits() -> None:
    """Sliding layers drop positions older than their window as a session goes on: decoding
    25 windows gives the logits of one prefill over the whole sequence (whose single step holds
    every position), and the caches hold the global layer's positions plus a bounded window per
    sliding layer."""
    one_shot = Model.load(MODEL_DIR, threads=2).logits_all(LONG_IDS)
    for n_spans in (1, 2):
        got, held = decode_long(MODEL_DIR, n_spans)
        np.testing.assert_allclose(got, one_shot, atol=LOGIT_ATOL, rtol=0)
        per_layer_position = 2 * 64 * 4  # keys and values of 2 KV heads of 32, f32
        # Layer 2 (global): 200 positions; layers 0, 1 (window 8): at most 8 - 1 + slack 4 + 1.
        assert sum(held) <= (200 + 2 * 12) * per_layer_position, (n_spans, held)


@checks.live_transformers
def test_a_long_generation_matches_live_transformers() -> None:
    """The whole 25-window sequence against transformers' forward (its sliding-window mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([LONG_IDS])).logits[0].numpy()
    got, _ = decode_long(MODEL_DIR)
    np.testing.assert_allclose(got, ref, atol=LOGIT_ATOL, rtol=0)


def test_two_spans_give_the_same_greedy_tokens() -> None:
    """Split between the sliding layers and the global one, and inside the sliding ones."""
    checks.check_spans_give_the_same_tokens(MODEL_DIR, n_spans=(2, 3))


@pytest.mark.timeout(120)
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """The sliding layers on one worker, the global layer on the other."""
    checks.check_mesh_gives_the_one_process_tokens(MODEL_DIR, ["0-1", "2-2"], tmp_path)


@pytest.mark.parametrize(("quant", "max_rel_rms"), [("Q8_0", 0.06), ("Q4_0", 0.5)])
def test_quantize_on_load_stays_close(quant: str, max_rel_rms: float) -> None:
    """Float matrices converted at load: relative RMS logit error with the tiny Llama's bounds
    (tests/test_llama_forward.py); norms stay f32."""
    checks.check_quantize_on_load(MODEL_DIR, quant, max_rel_rms)


@pytest.mark.parametrize(("hidden", "bf16_scale"), [(640, 25.25), (1152, 34.0), (2560, 50.5), (5376, 73.5)])
def test_embedding_scale_rounds_as_torch_bf16(hidden: int, bf16_scale: float) -> None:
    """Gemma3TextScaledWordEmbedding casts sqrt(hidden) to the weight dtype; for bf16
    checkpoints (the released Gemma 3 sizes) that is torch's bf16 rounding (values from
    `torch.tensor(hidden**0.5).to(torch.bfloat16)`)."""
    from meshpy.models.gemma3 import _round_to_bf16

    assert float(_round_to_bf16(np.float32(hidden**0.5))) == bf16_scale
