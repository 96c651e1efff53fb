"""The Llama span forward pass against transformers on tiny random f32 checkpoints, one per
RoPE type (tests/fixtures/tiny_llama.py), in the HF layout and as llama.cpp writes GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests import family_checks as checks
from tests.conftest import DATA
from tests.fixtures import tiny_llama


@pytest.mark.parametrize("variant", list(tiny_llama.VARIANTS))
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    checks.check_stored_reference(DATA / variant)


def test_two_spans_give_the_same_logits(tiny_llama_dir: Path) -> None:
    one = checks.prefill_and_decode(tiny_llama_dir, n_spans=1)
    three = checks.prefill_and_decode(tiny_llama_dir, n_spans=3)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", list(tiny_llama.VARIANTS))
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path, variant: str) -> None:
    """Every RoPE variant over two in-process workers (the packaged SmolLM2 runs over three
    worker processes in tests/test_mesh.py)."""
    checks.check_mesh_gives_the_one_process_tokens(DATA / variant, ["0-0", "1-2"], tmp_path)


@checks.live_transformers
@pytest.mark.parametrize("variant", list(tiny_llama.VARIANTS))
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_llama.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    checks.check_live_transformers(model_dir, tiny_llama.reference_logits)


def test_quantize_on_load_stays_close(tiny_llama_dir: Path) -> None:
    """Float weights converted at load: logits error relative to the logits' spread.

    Measured (random tiny model, which has no redundancy to absorb rounding): Q8_0 ~0.03,
    Q4_0 ~0.33 relative RMS error. Bounds leave margin; an unconverted or mis-converted
    matrix gives errors near 1.4 (uncorrelated logits).
    """
    for quant, max_rel_rms in (("Q8_0", 0.06), ("Q4_0", 0.5)):
        checks.check_quantize_on_load(tiny_llama_dir, quant, max_rel_rms)


@pytest.mark.parametrize("variant", ["tiny-llama", "tiny-llama3-tied", "tiny-llama-linear", "tiny-llama-yarn"])
def test_gguf_layout_gives_the_transformers_logits(tmp_path: Path, variant: str) -> None:
    """Each variant as llama.cpp's converter writes it (tests/fixtures/llama_gguf.py): q/k rows
    permuted, linear scaling as type + factor, llama3 scaling as `rope_freqs.weight` divisors
    (computed by the converter's formula, not ours), YaRN as type, factor and original context
    (applied as llama.cpp does, which here is transformers' YaRN): transformers' logits."""
    from tests.fixtures.llama_gguf import gguf_logits, write_llama_gguf

    path = write_llama_gguf(DATA / variant, tmp_path / f"{variant}.gguf")
    checks.assert_logits_close(gguf_logits(path), checks.stored_reference(DATA / variant))


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.parametrize("variant", ["tiny-llama", "tiny-llama3-tied", "tiny-llama-linear", "tiny-llama-yarn"])
def test_gguf_logits_equal_llama_cpp(tmp_path: Path, variant: str) -> None:
    """llama.cpp runs the same GGUF (f32 KV cache, token ids fed directly) to the same logits:
    an independent check of the permuted q/k rows, `rope_freqs.weight`, linear scaling and
    YaRN from the GGUF keys. Measured: 8e-6 to 1.4e-5."""
    from tests.fixtures.llama_gguf import gguf_logits, llama_cpp_logits, write_llama_gguf

    path = write_llama_gguf(DATA / variant, tmp_path / f"{variant}.gguf", vocab=True)
    theirs = llama_cpp_logits(path, tiny_llama.PREFILL_IDS + tiny_llama.DECODE_IDS)
    np.testing.assert_allclose(np.concatenate(gguf_logits(path)), theirs, atol=checks.LOGIT_ATOL, rtol=0)
