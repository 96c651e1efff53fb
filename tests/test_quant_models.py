"""Every quantized weight type on a real forward pass: a small random-weight Llama GGUF whose
layer matrices are in that type (benches/make_gguf.py, well-formed blocks of every type)
gives the logits of the same model with every tensor dequantized to F32 by gguf-py (an
independent dequantizer), at every kernel level this CPU has.

The only difference left is meshpy's rounding of activations to 16-bit blocks before each
quantized product (the F32 model multiplies in f32): measured relative RMS error of the
logits 4e-5 (Q3_K, every level). The bound allows 25x that; top-1 must agree everywhere.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.generation import Model
from meshpy.models.packaged import resolve_packaged

REPO = Path(__file__).resolve().parents[1]
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
SHAPE = ["--layers", "2", "--hidden", "256", "--ffn", "512", "--heads", "4", "--kv-heads", "2", "--context", "512"]
MAX_REL_RMS = 1e-3
IDS = list(range(100, 164))  # a 64-token prefill, teacher-forced


def _make(out: Path, type_name: str, *extra: str) -> Path:
    # The vocabulary's GGUF is named here, so the script needs no meshpy of its own (CI runs
    # the installed package; the source tree there has no built extension).
    vocab = resolve_packaged("smollm2")
    cmd = [sys.executable, str(REPO / "benches" / "make_gguf.py"), *SHAPE, "--type", type_name, "--seed", "7"]
    cmd += ["--vocab-from", str(vocab), "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module", params=TYPES)
def twins(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, np.ndarray]]:
    """(type, the quantized GGUF, the dequantized twin's logits over IDS)."""
    d = tmp_path_factory.mktemp(request.param)
    quantized = _make(d / "q.gguf", request.param)
    reference = Model.load(_make(d / "f32.gguf", request.param, "--dequantized"), threads=2).logits_all(IDS)
    yield request.param, quantized, reference


@pytest.mark.slow
@pytest.mark.parametrize("level", _native.simd_levels())
def test_quantized_model_matches_its_dequantized_twin(twins: tuple[str, Path, np.ndarray], level: str) -> None:
    type_name, quantized, reference = twins
    previous = _native.simd_level()
    _native.set_simd_level(level)
    try:
        model = Model.load(quantized, threads=2)
        assert model.source.checkpoint.tensor_info("blk.0.ffn_down.weight")[0] == type_name
        got = model.logits_all(IDS)
    finally:
        _native.set_simd_level(previous)
    rel = float(np.sqrt(np.mean((got - reference) ** 2) / np.mean(reference**2)))
    top1 = float((got.argmax(-1) == reference.argmax(-1)).mean())
    print(f"\n{type_name} {level}: relative RMS {rel:.2e}, top-1 {top1:.3f}")
    assert np.isfinite(got).all()
    assert rel <= MAX_REL_RMS
    assert top1 == 1.0
