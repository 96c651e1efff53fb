"""Qwen3-MoE (the Qwen3 layer with a mixture-of-experts MLP, rust/src/model/moe.rs) against
transformers on tiny random f32 checkpoints (tests/fixtures/tiny_qwen_moe.py), split into spans
and over mesh workers, as GGUF written the way llama.cpp's converter writes it, and against live
llama.cpp."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.mesh.placement import layer_nbytes
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.pipeline import LocalSpan
from tests import family_checks as checks
from tests.conftest import DATA
from tests.fixtures import llama_gguf, tiny_qwen_moe
from tests.fixtures.llama_gguf import gguf_logits
from tests.test_qwen import GGUF_NAMES as QWEN_GGUF_NAMES

VARIANTS = list(tiny_qwen_moe.VARIANTS)


def test_config_reads_the_experts_and_names_each_layer_s_tensors() -> None:
    cfg = read_config(open_model_source(DATA / "tiny-qwen3-moe-mixed"))
    assert cfg.architecture == "Qwen3MoeForCausalLM"
    assert (cfg.moe.n_experts, cfg.moe.n_experts_used, cfg.moe.norm_topk_prob) == (8, 3, False)
    moe_layer = cfg.layer_names(0)
    assert moe_layer["ffn_gate_inp"] == "model.layers.0.mlp.gate.weight"
    assert moe_layer["ffn_down_exps.7"] == "model.layers.0.mlp.experts.7.down_proj.weight"
    assert "ffn_gate" not in moe_layer and "attn_q_norm" in moe_layer
    # mlp_only_layers: layer 1 keeps a dense MLP.
    assert cfg.layer_names(1)["ffn_gate"] == "model.layers.1.mlp.gate_proj.weight"
    assert "ffn_gate_inp" not in cfg.layer_names(1)
    span = cfg.span_config()
    assert (span["n_experts"], span["n_experts_used"], span["norm_topk_prob"]) == (8, 3, False)


def test_a_layer_s_bytes_count_every_expert(tmp_path: Path) -> None:
    """Placement weighs a layer by all of its experts (a worker must hold every one: any token
    may pick any), from the HF per-expert tensors and from the GGUF's stacked ones alike; the
    loaded span holds that much."""
    from safetensors.numpy import load_file

    tensors = load_file(DATA / "tiny-qwen3-moe" / "model.safetensors")
    stored = sum(t.nbytes for name, t in tensors.items() if name.startswith("model.layers.0."))
    experts = sum(t.nbytes for name, t in tensors.items() if name.startswith("model.layers.0.mlp.experts."))
    assert experts == 8 * 3 * 32 * 64 * 4
    for path in (DATA / "tiny-qwen3-moe", write_gguf(DATA / "tiny-qwen3-moe", tmp_path / "moe.gguf")):
        source = open_model_source(path)
        config = read_config(source)
        assert layer_nbytes(source, config, 0) == stored
        span = LocalSpan(source, config, range(0, 1), _native.ThreadPool(1)).native
        assert span.nbytes == stored


def test_a_config_without_experts_runs_as_dense_qwen3(tmp_path: Path) -> None:
    """Qwen3MoeConfig with no expert layers (transformers then builds every MLP dense): the
    tiny dense Qwen3 under that architecture gives its Qwen3 logits exactly."""
    model_dir = checks.with_config(
        DATA / "tiny-qwen3-tied", tmp_path / "no-experts", architectures=["Qwen3MoeForCausalLM"], num_experts=0
    )
    config = read_config(open_model_source(model_dir))
    assert config.architecture == "Qwen3MoeForCausalLM" and config.moe is None
    np.testing.assert_array_equal(
        checks.prefill_and_decode(model_dir)[0], checks.prefill_and_decode(DATA / "tiny-qwen3-tied")[0]
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    """A 96-token prefill and 16 decode steps. Measured: 5e-6."""
    checks.check_stored_reference(DATA / variant)


@checks.live_transformers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_qwen_moe.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    checks.check_live_transformers(model_dir, tiny_qwen_moe.reference_logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_and_three_spans_give_the_same_greedy_tokens(variant: str) -> None:
    checks.check_spans_give_the_same_tokens(
        DATA / variant, n_spans=(2, 3), layers={2: [range(0, 2), range(2, 3)], 3: [range(0, 1), range(1, 2), range(2, 3)]}
    )


def test_a_batch_of_sessions_equals_each_session_alone() -> None:
    """Two sessions' prefills in one forward call, their rows regrouped by expert together,
    then a batched decode step: each session's output equals its own run, bit for bit (every
    row's products are independent of the rows beside it)."""
    checks.check_a_batch_equals_each_session_alone(DATA / "tiny-qwen3-moe", range(0, 3))


@pytest.mark.timeout(120)
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """A dense layer between expert layers, split over two in-process workers on 127.0.0.1:
    f32 hidden states on the wire, so the tokens equal exactly."""
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-qwen3-moe-mixed", ["0-1", "2-2"], tmp_path)


def test_an_expert_tensor_no_role_takes_is_refused(tmp_path: Path) -> None:
    """A ninth expert the config does not count would never run: refused, named."""
    checks.check_an_unused_tensor_is_refused(
        DATA / "tiny-qwen3-moe", tmp_path / "extra-expert", "model.layers.2.mlp.experts.8.up_proj.weight", (32, 64)
    )


# HF name pieces -> llama.cpp's (convert_hf_to_gguf.py's tensor map for qwen3moe).
GGUF_NAMES = {**QWEN_GGUF_NAMES, "mlp.gate.weight": "ffn_gate_inp.weight"}
_EXPERT_PIECES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf(model_dir: Path, out: Path, vocab: bool = False) -> Path:
    """The HF checkpoint as llama.cpp's converter writes it for qwen3moe (conversion/qwen.py,
    Qwen2MoeModel.modify_tensors): each layer's experts stacked into one `[n_expert, rows,
    cols]` tensor per matrix, `blk.N.*` names, the expert keys, f32. `vocab` adds a placeholder
    vocabulary so llama.cpp will load the file."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    llama_gguf.add_hf_shape(w, cfg)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if vocab:
        llama_gguf.add_placeholder_vocab(w, cfg["vocab_size"])
    tensors = load_file(model_dir / "model.safetensors")
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, t in sorted(tensors.items()):
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            j, piece, _ = rest.split(".")
            layer = prefix.removeprefix("model.layers.")
            experts.setdefault(f"blk.{layer}.{_EXPERT_PIECES[piece]}.weight", {})[int(j)] = t
            continue
        w.add_tensor(llama_gguf.gguf_name(name, GGUF_NAMES), np.ascontiguousarray(t, dtype=np.float32))
    for gname, by_expert in sorted(experts.items()):
        w.add_tensor(gname, np.ascontiguousarray(np.stack([by_expert[j] for j in sorted(by_expert)]), dtype=np.float32))
    llama_gguf.finish(w)
    return out


def test_gguf_layout_matches_the_hf_layout(tmp_path: Path) -> None:
    """The GGUF path (qwen3moe keys, stacked experts split per expert at load, `blk.N.*`
    names) gives transformers' logits. Embedding, spans and head run directly: the tiny GGUF
    carries no tokenizer."""
    path = write_gguf(DATA / "tiny-qwen3-moe", tmp_path / "moe.gguf")
    config = read_config(open_model_source(path))
    assert config.architecture == "qwen3moe"
    assert config.moe is not None and config.moe.norm_topk_prob
    assert config.layer_names(1)["ffn_up_exps"] == "blk.1.ffn_up_exps.weight"
    checks.assert_logits_close(gguf_logits(path), checks.stored_reference(DATA / "tiny-qwen3-moe"))


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_gguf_logits_equal_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp runs the same GGUF (f32 KV cache, token ids fed directly) to the same logits:
    an independent check of the router, the top-k choice, the renormalized weights and the
    stacked expert layout."""
    path = write_gguf(DATA / "tiny-qwen3-moe", tmp_path / "m.gguf", vocab=True)
    theirs = llama_gguf.llama_cpp_logits(path, tiny_qwen_moe.PREFILL_IDS + tiny_qwen_moe.DECODE_IDS)
    ours = np.concatenate(gguf_logits(path))
    np.testing.assert_allclose(ours, theirs, atol=checks.LOGIT_ATOL, rtol=0)
