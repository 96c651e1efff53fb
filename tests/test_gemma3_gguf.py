"""The packaged Gemma 3 270M Q4_K_M GGUF against llama.cpp and transformers
(tests/fixtures/gemma3_reference.py): tokenization, and next-token distributions at 640
teacher-forced positions (past the 512-position sliding window).

Two references, because they disagree with each other: transformers, running its own Gemma 3
forward in f32 on the GGUF's dequantized weights, is the exact computation this file
defines, and meshpy matches it closely (16-bit activations; measured: top-1 1.0, mean KL
~1e-7). llama.cpp rounds every activation to 8 bits before each quantized product (Q8_0 /
Q8_K blocks); on this model, whose activations reach large values, that moves its logits by
~0.9 at most per position and changes the top-1 token at ~5% of these positions (llama.cpp
against transformers: top-1 0.953). So against llama.cpp the bounds are the issue's KL bound
and a top-1 bound set by llama.cpp's own distance from the exact result, not the issue's 98%
(measured against meshpy: top-1 0.953, mean KL 0.005).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from meshpy.generation import Model
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.tokenizer import Tokenizer
from tests import family_checks as checks
from tests.conftest import DATA
from tests.fixtures import gemma3_reference
from tests.fixtures.metrics import kl_full, kl_top_k, log_softmax

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None

# Against the exact f32 computation (transformers on the dequantized weights); measured:
# top-1 1.0, mean KL ~1e-7.
EXACT_MIN_TOP1 = 0.99
EXACT_MAX_MEAN_KL = 1e-5
# Against llama.cpp (see the module docstring); measured: top-1 0.953, mean KL 0.004-0.005.
LLAMA_CPP_MAX_MEAN_KL = 0.01
LLAMA_CPP_MIN_TOP1 = 0.90
# llama.cpp's top-1 token is among our 3 likeliest (measured: at every position).
LLAMA_CPP_MIN_TOP1_IN_OUR_TOP3 = 0.99


@pytest.fixture(scope="module")
def model(gemma3_gguf: Path) -> Model:
    return Model.load(gemma3_gguf, threads=2)


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    return dict(np.load(DATA / "gemma3_270m_reference.npz"))


@pytest.fixture(scope="module")
def ours(model: Model, stored: dict[str, np.ndarray]) -> np.ndarray:
    """Our next-token log-probabilities at every stored position."""
    return log_softmax(model.logits_all(stored["ids"].tolist()))


def test_config_reads_llama_cpp_settings(gemma3_gguf: Path) -> None:
    cfg = read_config(open_model_source(gemma3_gguf))
    assert cfg.architecture == "gemma3"
    assert (cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (18, 640, 4, 1, 256)
    # The converter added 1 to the norm weights already; RoPE is NeoX (rotate-half).
    assert (cfg.norm_offset, cfg.rope_interleaved, cfg.gelu_tanh) == (0.0, False, True)
    assert cfg.layer_sliding == tuple(i % 6 != 5 for i in range(18))
    assert cfg.sliding_window == 512
    assert cfg.attn_scale == pytest.approx(1 / 16)
    assert cfg.embedding_scale == pytest.approx(640**0.5)
    np.testing.assert_allclose(cfg.rope_inv_freq[1], 1e6 ** (-2 / 256), rtol=1e-6)
    assert cfg.rope_local_inv_freq is not None
    np.testing.assert_allclose(cfg.rope_local_inv_freq[1], 1e4 ** (-2 / 256), rtol=1e-6)
    assert cfg.layer_names(5)["ffn_post_norm"] == "blk.5.post_ffw_norm.weight"
    assert cfg.output_name == "token_embd.weight"  # tied


def test_tokenization_equals_stored_llama_cpp(gemma3_gguf: Path, stored: dict[str, np.ndarray]) -> None:
    tok = Tokenizer.from_gguf_metadata(open_model_source(gemma3_gguf).metadata)
    expected = json.loads(str(stored["tokenizer_ids"]))
    assert [tok.encode(t) for t in gemma3_reference.TOKENIZER_TEXTS] == expected
    assert tok.encode(gemma3_reference.TEXT)[: len(stored["ids"])] == stored["ids"].tolist()


@pytest.mark.reference
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="live comparison needs llama-cpp-python")
def test_tokenization_equals_live_llama_cpp(gemma3_gguf: Path) -> None:
    tok = Tokenizer.from_gguf_metadata(open_model_source(gemma3_gguf).metadata)
    texts = gemma3_reference.TOKENIZER_TEXTS + [gemma3_reference.TEXT]
    assert [tok.encode(t) for t in texts] == gemma3_reference.llama_cpp_token_ids(texts)


def _report(name: str, top1: float, kl: np.ndarray) -> None:
    print(f"\nGemma 3 270M vs {name}: top-1 {top1:.4f}, mean KL {kl.mean():.2e}, max KL {kl.max():.2e}")


def test_teacher_forced_against_stored_transformers(ours: np.ndarray, stored: dict[str, np.ndarray]) -> None:
    ref_ids = stored["transformers_top_ids"]
    top1 = float((ours.argmax(-1) == ref_ids[:, 0]).mean())
    kl = kl_top_k(ref_ids, stored["transformers_top_logp"], ours)
    _report("stored transformers (top-32 + rest)", top1, kl)
    assert top1 >= EXACT_MIN_TOP1
    assert kl.mean() <= EXACT_MAX_MEAN_KL


def test_teacher_forced_against_stored_llama_cpp(ours: np.ndarray, stored: dict[str, np.ndarray]) -> None:
    ref_ids = stored["llama_cpp_top_ids"]
    top1 = float((ours.argmax(-1) == ref_ids[:, 0]).mean())
    kl = kl_top_k(ref_ids, stored["llama_cpp_top_logp"], ours)
    ours_top3 = np.argsort(-ours, axis=-1)[:, :3]
    in_top3 = float((ours_top3 == ref_ids[:, :1]).any(-1).mean())
    _report("stored llama.cpp (top-32 + rest)", top1, kl)
    print(f"llama.cpp's top-1 among our top-3: {in_top3:.4f}; over the first 256 positions: top-1 "
          f"{(ours[:256].argmax(-1) == ref_ids[:256, 0]).mean():.4f}, mean KL {kl[:256].mean():.2e}")
    assert kl.mean() <= LLAMA_CPP_MAX_MEAN_KL
    assert top1 >= LLAMA_CPP_MIN_TOP1
    assert in_top3 >= LLAMA_CPP_MIN_TOP1_IN_OUR_TOP3


def test_the_references_themselves_disagree_as_stated(stored: dict[str, np.ndarray]) -> None:
    """The reason for the llama.cpp bounds: its top-1 differs from the exact computation's."""
    agreement = float((stored["llama_cpp_top_ids"][:, 0] == stored["transformers_top_ids"][:, 0]).mean())
    print(f"\nllama.cpp vs transformers top-1: {agreement:.4f}")
    assert agreement < 0.98


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="live comparison needs llama-cpp-python")
def test_teacher_forced_against_live_llama_cpp(ours: np.ndarray, stored: dict[str, np.ndarray]) -> None:
    ref = gemma3_reference.llama_cpp_log_probs(stored["ids"].tolist())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    kl = kl_full(ref, ours)
    _report("live llama.cpp", top1, kl)
    assert kl.mean() <= LLAMA_CPP_MAX_MEAN_KL
    assert top1 >= LLAMA_CPP_MIN_TOP1


@pytest.mark.slow
@pytest.mark.timeout(600)
@checks.live_transformers
def test_teacher_forced_against_live_transformers(ours: np.ndarray, stored: dict[str, np.ndarray]) -> None:
    ref = gemma3_reference.transformers_log_probs(stored["ids"].tolist())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    kl = kl_full(ref, ours)
    _report("live transformers", top1, kl)
    assert top1 >= EXACT_MIN_TOP1
    assert kl.mean() <= EXACT_MAX_MEAN_KL


def test_two_spans_give_the_same_logits_and_tokens(gemma3_gguf: Path, model: Model) -> None:
    """Cut after layer 5 (the first global layer) and inside the sliding layers."""
    prompt = model.encode("Write a short poem about the sea.")
    checks.check_spans_give_the_same_tokens(gemma3_gguf, n_spans=(2, 3), one=model, prompt=prompt, n_tokens=24)


def test_chat_uses_gemmas_format_when_the_gguf_ships_none(model: Model) -> None:
    assert model.source.chat_template is None
    text = model.end.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert model.tokenizer.token_to_id("<end_of_turn>") in model.tokenizer.stop_ids


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_three_workers_through_the_mesh_give_the_one_process_greedy_tokens(
    gemma3_gguf: Path, model: Model, tmp_path: Path, transport: str
) -> None:
    """Layers 0-5, 6-11 and 12-17 on three in-process workers on 127.0.0.1 (f32 on the
    wire), chained and star, with and without speculation."""
    checks.check_mesh_gives_the_one_process_tokens(
        gemma3_gguf, ["0-5", "6-11", "12-17"], tmp_path, prompt="Write a short poem about the sea.", local=model,
        transport=transport,
    )
