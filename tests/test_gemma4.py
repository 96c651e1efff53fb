"""Gemma 4 (python/meshpy/models/gemma4.py on the decoder span of rust/src/model/decoder.rs)
against transformers on tiny random f32 checkpoints (tests/fixtures/tiny_gemma4.py): the dense
31B-style model (wider global heads, `attention_k_eq_v`, proportional RoPE, `layer_scalar`,
soft-capped logits), the E2B-style one (per-layer inputs, KV-shared layers, the double-wide
MLP) and the 26B-A4B-style one (experts beside the dense MLP), split into spans (also inside a
KV-sharing group) and over mesh workers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.models import gemma4
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.pipeline import LocalSpan
from tests import family_checks as checks
from tests.conftest import DATA
from tests.fixtures import llama_gguf, tiny_gemma4
from tests.fixtures.llama_gguf import gguf_logits

VARIANTS = ["tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma4-moe"]


def test_config_reads_the_global_layers_own_shapes_and_rope() -> None:
    cfg = read_config(open_model_source(DATA / "tiny-gemma4"))
    assert cfg.architecture == "Gemma4ForCausalLM"
    assert (cfg.head_dim, cfg.global_head_dim, cfg.n_kv_heads, cfg.global_n_kv_heads) == (16, 32, 2, 1)
    assert cfg.attn_scale == 1.0 and cfg.v_norm and cfg.norm_offset == 0.0 and cfg.final_logit_softcap == 5.0
    assert cfg.layer_sliding == (True, True, False, True, False)
    # attention_k_eq_v: a global layer has no v_proj (values are the keys' projection).
    assert "attn_v" not in cfg.layer_names(2) and cfg.layer_names(1)["attn_v"].endswith("v_proj.weight")
    assert cfg.layer_names(0)["layer_output_scale"] == "model.layers.0.layer_scalar"
    # Proportional RoPE: a quarter of the global head's pairs rotate, over the whole head's
    # exponent (theta^(-2i/32)); the sliding layers rotate all 8 of theirs.
    np.testing.assert_allclose(cfg.rope_inv_freq[:4], 1e6 ** (-np.arange(0, 8, 2) / 32), rtol=1e-6)
    assert cfg.rope_inv_freq.size == 16 and not cfg.rope_inv_freq[4:].any()
    np.testing.assert_allclose(cfg.rope_local_inv_freq, 1e4 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    assert cfg.row_widths == (64,) * 6


def test_kv_sharing_and_per_layer_inputs_set_what_crosses_each_boundary() -> None:
    """The last 3 layers share the last earlier layer of their type (transformers'
    `store_full_length_kv`: sliding 1, global 2), own no k/v tensors, and their MLPs are twice
    as wide. A boundary's rows carry the hidden state, the per-layer inputs of the layers
    after it, and the sources' keys and values that layers after it share."""
    source = open_model_source(DATA / "tiny-gemma4-ple")
    cfg = read_config(source)
    assert cfg.kv_source == (None, None, None, 1, 1, 2)
    assert "attn_k" not in cfg.layer_names(3) and "attn_k_norm" not in cfg.layer_names(5)
    assert cfg.per_layer_input == 8
    assert cfg.layer_names(0)["ple_gate"] == "model.layers.0.per_layer_input_gate.weight"
    sliding_kv, global_kv = 2 * 16, 2 * 32  # keys and values of one KV head of 16 / of 32
    assert cfg.row_widths == (
        64 + 6 * 8,
        64 + 5 * 8,
        64 + 4 * 8 + sliding_kv,
        64 + 3 * 8 + sliding_kv + global_kv,
        64 + 2 * 8 + sliding_kv + global_kv,
        64 + 1 * 8 + global_kv,
        64,
    )
    assert gemma4.kv_sources((True, False, True, False, True, False), 2) == (None, None, None, None, 2, 3)
    pool = _native.ThreadPool(1)
    # A span of the sharing layers keeps a mirror of each source (f32 here), no cache of its own.
    tail = LocalSpan(source, cfg, range(3, 6), pool)
    assert tail.new_cache(8).bytes_per_position == (sliding_kv + global_kv) * 4
    whole = LocalSpan(source, cfg, range(0, 6), pool)
    assert whole.new_cache(8).bytes_per_position == (sliding_kv + sliding_kv + global_kv) * 4
    assert (whole.native.row_width_in, whole.native.row_width_out) == (112, 64)
    with pytest.raises(ValueError, match="rows of width 184"):
        tail.forward(np.zeros((2, 112), np.float32), tail.new_cache(8))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stored_transformers_reference(variant: str) -> None:
    """A 96-token prefill (past the window of 8) and 16 decode steps, against transformers
    run in float64 (see tiny_gemma4.reference_logits). Measured: 1.2e-5 (tiny-gemma4), 3.0e-5
    (-ple), 9.8e-6 (-moe); against transformers' float32 run, 2.9e-5 and 5.4e-5 for the first
    two."""
    checks.check_stored_reference(DATA / variant)


@checks.live_transformers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_live_transformers(tmp_path: Path, seed: int, variant: str) -> None:
    model_dir = tiny_gemma4.build_checkpoint(tmp_path / "tiny", seed=seed, variant=variant)
    checks.check_live_transformers(model_dir, tiny_gemma4.reference_logits)


def test_config_reads_the_experts_beside_the_dense_mlp() -> None:
    cfg = read_config(open_model_source(DATA / "tiny-gemma4-moe"))
    assert cfg.moe is not None and (cfg.moe.n_experts, cfg.moe.n_experts_used, cfg.moe.norm_topk_prob) == (8, 2, True)
    layer = cfg.layer_names(3)
    assert layer["ffn_gate_up_exps"] == "model.layers.3.experts.gate_up_proj"
    assert layer["ffn_down_exps_scale"] == "model.layers.3.router.per_expert_scale"
    assert layer["ffn_gate"] == "model.layers.3.mlp.gate_proj.weight"  # the dense MLP runs too
    assert {"ffn_post_norm_1", "ffn_pre_norm_2", "ffn_post_norm_2", "ffn_post_norm"} <= set(layer)


def test_two_and_three_spans_give_the_same_greedy_tokens_also_inside_a_kv_sharing_group() -> None:
    """Cut at 3 (between the sources 1, 2 and their sharers 3..5) and at 2 and 4 (source 1
    before the cut, source 2 after; sharers on both sides of 4): the carried keys and values
    give bit-equal logits."""
    checks.check_spans_give_the_same_tokens(
        DATA / "tiny-gemma4-ple",
        n_spans=(2, 3),
        layers={2: [range(0, 3), range(3, 6)], 3: [range(0, 2), range(2, 4), range(4, 6)]},
    )
    checks.check_spans_give_the_same_tokens(DATA / "tiny-gemma4", n_spans=(2, 3))
    checks.check_spans_give_the_same_tokens(DATA / "tiny-gemma4-moe", n_spans=(2, 3))


@pytest.mark.parametrize(("variant", "layers"), [("tiny-gemma4-ple", range(3, 6)), ("tiny-gemma4-moe", range(0, 4))])
def test_a_batch_of_sessions_equals_each_session_alone(variant: str, layers: range) -> None:
    """Rows with per-layer inputs, through the KV-sharing layers (a mirror of each source
    filled from the carried columns), or through experts beside the dense MLP: two sessions in
    one call, bit-equal to each alone."""
    checks.check_a_batch_equals_each_session_alone(DATA / variant, layers)


@pytest.mark.timeout(180)
def test_workers_split_inside_a_kv_sharing_group_give_the_one_process_greedy_tokens(tmp_path: Path) -> None:
    """Over two and three in-process workers on 127.0.0.1 (chained and star routes,
    speculation): the frames carry the per-layer inputs and the shared keys and values, f32,
    so the tokens equal exactly."""
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-gemma4-ple", ["0-3", "4-5"], tmp_path / "two")
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-gemma4-ple", ["0-1", "2-4", "5-5"], tmp_path / "three")
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-gemma4-moe", ["0-1", "2-3"], tmp_path / "moe")


def test_a_global_layer_s_v_proj_is_refused_under_attention_k_eq_v(tmp_path: Path) -> None:
    """With `attention_k_eq_v` a global layer's values are its keys' projection: a v_proj
    there would never run, so it is refused, named."""
    checks.check_an_unused_tensor_is_refused(
        DATA / "tiny-gemma4", tmp_path / "extra-v", "model.layers.2.self_attn.v_proj.weight", (32, 64)
    )


def test_a_shared_layer_s_own_kv_tensors_are_ignored_as_transformers_ignores_them(tmp_path: Path) -> None:
    """transformers drops a KV-shared layer's k/v tensors at load
    (`_keys_to_ignore_on_load_unexpected`); so does meshpy: same logits."""
    from safetensors.numpy import load_file, save_file

    import shutil

    shutil.copytree(DATA / "tiny-gemma4-ple", tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.4.self_attn.k_proj.weight"] = np.ones((16, 64), np.float32)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    cfg = read_config(open_model_source(tmp_path / "m"))
    assert "attn_k" not in cfg.layer_names(4)
    checks.assert_logits_close(checks.prefill_and_decode(tmp_path / "m"), checks.stored_reference(DATA / "tiny-gemma4-ple"))


# HF name pieces -> llama.cpp's (conversion/gemma.py, Gemma4Model, and gguf-py's tensor map).
GGUF_NAMES = {
    **llama_gguf.GGUF_NAMES,
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
}
_GGUF_MODEL_NAMES = {
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}


#: Texts the GGUF tokenizer test encodes: spaces, newline runs, accents and CJK (characters
#: the tiny vocabulary lacks fall back to bytes), an emoji, and the chat format's tokens.
TOKENIZER_TEXTS = [
    "Pipeline parallel inference across machines",
    "  two  spaces\n\nand a blank line\n\n\n\nfour newlines",
    "héllo wörld, naïve café — 日本語のテキスト 🚀",
    "<|turn>user\nHello there<turn|>\n<|turn>model\n",
    "",
]


def gemma4_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A Gemma-4-style vocabulary of exactly `size` tokens (tokens, GGUF token types, merges),
    trained with the tokenizers library on the README: BPE over "▁"-escaped spaces, split at
    newline runs, byte-fallback `<0xXX>` tokens, Gemma's control tokens, the rest unused."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    base = special + [f"<0x{i:02X}>" for i in range(256)] + ["\n", "\n\n", "\n\n\n"]
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
    text = (Path(__file__).parents[1] / "README.md").read_text().splitlines(keepends=True)
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=size - 8, special_tokens=base, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id] + [f"<unused{i}>" for i in range(size - len(by_id))]
    types = [3 if t in special else 6 if t.startswith("<0x") else 5 if t.startswith("<unused") else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, types, merges


def write_gguf(model_dir: Path, out: Path, vocab: bool = False, tokenizer: bool = False) -> Path:
    """The HF checkpoint as llama.cpp's converter writes it for gemma4 (conversion/gemma.py,
    Gemma4Model over Gemma3Model and TextModel): norms unshifted, global head width as
    `key_length` and the sliding one as `key_length_swa`, per-layer KV heads when
    `num_global_key_value_heads` is set, per-layer MLP widths with the double-wide MLP, the
    sliding pattern as booleans, `rope_freqs.weight` of 1 for the rotated pairs and 1e30 for
    the others (the proportional RoPE), layer_scalar as `layer_output_scale.weight`, f32.
    `vocab` adds a placeholder vocabulary so llama.cpp will load the file."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    n_layers, types = cfg["num_hidden_layers"], cfg["layer_types"]
    swa = [t == "sliding_attention" for t in types]
    w = gguf.GGUFWriter(str(out), "gemma4")
    llama_gguf.add_hf_shape(w, cfg)
    n_shared = cfg.get("num_kv_shared_layers") or 0
    if cfg.get("use_double_wide_mlp"):
        n_ff = cfg["intermediate_size"]
        w.add_feed_forward_length([n_ff if i < n_layers - n_shared else 2 * n_ff for i in range(n_layers)])
    if cfg.get("num_global_key_value_heads") is not None:
        w.add_head_count_kv([cfg["num_key_value_heads"] if s else cfg["num_global_key_value_heads"] for s in swa])
    w.add_key_length(cfg["global_head_dim"])
    w.add_value_length(cfg["global_head_dim"])
    w.add_key_length_swa(cfg["head_dim"])
    w.add_value_length_swa(cfg["head_dim"])
    rope = cfg["rope_parameters"]
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_rope_dimension_count(cfg["global_head_dim"])
    w.add_rope_dimension_count_swa(cfg["head_dim"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(n_shared)
    w.add_embedding_length_per_layer_input(cfg.get("hidden_size_per_layer_input") or 0)
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("enable_moe_block"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["top_k_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if tokenizer:
        tokens, types, merges = gemma4_vocab(cfg["vocab_size"])
        w.add_tokenizer_model("gemma4")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_add_space_prefix(False)
        w.add_add_bos_token(True)
    elif vocab:
        llama_gguf.add_placeholder_vocab(w, cfg["vocab_size"])
    rotated = int(cfg["global_head_dim"] * rope["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (cfg["global_head_dim"] // 2 - rotated), np.float32))
    for name, t in sorted(load_file(model_dir / "model.safetensors").items()):
        if name in _GGUF_MODEL_NAMES:
            gname = _GGUF_MODEL_NAMES[name]
        else:
            gname = llama_gguf.gguf_name(name, GGUF_NAMES)
        w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
    llama_gguf.finish(w)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_layout_matches_the_hf_layout(tmp_path: Path, variant: str) -> None:
    """The GGUF path (gemma4 keys, llama.cpp's fixed KV-share mapping, rope_freqs as the
    proportional RoPE, fused stacked experts, `blk.N.*` names) gives transformers' logits."""
    path = write_gguf(DATA / variant, tmp_path / "g4.gguf")
    config = read_config(open_model_source(path))
    hf = read_config(open_model_source(DATA / variant))
    assert config.architecture == "gemma4"
    assert (config.kv_source, config.layer_sliding, config.global_head_dim) == (hf.kv_source, hf.layer_sliding, hf.global_head_dim)
    np.testing.assert_allclose(config.rope_inv_freq, hf.rope_inv_freq, rtol=1e-6, atol=1e-30)
    assert config.row_widths == hf.row_widths
    checks.assert_logits_close(gguf_logits(path), checks.stored_reference(DATA / variant))


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_logits_equal_llama_cpp(tmp_path: Path, variant: str) -> None:
    """llama.cpp runs the same GGUF (f32 KV cache, token ids fed directly) to the same logits
    within its own rounding: ggml's CPU GELU reads a float16 table (ggml-cpu/vec.h,
    GGML_GELU_FP16: x and gelu(x) both rounded to f16), which moves its logits up to 0.016
    from transformers' float64 ones here. meshpy is exactly as far from llama.cpp as
    transformers is (to 1e-4), every greedy token agrees, and the relative RMS is 0.0016 at
    most (measured: max |diff| 0.0139 / 0.0161 / 0.0105 for the three variants, transformers'
    0.0139 / 0.0161 / 0.0106)."""
    path = write_gguf(DATA / variant, tmp_path / "g4.gguf", vocab=True)
    theirs = llama_gguf.llama_cpp_logits(path, tiny_gemma4.PREFILL_IDS + tiny_gemma4.DECODE_IDS)
    ours = np.concatenate(gguf_logits(path))
    reference = np.concatenate(checks.stored_reference(DATA / variant))
    assert np.abs(ours - theirs).max() < 0.03
    assert np.abs(ours - theirs).max() <= np.abs(reference - theirs).max() + checks.LOGIT_ATOL
    assert checks.relative_rms(ours, theirs) < 0.003
    np.testing.assert_array_equal(ours.argmax(axis=1), theirs.argmax(axis=1))


def test_a_gguf_s_gemma4_tokenizer_escapes_spaces_keeps_newline_runs_and_round_trips(tmp_path: Path) -> None:
    from meshpy.tokenizer import Tokenizer

    path = write_gguf(DATA / "tiny-gemma4", tmp_path / "tok.gguf", tokenizer=True)
    tok = Tokenizer.from_gguf_metadata(open_model_source(path).metadata)
    pieces = lambda text: [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False)]  # noqa: E731
    assert tok.encode("", add_special_tokens=True) == [tok.bos_id]
    assert pieces("a\n\n\nb")[1:-1] == ["\n\n\n"]  # a newline run that is a token, whole
    joined = "".join(pieces("a b c"))
    assert " " not in joined and joined.count("\u2581") == 2  # spaces escaped, no prefix
    assert pieces("<|turn>user")[0] == "<|turn>"  # control tokens match whole
    assert "<0xF0>" in pieces("🚀")  # no such token: its bytes
    for text in TOKENIZER_TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.reference
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_a_gguf_s_gemma4_tokenizer_equals_llama_cpp_s(tmp_path: Path) -> None:
    """`tokenizer.ggml.model == "gemma4"` (python/meshpy/tokenizer/gguf_gemma4.py) gives
    llama.cpp's token ids for the same file, BOS added, and decodes them back to the text."""
    import llama_cpp

    from meshpy.tokenizer import Tokenizer

    path = write_gguf(DATA / "tiny-gemma4", tmp_path / "tok.gguf", tokenizer=True)
    ours = Tokenizer.from_gguf_metadata(open_model_source(path).metadata)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert ours.decode(ids[1:]) == text
    assert {ours.token_to_id("<turn|>"), ours.eos_id} <= ours.stop_ids
