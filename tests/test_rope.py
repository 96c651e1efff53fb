"""RoPE types as Llama-family checkpoints configure them (meshpy/models/rope.py, llama.py):
the frequencies each HF `rope_type` gives against transformers' own, GGUF scaling keys read
as llama.cpp reads them, and the types we refuse, by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from meshpy.errors import CheckpointFormatError
from meshpy.models import rope
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from tests.conftest import DATA
from tests.family_checks import HAVE_TRANSFORMERS
from tests.fixtures import tiny_llama
from tests.fixtures.llama_gguf import finish

HEAD_DIM = 16  # tiny Llama: hidden 64, 4 heads


def _with_rope(tmp_path: Path, **changes: object) -> Path:
    """tiny-llama with config.json keys replaced (None deletes one)."""
    model_dir = tmp_path / "llama"
    shutil.copytree(DATA / "tiny-llama", model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return model_dir


def _default(theta: float) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32)


@pytest.mark.reference
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs torch and transformers")
@pytest.mark.parametrize("variant", list(tiny_llama.VARIANTS))
def test_frequencies_equal_transformers(variant: str) -> None:
    """Each stored variant's inverse frequencies and attention factor, as LlamaRotaryEmbedding
    computes them from the same config.json, to float32 rounding (numpy's and torch's float32
    `pow` differ by an ulp for theta 5e5)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model_dir = DATA / variant
    rotary = LlamaRotaryEmbedding(LlamaConfig.from_pretrained(model_dir))
    cfg = read_config(open_model_source(model_dir))
    np.testing.assert_allclose(cfg.rope_inv_freq, rotary.inv_freq.numpy(), rtol=3e-7, atol=0)
    assert cfg.rope_attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)


def test_llama3_default_theta(tmp_path: Path) -> None:
    """Llama 3 (8B, 70B) is `default` with theta 500000, in the nested or the flat form."""
    nested = read_config(open_model_source(_with_rope(tmp_path / "a", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})))
    flat = read_config(open_model_source(_with_rope(tmp_path / "b", rope_parameters=None, rope_theta=500000.0)))
    for cfg in (nested, flat):
        np.testing.assert_allclose(cfg.rope_inv_freq, _default(500000.0), rtol=1e-6)
        assert cfg.rope_attention_factor == 1.0


def test_transformers_4_rope_scaling_key(tmp_path: Path) -> None:
    """Older config.json files: flat `rope_theta` and `rope_scaling` with `type`."""
    model_dir = _with_rope(tmp_path, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = read_config(open_model_source(model_dir))
    np.testing.assert_allclose(cfg.rope_inv_freq, _default(10000.0) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("dynamic", "'dynamic' \\(dynamic NTK recomputes"),
        ("longrope", "'longrope'"),
        ("made-up", "'made-up'"),
    ],
)
def test_unsupported_types_are_refused_by_name(tmp_path: Path, kind: str, match: str) -> None:
    rope = {"rope_type": kind, "rope_theta": 10000.0, "factor": 2.0}
    model_dir = _with_rope(tmp_path, rope_parameters=rope)
    with pytest.raises(CheckpointFormatError, match=f"config.json: unsupported rope scaling type {match}.*supported: default, linear, llama3, yarn"):
        read_config(open_model_source(model_dir))


# -- GGUF: llama.cpp's keys -----------------------------------------------------------------


def _gguf(path: Path, **meta: object) -> Path:
    """A metadata-only llama GGUF (one tensor) with the given `llama.*` keys added."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(8)
    w.add_rope_freq_base(10000.0)
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_string(f"llama.{key}", value)
        else:
            w.add_float32(f"llama.{key}", float(value))  # type: ignore[arg-type]
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    finish(w)
    return path


@pytest.mark.parametrize(
    ("meta", "divisor"),
    [
        ({}, 1.0),
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, 4.0),
        # llama.cpp: the type defaults to linear; `none` never scales, whatever the factor.
        ({"rope.scaling.factor": 2.0}, 2.0),
        ({"rope.scale_linear": 2.0}, 2.0),
        ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, 1.0),
    ],
)
def test_gguf_linear_scaling(tmp_path: Path, meta: dict[str, object], divisor: float) -> None:
    cfg = read_config(open_model_source(_gguf(tmp_path / "m.gguf", **meta)))
    np.testing.assert_allclose(cfg.rope_inv_freq, _default(10000.0) / divisor, rtol=1e-6)


@pytest.mark.parametrize(
    ("meta", "hf_yarn", "attention_factor"),
    [
        # The converter's keys: type, factor, original context; llama.cpp's beta 32 / 1.
        (
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 64},
            {"factor": 4.0, "original_max_position_embeddings": 64},
            1 + 0.1 * np.log(4.0),
        ),
        # No original context: llama.cpp takes context_length (256 in _gguf).
        (
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0},
            {"factor": 2.0, "original_max_position_embeddings": 256},
            1 + 0.1 * np.log(2.0),
        ),
        # rope.scaling.attn_factor multiplies cos/sin on top of YaRN's own factor.
        (
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.attn_factor": 0.5},
            {"factor": 4.0, "original_max_position_embeddings": 256},
            0.5 * (1 + 0.1 * np.log(4.0)),
        ),
    ],
)
def test_gguf_yarn_is_transformers_yarn(
    tmp_path: Path, meta: dict[str, object], hf_yarn: dict[str, float], attention_factor: float
) -> None:
    """llama.cpp's YaRN from GGUF keys gives transformers' table (rope.py's, checked against
    transformers above) for the same factor, original context and betas."""
    cfg = read_config(open_model_source(_gguf(tmp_path / "m.gguf", **meta)))
    want, _ = rope.scaled_inv_freq(10000.0, HEAD_DIM, {"rope_type": "yarn", **hf_yarn})
    np.testing.assert_allclose(cfg.rope_inv_freq, want, rtol=1e-6)
    assert cfg.rope_attention_factor == pytest.approx(attention_factor, rel=1e-6)


def test_gguf_attn_factor_scales_every_type(tmp_path: Path) -> None:
    """llama.cpp multiplies cos/sin by `rope.scaling.attn_factor` whatever the scaling type."""
    cfg = read_config(open_model_source(_gguf(tmp_path / "m.gguf", **{"rope.scaling.attn_factor": 0.5})))
    assert cfg.rope_attention_factor == pytest.approx(0.5)


def test_gguf_other_scaling_types_are_refused(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf", **{"rope.scaling.type": "longrope", "rope.scaling.factor": 4.0})
    with pytest.raises(CheckpointFormatError, match="type 'longrope'.*supported: none, linear, yarn"):
        read_config(open_model_source(path))
