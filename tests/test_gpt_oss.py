"""gpt-oss (attention sinks, q/k/v/o biases, alternating sliding layers, YaRN, a mixture of
biased experts with top-k-softmax routing and a clamped SwiGLU) against transformers on tiny
random f32 checkpoints (tests/fixtures/tiny_gpt_oss.py), as HF and as a GGUF written the way
llama.cpp's converter writes it, split into spans and over mesh workers, and against live
llama.cpp."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from tests import family_checks as checks
from tests.conftest import DATA
from tests.fixtures import llama_gguf, tiny_gpt_oss
from tests.fixtures.llama_gguf import gguf_logits

VARIANTS = list(tiny_gpt_oss.VARIANTS)

def test_config_reads_the_layer_types_and_the_router() -> None:
    cfg = read_config(open_model_source(DATA / "tiny-gpt-oss-notrunc"))
    assert cfg.architecture == "GptOssForCausalLM"
    assert cfg.layer_sliding == (True, False, True) and cfg.sliding_window == 16
    # Sliding layers rotate with the global YaRN table and its attention factor.
    assert cfg.rope_local_inv_freq is None and cfg.rope_attention_factor == pytest.approx(1 + 0.1 * np.log(4.0))
    assert cfg.moe is not None
    assert (cfg.moe.n_experts, cfg.moe.n_experts_used, cfg.moe.expert_gating) == (8, 2, "topk_softmax")
    assert cfg.moe.swiglu_clamp == (1.702, 7.0)
    names = cfg.layer_names(1)
    assert names["attn_sinks"] == "model.layers.1.self_attn.sinks"
    assert names["ffn_gate_up_exps_t"] == "model.layers.1.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    """A 96-token prefill and 16 decode steps through the HF layout (experts transposed and
    de-interleaved at load). Measured: 4e-6."""
    checks.check_stored_reference(DATA / variant)


@checks.live_transformers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_gpt_oss.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    checks.check_live_transformers(model_dir, tiny_gpt_oss.reference_logits)


def test_yarn_truncation_matters() -> None:
    """The two variants differ only in whether YaRN's correction range is cut to whole dims;
    their logits differ by far more than the tolerance, so each test above checks it."""
    trunc, whole = (checks.stored_reference(DATA / v)[0] for v in VARIANTS)
    assert np.abs(trunc - whole).max() > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_and_three_spans_give_the_same_greedy_tokens(variant: str) -> None:
    checks.check_spans_give_the_same_tokens(
        DATA / variant, n_spans=(2, 3), layers={2: [range(0, 2), range(2, 3)], 3: [range(0, 1), range(1, 2), range(2, 3)]}
    )


@pytest.mark.timeout(120)
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """Sliding and global layers split over two in-process workers on 127.0.0.1: f32 hidden
    states on the wire, so the tokens equal exactly."""
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-gpt-oss-notrunc", ["0-0", "1-2"], tmp_path)


def test_an_unknown_tensor_is_refused(tmp_path: Path) -> None:
    """A q/k norm gpt-oss does not have would never run: refused, named."""
    checks.check_an_unused_tensor_is_refused(
        DATA / "tiny-gpt-oss", tmp_path / "extra-norm", "model.layers.1.self_attn.q_norm.weight", (16,)
    )


@pytest.mark.parametrize(("quant", "max_rel_rms"), [("Q8_0", 0.1), ("Q4_0", 0.6)])
def test_quantize_on_load_stays_close(quant: str, max_rel_rms: float) -> None:
    """The transposed experts are converted at load like any float matrix: relative RMS
    logit error with bounds about twice the measured Q8_0 0.045 and Q4_0 0.25 (a routing
    choice flipped by rounding moves a token's output more than in a dense model)."""
    checks.check_quantize_on_load(DATA / "tiny-gpt-oss", quant, max_rel_rms)


def test_mxfp4_safetensors_load_as_mxfp4_blocks(tmp_path: Path) -> None:
    """The released checkpoints' MXFP4 experts (`_blocks` / `_scales`) load as GGUF MXFP4
    blocks with no value changed: the logits equal those of a twin whose experts hold the
    same values dequantized (by gguf-py) in f32, to activation rounding (meshpy's A16),
    measured 2.7e-4; placement counts the raw blocks' bytes."""
    from meshpy.mesh.placement import layer_nbytes

    mxfp4 = tiny_gpt_oss.as_mxfp4_checkpoint(DATA / "tiny-gpt-oss-notrunc", tmp_path / "mxfp4")
    twin = tiny_gpt_oss.as_mxfp4_checkpoint(DATA / "tiny-gpt-oss-notrunc", tmp_path / "twin", dequantized=True)
    source = open_model_source(mxfp4)
    config = read_config(source)
    assert config.layer_names(0)["ffn_gate_up_exps_blocks"] == "model.layers.0.mlp.experts.gate_up_proj_blocks"
    assert source.checkpoint.tensor_info("model.layers.0.mlp.experts.down_proj_scales") == ("U8", (8, 64, 1))
    f32_layer = layer_nbytes(open_model_source(twin), read_config(open_model_source(twin)), 0)
    experts_f32 = 8 * (64 * 64 + 32 * 64) * 4
    assert layer_nbytes(source, config, 0) == f32_layer - experts_f32 + experts_f32 // 4 // 32 * 17
    checks.assert_logits_close(checks.prefill_and_decode(mxfp4), checks.prefill_and_decode(twin), atol=2e-3)
    # The model's id covers the raw blocks too.
    from meshpy.mesh.identity import model_manifest

    blocks = model_manifest(source)["tensors"]["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks["type"] == "U8" and blocks["shape"] == [8, 64, 2, 16] and len(blocks["sha256"]) == 64


@checks.live_transformers
def test_mxfp4_safetensors_match_live_transformers(tmp_path: Path) -> None:
    """transformers' own MXFP4 decoding of the same checkpoint gives the same logits, to
    activation rounding: an independent check of the nibble order, the exponent and which
    rows are gate and up. Measured 2.7e-4."""
    mxfp4 = tiny_gpt_oss.as_mxfp4_checkpoint(DATA / "tiny-gpt-oss-notrunc", tmp_path / "mxfp4")
    checks.assert_logits_close(checks.prefill_and_decode(mxfp4), tiny_gpt_oss.mxfp4_reference_logits(mxfp4), atol=2e-3)


# HF name pieces -> llama.cpp's (gguf-py's tensor map for gpt-oss).
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}


def write_gguf(model_dir: Path, out: Path, vocab: bool = False, experts: str = "F32") -> Path:
    """The HF checkpoint as llama.cpp's converter writes it for gpt-oss (conversion/gpt_oss.py,
    GptOssModel.modify_tensors, for experts not in MXFP4): `down_proj` transposed to
    `ffn_down_exps`, `gate_up_proj` transposed and its alternating rows split into
    `ffn_gate_exps` / `ffn_up_exps` (biases likewise), sinks as `attn_sinks.weight`, the
    gpt-oss keys (YaRN type, factor and original context; sliding window; experts), f32.
    `vocab` adds a placeholder vocabulary so llama.cpp will load the file. `experts` "MXFP4"
    stores the expert matrices as the released files do, quantized by gguf-py; "MXFP4-f32"
    stores those MXFP4 values dequantized by gguf-py, as f32."""
    import gguf
    from gguf.quants import dequantize, quantize
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "gpt-oss")
    llama_gguf.add_hf_shape(w, cfg)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    llama_gguf.add_rope_scaling(w, cfg["rope_parameters"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    if vocab:
        llama_gguf.add_placeholder_vocab(w, cfg["vocab_size"])
    for name, t in sorted(load_file(model_dir / "model.safetensors").items()):
        layer = name.removeprefix("model.layers.").split(".", 1)[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            t = t.swapaxes(-1, -2)
            out_tensors = {"ffn_gate_exps.weight": t[:, ::2, :], "ffn_up_exps.weight": t[:, 1::2, :]}
        elif name.endswith("mlp.experts.gate_up_proj_bias"):
            out_tensors = {"ffn_gate_exps.bias": t[:, ::2], "ffn_up_exps.bias": t[:, 1::2]}
        elif name.endswith("mlp.experts.down_proj"):
            out_tensors = {"ffn_down_exps.weight": t.swapaxes(-1, -2)}
        elif name.endswith("mlp.experts.down_proj_bias"):
            out_tensors = {"ffn_down_exps.bias": t}
        else:
            w.add_tensor(llama_gguf.gguf_name(name, GGUF_NAMES), np.ascontiguousarray(t, dtype=np.float32))
            continue
        for gname, data in out_tensors.items():
            data = np.ascontiguousarray(data, dtype=np.float32)
            mxfp4 = gguf.GGMLQuantizationType.MXFP4
            if experts == "MXFP4" and gname.endswith(".weight"):
                w.add_tensor(f"blk.{layer}.{gname}", quantize(data, mxfp4), raw_dtype=mxfp4)
            elif experts == "MXFP4-f32" and gname.endswith(".weight"):
                w.add_tensor(f"blk.{layer}.{gname}", dequantize(quantize(data, mxfp4), mxfp4).astype(np.float32))
            else:
                w.add_tensor(f"blk.{layer}.{gname}", data)
    llama_gguf.finish(w)
    return out


def test_gguf_layout_matches_transformers(tmp_path: Path) -> None:
    """The GGUF path (gpt-oss keys and names, the converter's split experts, llama.cpp's
    YaRN) gives transformers' logits for the variant whose YaRN range is truncated as llama.cpp
    computes it. Embedding, spans and head run directly: the tiny GGUF carries no tokenizer."""
    path = write_gguf(DATA / "tiny-gpt-oss", tmp_path / "gpt-oss.gguf")
    config = read_config(open_model_source(path))
    assert config.architecture == "gpt-oss"
    assert config.layer_sliding == (True, False, True) and config.sliding_window == 16
    assert config.moe is not None and config.moe.expert_gating == "topk_softmax"
    checks.assert_logits_close(gguf_logits(path), checks.stored_reference(DATA / "tiny-gpt-oss"))


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_gguf_logits_equal_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp runs the same GGUF (f32 KV cache, token ids fed directly) to the same logits:
    an independent check of the sinks, biases, router, clamped SwiGLU, sliding pattern and
    YaRN from the GGUF keys."""
    path = write_gguf(DATA / "tiny-gpt-oss", tmp_path / "m.gguf", vocab=True)
    theirs = llama_gguf.llama_cpp_logits(path, tiny_gpt_oss.PREFILL_IDS + tiny_gpt_oss.DECODE_IDS)
    ours = np.concatenate(gguf_logits(path))
    np.testing.assert_allclose(ours, theirs, atol=checks.LOGIT_ATOL, rtol=0)


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_mxfp4_experts_equal_llama_cpp_on_their_dequantized_values(tmp_path: Path) -> None:
    """Expert matrices in MXFP4, as the released GGUFs hold them (gguf-py's quantizer), run on
    the repacked MXFP4 kernels give the logits llama.cpp computes from the same values
    dequantized by gguf-py to f32: only activation rounding differs (meshpy's 16-bit A16
    activations), measured 3.5e-4. llama.cpp's own MXFP4 path, which rounds activations to
    Q8_0, moves further from those values (measured max 3.4, relative RMS 0.073: a routing
    choice flips at some positions), so it gets a looser check."""
    mxfp4 = write_gguf(DATA / "tiny-gpt-oss", tmp_path / "mxfp4.gguf", vocab=True, experts="MXFP4")
    twin = write_gguf(DATA / "tiny-gpt-oss", tmp_path / "mxfp4-f32.gguf", vocab=True, experts="MXFP4-f32")
    assert open_model_source(mxfp4).checkpoint.tensor_info("blk.0.ffn_up_exps.weight")[0] == "MXFP4"
    ids = tiny_gpt_oss.PREFILL_IDS + tiny_gpt_oss.DECODE_IDS
    ours = np.concatenate(gguf_logits(mxfp4))
    np.testing.assert_allclose(ours, llama_gguf.llama_cpp_logits(twin, ids), atol=2e-3, rtol=0)
    assert checks.relative_rms(ours, llama_gguf.llama_cpp_logits(mxfp4, ids)) < 0.15
