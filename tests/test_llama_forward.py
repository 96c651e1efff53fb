"""The Llama span forward pass against transformers on tiny random f32 checkpoints, one per
RoPE type (tests/fixtures/tiny_llama.py), in the HF layout and as llama.cpp writes GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from meshpy.generation import Model
from tests.conftest import DATA
from tests.fixtures import tiny_llama

# f32 weights, f32 arithmetic on both sides: differences are rounding order only.
LOGIT_ATOL = 1e-4

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None


def ours(model_dir: Path, n_spans: int = 1) -> tuple[np.ndarray, np.ndarray]:
    model = Model.load(model_dir, threads=2, n_spans=n_spans)
    session = model.new_session()
    prefill = model.logits_all(tiny_llama.PREFILL_IDS, session)
    decode = np.stack([model.logits_all([t], session)[0] for t in tiny_llama.DECODE_IDS])
    return prefill, decode


@pytest.mark.parametrize("variant", list(tiny_llama.VARIANTS))
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    model_dir = DATA / variant
    ref = np.load(model_dir / "reference_logits.npz")
    prefill, decode = ours(model_dir)
    assert prefill.shape == ref["prefill"].shape
    np.testing.assert_allclose(prefill, ref["prefill"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode, ref["decode"], atol=LOGIT_ATOL, rtol=0)


def test_two_spans_give_the_same_logits(tiny_llama_dir: Path) -> None:
    one = ours(tiny_llama_dir, n_spans=1)
    three = ours(tiny_llama_dir, n_spans=3)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


@pytest.mark.reference
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="live comparison needs torch and transformers")
@pytest.mark.parametrize("variant", list(tiny_llama.VARIANTS))
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_llama.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    ref_prefill, ref_decode = tiny_llama.reference_logits(model_dir)
    prefill, decode = ours(model_dir)
    np.testing.assert_allclose(prefill, ref_prefill, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode, ref_decode, atol=LOGIT_ATOL, rtol=0)


def test_quantize_on_load_stays_close(tiny_llama_dir: Path) -> None:
    """Float weights converted at load: logits error relative to the logits' spread.

    Measured (random tiny model, which has no redundancy to absorb rounding): Q8_0 ~0.03,
    Q4_0 ~0.33 relative RMS error. Bounds leave margin; an unconverted or mis-converted
    matrix gives errors near 1.4 (uncorrelated logits).
    """
    ref = np.load(tiny_llama_dir / "reference_logits.npz")["prefill"]
    for quant, max_rel_rms in (("Q8_0", 0.06), ("Q4_0", 0.5)):
        model = Model.load(tiny_llama_dir, threads=2, quantize=quant)
        got = model.logits_all(tiny_llama.PREFILL_IDS)
        rel_rms = float(np.sqrt(((got - ref) ** 2).mean()) / ref.std())
        assert rel_rms < max_rel_rms, f"{quant}: relative RMS logit error {rel_rms:.3f}"
        assert not np.array_equal(got, ref), f"{quant}: weights were not converted"


@pytest.mark.parametrize("variant", ["tiny-llama", "tiny-llama3-tied", "tiny-llama-linear"])
def test_gguf_layout_gives_the_transformers_logits(tmp_path: Path, variant: str) -> None:
    """Each variant as llama.cpp's converter writes it (tests/fixtures/llama_gguf.py): q/k rows
    permuted, linear scaling as type + factor, llama3 scaling as `rope_freqs.weight` divisors
    (computed by the converter's formula, not ours): transformers' logits."""
    from tests.fixtures.llama_gguf import gguf_logits, write_llama_gguf

    path = write_llama_gguf(DATA / variant, tmp_path / f"{variant}.gguf")
    prefill, decode = gguf_logits(path, tiny_llama.PREFILL_IDS, tiny_llama.DECODE_IDS)
    ref = np.load(DATA / variant / "reference_logits.npz")
    np.testing.assert_allclose(prefill, ref["prefill"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode, ref["decode"], atol=LOGIT_ATOL, rtol=0)


def test_gguf_yarn_is_refused(tmp_path: Path) -> None:
    """llama.cpp's YaRN is not transformers' in detail (not checked yet): refused, by name."""
    from meshpy.errors import CheckpointFormatError
    from meshpy.models.config import read_config
    from meshpy.models.source import open_model_source
    from tests.fixtures.llama_gguf import write_llama_gguf

    path = write_llama_gguf(DATA / "tiny-llama-yarn", tmp_path / "yarn.gguf")
    with pytest.raises(CheckpointFormatError, match="rope scaling 'yarn'"):
        read_config(open_model_source(path))
