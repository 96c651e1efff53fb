"""SmolLM2-135M-Instruct Q4_1 against transformers (which dequantizes the GGUF to f32), with
the kernels of every level this CPU has (scalar, AVX2, AVX-512, AVX-512 VNNI)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.generation import Model
from tests.conftest import DATA
from tests.fixtures import smollm2_reference
from tests.family_checks import F16_KV_MAX_REL_RMS, relative_rms
from tests.fixtures.metrics import kl_full, kl_top_k, log_softmax

# Our activations are quantized to 16-bit blocks before each product; transformers computes
# in f32 on the dequantized weights. Bounds from the issue, on every kernel level.
MIN_TOP1_AGREEMENT = 0.98
MAX_MEAN_KL = 0.01

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module", params=_native.simd_levels())
def model(request: pytest.FixtureRequest, smollm2_gguf: Path) -> Iterator[Model]:
    """The model with the kernels of one level: matrices choose theirs at load, element-wise
    ops follow the level while the tests run."""
    previous = _native.simd_level()
    _native.set_simd_level(request.param)
    try:
        yield Model.load(smollm2_gguf, threads=2)
    finally:
        _native.set_simd_level(previous)


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    return dict(np.load(DATA / "smollm2_reference.npz"))


def test_teacher_forced_against_stored_reference(model: Model, stored: dict[str, np.ndarray]) -> None:
    ids = stored["ids"].tolist()
    assert len(ids) >= 256
    ours = log_softmax(model.logits_all(ids))
    top1 = (ours.argmax(-1) == stored["top_ids"][:, 0]).mean()
    # Over the reference's top-64 plus the rest (a lower bound); the live test takes the full KL.
    kl = kl_top_k(stored["top_ids"], stored["top_logp"], ours)
    print(f"\nSmolLM2 ({_native.simd_level()}) vs stored transformers reference: top-1 {top1:.4f}, mean KL (top-64 + rest) {kl.mean():.5f}")
    assert top1 >= MIN_TOP1_AGREEMENT
    assert kl.mean() <= MAX_MEAN_KL


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="live comparison needs torch and transformers")
def test_teacher_forced_against_live_transformers(model: Model) -> None:
    ids = smollm2_reference.token_ids()
    assert ids == model.encode(smollm2_reference.TEXT, raw=True)
    ref = smollm2_reference.reference_log_probs(ids).astype(np.float64)
    ours = log_softmax(model.logits_all(ids))
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    kl = kl_full(ref, ours)
    print(f"\nSmolLM2 ({_native.simd_level()}) vs live transformers: top-1 {top1:.4f}, mean KL {kl.mean():.5f}, max KL {kl.max():.4f}")
    assert top1 >= MIN_TOP1_AGREEMENT
    assert kl.mean() <= MAX_MEAN_KL


def test_f16_kv_cache_stays_within_rounding_of_f32(model: Model, smollm2_gguf: Path, stored: dict[str, np.ndarray]) -> None:
    """SmolLM2 (Q4_1) keeps f16 keys and values by default: half the bytes per position of
    an f32 cache, and logits within f16 rounding of the f32 cache's (at this level's kernels)."""
    ids = stored["ids"].tolist()
    exact = Model.load(smollm2_gguf, threads=2, kv_dtype="f32")
    assert (model.pipeline.spans[0].kv_dtype, exact.pipeline.spans[0].kv_dtype) == ("f16", "f32")
    halves = [m.pipeline.new_session() for m in (model, exact)]
    try:
        per_position = [s.caches[0].bytes_per_position for s in halves]
    finally:
        for m, s in zip((model, exact), halves):
            m.close_session(s)
    assert per_position[0] * 2 == per_position[1] == 30 * 2 * 192 * 4
    got, ref = model.logits_all(ids), exact.logits_all(ids)
    rel_rms = relative_rms(got, ref)
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"\nSmolLM2 ({_native.simd_level()}) f16 KV against f32 KV over {len(ids)} positions: relative RMS {rel_rms:.2e}, top-1 {top1:.4f}")
    assert 0 < rel_rms < F16_KV_MAX_REL_RMS
    assert top1 >= 0.99
