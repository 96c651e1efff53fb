"""The Qwen2 and Qwen3 span forward (the Llama layer with q/k/v biases, q/k norms and its own
head_dim) against transformers on tiny random f32 checkpoints (tests/fixtures/tiny_qwen.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.errors import CheckpointFormatError
from meshpy.generation import Model
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.pipeline import LocalSpan
from tests.conftest import DATA
from tests.fixtures import tiny_qwen
from tests.test_llama_forward import HAVE_TRANSFORMERS, LOGIT_ATOL

VARIANTS = list(tiny_qwen.VARIANTS)


def ours(model_dir: Path, n_spans: int = 1) -> tuple[np.ndarray, np.ndarray]:
    model = Model.load(model_dir, threads=2, n_spans=n_spans)
    session = model.new_session()
    prefill = model.logits_all(tiny_qwen.PREFILL_IDS, session)
    decode = np.stack([model.logits_all([t], session)[0] for t in tiny_qwen.DECODE_IDS])
    return prefill, decode


def test_config_names_the_optional_tensors() -> None:
    qwen2 = read_config(open_model_source(DATA / "tiny-qwen2"))
    assert qwen2.architecture == "Qwen2ForCausalLM"
    assert qwen2.layer_names(1)["attn_q_bias"] == "model.layers.1.self_attn.q_proj.bias"
    assert {"attn_k_bias", "attn_v_bias"} <= set(qwen2.layer_names(0))
    assert "attn_q_norm" not in qwen2.layer_names(0)
    assert qwen2.output_name == "lm_head.weight"
    assert not qwen2.rope_interleaved
    # YaRN, factor 4: transformers' attention factor 0.1 ln 4 + 1 on cos/sin.
    assert qwen2.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1.0)

    qwen3 = read_config(open_model_source(DATA / "tiny-qwen3-tied"))
    assert (qwen3.hidden, qwen3.n_heads, qwen3.head_dim) == (64, 4, 32)
    assert qwen3.attn_scale == pytest.approx(32**-0.5)
    assert qwen3.layer_names(2)["attn_k_norm"] == "model.layers.2.self_attn.k_norm.weight"
    assert "attn_q_bias" not in qwen3.layer_names(0)
    assert qwen3.output_name == "model.embed_tokens.weight"
    np.testing.assert_allclose(qwen3.rope_inv_freq[1], 1e6 ** (-2 / 32), rtol=1e-6)


def test_sliding_window_layers_from_max_window_layers() -> None:
    """Qwen2Config: with use_sliding_window, layers from max_window_layers on slide."""
    cfg = read_config(open_model_source(DATA / "tiny-qwen2-swa"))
    assert cfg.layer_sliding == (False, True, True)
    assert cfg.sliding_window == 16
    np.testing.assert_array_equal(cfg.rope_local_inv_freq, cfg.rope_inv_freq)
    # Without use_sliding_window the window is ignored, as Qwen2Config does.
    assert read_config(open_model_source(DATA / "tiny-qwen2")).layer_sliding == ()


def test_the_window_matters(tmp_path: Path) -> None:
    """Dropping the window changes the logits from position 16 on, and only there."""
    model_dir = tmp_path / "no-window"
    shutil.copytree(DATA / "tiny-qwen2-swa", model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": False, "layer_types": None}))
    windowed = Model.load(DATA / "tiny-qwen2-swa", threads=2).logits_all(tiny_qwen.PREFILL_IDS)
    full = Model.load(model_dir, threads=2).logits_all(tiny_qwen.PREFILL_IDS)
    np.testing.assert_allclose(windowed[:16], full[:16], atol=1e-5, rtol=0)
    assert np.abs(windowed[16:] - full[16:]).max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    model_dir = DATA / variant
    ref = np.load(model_dir / "reference_logits.npz")
    prefill, decode = ours(model_dir)
    assert prefill.shape == ref["prefill"].shape
    assert decode.shape == (16, ref["prefill"].shape[1])
    np.testing.assert_allclose(prefill, ref["prefill"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode, ref["decode"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.reference
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="live comparison needs torch and transformers")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_qwen.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    ref_prefill, ref_decode = tiny_qwen.reference_logits(model_dir)
    prefill, decode = ours(model_dir)
    np.testing.assert_allclose(prefill, ref_prefill, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(decode, ref_decode, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_spans_give_the_same_greedy_tokens(variant: str) -> None:
    one = Model.load(DATA / variant, threads=2, n_spans=1)
    two = Model.load(DATA / variant, threads=2, n_spans=2)
    assert [s.layers for s in two.pipeline.spans] == [range(0, 2), range(2, 3)]
    prompt = tiny_qwen.PREFILL_IDS[:24]
    a = list(one.generate_ids(prompt, 32))
    b = list(two.generate_ids(prompt, 32))
    assert len(a) > 0
    assert a == b
    np.testing.assert_array_equal(one.logits_all(prompt), two.logits_all(prompt))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("quant", "max_rel_rms"), [("Q8_0", 0.06), ("Q4_0", 0.5)])
def test_quantize_on_load_stays_close(variant: str, quant: str, max_rel_rms: float) -> None:
    """Float matrices converted at load: relative RMS logit error, with the tiny Llama's bounds
    (tests/test_llama_forward.py; an unconverted or mis-converted matrix gives ~1.4). Biases
    and norms stay f32. Measured: Q8_0 0.020 / 0.025, Q4_0 0.30 / 0.37 (Qwen2 / Qwen3)."""
    ref = np.load(DATA / variant / "reference_logits.npz")["prefill"]
    model = Model.load(DATA / variant, threads=2, quantize=quant)
    got = model.logits_all(tiny_qwen.PREFILL_IDS)
    rel_rms = float(np.sqrt(((got - ref) ** 2).mean()) / ref.std())
    print(f"\n{variant} {quant}: relative RMS logit error {rel_rms:.3f}")
    assert rel_rms < max_rel_rms, f"{quant}: relative RMS logit error {rel_rms:.3f}"
    assert not np.array_equal(got, ref), f"{quant}: weights were not converted"


# HF name pieces -> llama.cpp's (convert_hf_to_gguf.py's tensor map for qwen2 / qwen3).
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model_dir: Path, out: Path) -> Path:
    """The HF checkpoint as llama.cpp's converter writes it for qwen2 / qwen3: `blk.N.*` names,
    q/k rows NOT permuted (llama.cpp runs these archs with NeoX, rotate-half RoPE), f32."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    for name, t in sorted(load_file(model_dir / "model.safetensors").items()):
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{GGUF_NAMES[rest]}"
        w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_layout_matches_the_hf_layout(tmp_path: Path, variant: str) -> None:
    """The GGUF path (qwen2 / qwen3 metadata keys, `blk.N.*` names, rotate-half RoPE) gives the
    HF path's logits, and transformers' where no RoPE scaling is configured. Embedding, spans
    and head run directly: the tiny GGUF carries no tokenizer. GGUF YaRN is refused (not
    checked yet), so the checkpoint's scaling is dropped on both sides."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(DATA / variant, hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    scaled = cfg["rope_parameters"].get("rope_type", "default") != "default" or cfg.get("use_sliding_window")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    # llama.cpp's qwen2 / qwen3 GGUFs carry no sliding window: dropped on both sides too.
    cfg.update(use_sliding_window=False, layer_types=None)
    (hf_dir / "config.json").write_text(json.dumps(cfg))

    source = open_model_source(write_gguf(hf_dir, tmp_path / f"{variant}.gguf"))
    config = read_config(source)
    assert config.architecture == tiny_qwen.VARIANTS[variant][0].lower()
    assert not config.rope_interleaved
    pool = _native.ThreadPool(2)
    spans = [LocalSpan(source, config, r, pool) for r in (range(0, 1), range(1, 3))]
    caches = [s.native.new_cache(256) for s in spans]
    embedding = _native.TokenEmbedding(source.checkpoint, config.embedding_name, config.embedding_scale)
    head = _native.OutputHead(source.checkpoint, config.output_norm_name, config.output_name, config.eps, pool)

    def logits(ids: list[int]) -> np.ndarray:
        hidden = embedding.lookup(ids)
        for span, cache in zip(spans, caches):
            hidden = span.native.forward(hidden, cache)
        return head.logits(hidden)

    prefill = logits(tiny_qwen.PREFILL_IDS)
    decode = np.stack([logits([t])[0] for t in tiny_qwen.DECODE_IDS])
    hf_prefill, hf_decode = ours(hf_dir)
    np.testing.assert_allclose(prefill, hf_prefill, atol=1e-5, rtol=0)
    np.testing.assert_allclose(decode, hf_decode, atol=1e-5, rtol=0)
    if not scaled:
        ref = np.load(DATA / variant / "reference_logits.npz")
        np.testing.assert_allclose(prefill, ref["prefill"], atol=LOGIT_ATOL, rtol=0)
        np.testing.assert_allclose(decode, ref["decode"], atol=LOGIT_ATOL, rtol=0)


def test_gguf_yarn_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "yarn.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointFormatError, match="rope scaling 'yarn'"):
        read_config(open_model_source(path))


def test_a_tensor_no_role_takes_is_refused(tmp_path: Path) -> None:
    """An o_proj bias (Qwen3 with attention_bias) is not in this layer: refused, named."""
    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "qwen3-obias"
    shutil.copytree(DATA / "tiny-qwen3-tied", model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="model.layers.1.self_attn.o_proj.bias"):
        read_config(open_model_source(model_dir))


@pytest.mark.timeout(120)
def test_two_workers_through_the_mesh_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """Qwen3 (q/k norms, head_dim != hidden / heads, tied head) split over two in-process
    workers on 127.0.0.1: f32 hidden states on the wire, so the tokens equal exactly."""
    from meshpy.mesh import Worker, WorkerSettings, connect
    from meshpy.mesh.launcher import LocalMesh
    from tests.test_mesh import greedy

    model_dir = DATA / "tiny-qwen3-tied"
    local = greedy(Model.load(model_dir, threads=1), "Pipeline parallel inference", 24)
    node = dict(port=0, host="127.0.0.1", transport="tcp")
    with LocalMesh(transport="tcp") as mesh:
        addr = mesh.start_bootstrap()
        settings = [WorkerSettings(bootstrap=addr, model=model_dir, layers=layers, threads=1,
                                   node_dir=tmp_path / layers, **node) for layers in ("0-1", "2-2")]
        with Worker(settings[0]) as first, Worker(settings[1]) as second:
            assert (first.layers, second.layers) == (range(0, 2), range(2, 3))
            with connect(model_dir, addr, threads=1, route_timeout=30) as model:
                assert [h.layers for h in model.pipeline.route()] == [range(0, 2), range(2, 3)]
                assert greedy(model, "Pipeline parallel inference", 24) == local


def _as_bf16_checkpoint(src: Path, out: Path, widen: bool) -> Path:
    """A copy of `src` with every tensor rounded to bfloat16 (truncated, as
    tests/test_checkpoint.py writes it): stored as BF16, or widened back to F32 when `widen`
    (the same values in f32, the comparison's baseline). Real Qwen checkpoints ship bf16."""
    from safetensors.numpy import load_file

    from tests.test_checkpoint import _bf16, _write_safetensors

    shutil.copytree(src, out)
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        raw = _bf16(t)
        if widen:
            raw = (np.frombuffer(raw, "<u2").astype("<u4") << 16).tobytes()
        tensors[name] = ("F32" if widen else "BF16", t.shape, raw)
    _write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_checkpoint_equals_its_values_in_f32(tmp_path: Path, variant: str) -> None:
    """bf16 weights (biases and q/k norms included, read as f32 vectors) give the logits of
    the same values widened to f32, to 1e-4 (measured: bit-equal); Q8_0 on load from bf16
    stays within the f32 checkpoint's Q8_0 bound (measured ~0.02 relative RMS)."""
    bf16_dir = _as_bf16_checkpoint(DATA / variant, tmp_path / "bf16", widen=False)
    f32_dir = _as_bf16_checkpoint(DATA / variant, tmp_path / "f32", widen=True)
    ref = Model.load(f32_dir, threads=2).logits_all(tiny_qwen.PREFILL_IDS)
    got = Model.load(bf16_dir, threads=2).logits_all(tiny_qwen.PREFILL_IDS)
    np.testing.assert_allclose(got, ref, atol=LOGIT_ATOL, rtol=0)
    q8 = Model.load(bf16_dir, threads=2, quantize="Q8_0").logits_all(tiny_qwen.PREFILL_IDS)
    rel_rms = float(np.sqrt(((q8 - ref) ** 2).mean()) / ref.std())
    assert 0 < rel_rms < 0.06, f"Q8_0 from bf16: relative RMS logit error {rel_rms:.4f}"
