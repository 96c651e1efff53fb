"""The checks every model family's tests run, as plain functions taking what differs between
families (checkpoint, prompt, bounds, layer splits). Each family's test file keeps its own
test names and parameters, and the docstrings that say why its bounds are what they are.

The tiny fixtures (tests/fixtures/tiny_*.py) all store transformers' logits for tiny_llama's
PREFILL_IDS (every position) and then DECODE_IDS (one step each) in reference_logits.npz.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from meshpy.errors import CheckpointFormatError
from meshpy.generation import Model
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from tests.fixtures.tiny_llama import DECODE_IDS, PREFILL_IDS

# f32 weights, f32 arithmetic on both sides: differences are rounding order only.
LOGIT_ATOL = 1e-4

# f16 keys and values (the default cache of checkpoints that are not f32) against f32 ones:
# relative RMS logit error, measured 3e-4 to 8e-4 on the tiny checkpoints and 1e-3 on SmolLM2
# and Gemma 3 270M over 402 positions (f16 keeps 11 significant bits).
F16_KV_MAX_REL_RMS = 2e-3

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None

_Test = TypeVar("_Test", bound=Callable[..., None])


def live_transformers(test: _Test) -> _Test:
    """Marks a test that compares live against transformers: `reference`, and skipped where
    torch or transformers is not installed."""
    skip = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="live comparison needs torch and transformers")
    return pytest.mark.reference(skip(test))


#: Logits of every prefill position (T, vocab), then of each decode step (steps, vocab).
Logits = tuple[np.ndarray, np.ndarray]


def with_config(src: Path, out_dir: Path, drop_none: bool = False, **changes: object) -> Path:
    """A copy of checkpoint `src` at `out_dir` with `changes` merged into its config.json; a
    None is written as null, or with `drop_none` every null key is left out."""
    shutil.copytree(src, out_dir)
    cfg = {**json.loads((out_dir / "config.json").read_text()), **changes}
    if drop_none:
        cfg = {k: v for k, v in cfg.items() if v is not None}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


def prefill_and_decode(model_dir: Path, n_spans: int = 1, device: str = "cpu") -> Logits:
    """Our logits for PREFILL_IDS, then for each of DECODE_IDS in the same session, with the
    layers on `device` (the torch path for any but "cpu")."""
    model = Model.load(model_dir, threads=2, n_spans=n_spans, device=device)
    session = model.new_session()
    prefill = model.logits_all(PREFILL_IDS, session)
    decode = np.stack([model.logits_all([t], session)[0] for t in DECODE_IDS])
    return prefill, decode


def stored_reference(model_dir: Path) -> Logits:
    """transformers' logits stored beside a tiny fixture."""
    ref = np.load(model_dir / "reference_logits.npz")
    return ref["prefill"], ref["decode"]


def assert_logits_close(got: Logits, want: Logits, atol: float = LOGIT_ATOL) -> None:
    """Prefill and decode logits equal to `atol`, absolute (no relative slack)."""
    for ours, theirs in zip(got, want, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)


def relative_rms(got: np.ndarray, ref: np.ndarray) -> float:
    """RMS logit error over the reference's spread (uncorrelated logits give ~1.4)."""
    return float(np.sqrt(((got - ref) ** 2).mean()) / ref.std())


def check_stored_reference(model_dir: Path, device: str = "cpu", n_spans: int = 1) -> None:
    """Prefill and decode steps give transformers' stored logits, in the stored shapes, with
    the layers on `device` cut into `n_spans` spans."""
    want = stored_reference(model_dir)
    got = prefill_and_decode(model_dir, n_spans, device)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert got[0].shape == want[0].shape == (len(PREFILL_IDS), vocab)
    assert got[1].shape == want[1].shape == (len(DECODE_IDS), vocab)
    assert_logits_close(got, want)


def check_live_transformers(model_dir: Path, reference_logits: Callable[[Path], Logits]) -> None:
    """A freshly built checkpoint gives transformers' logits, computed now."""
    assert_logits_close(prefill_and_decode(model_dir), reference_logits(model_dir))


def check_spans_give_the_same_tokens(
    model_dir: Path,
    n_spans: Sequence[int] = (2,),
    layers: Mapping[int, Sequence[range]] | None = None,
    one: Model | None = None,
    prompt: Sequence[int] = PREFILL_IDS[:24],
    n_tokens: int = 32,
) -> None:
    """Split into each of `n_spans` spans (cut where `layers` says, for the counts it names),
    the model gives one span's greedy tokens and bit-equal prompt logits. `one` is the
    one-span model if already loaded."""
    if one is None:
        one = Model.load(model_dir, threads=2, n_spans=1)
    prompt = list(prompt)
    tokens = list(one.generate_ids(prompt, n_tokens))
    assert len(tokens) > 0
    for n in n_spans:
        many = Model.load(model_dir, threads=2, n_spans=n)
        if layers is not None and n in layers:
            assert [s.layers for s in many.pipeline.spans] == list(layers[n])
        assert list(many.generate_ids(prompt, n_tokens)) == tokens
        np.testing.assert_array_equal(one.logits_all(prompt), many.logits_all(prompt))


def check_quantize_on_load(model_dir: Path, quant: str, max_rel_rms: float) -> None:
    """Float matrices converted to `quant` at load stay within `max_rel_rms` of the stored
    prefill logits, and do change them (an unconverted matrix would not)."""
    ref = stored_reference(model_dir)[0]
    got = Model.load(model_dir, threads=2, quantize=quant).logits_all(PREFILL_IDS)
    rel_rms = relative_rms(got, ref)
    print(f"\n{model_dir.name} {quant}: relative RMS logit error {rel_rms:.3f}")
    assert rel_rms < max_rel_rms, f"{quant}: relative RMS logit error {rel_rms:.3f}"
    assert not np.array_equal(got, ref), f"{quant}: weights were not converted"


def check_an_unused_tensor_is_refused(model_dir: Path, out_dir: Path, name: str, shape: tuple[int, ...]) -> None:
    """A copy of `model_dir` at `out_dir` with one more tensor, `name`, that no role of the
    layer takes: reading its config refuses it, naming it."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, out_dir / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=name):
        read_config(open_model_source(out_dir))


def as_bf16_checkpoint(src: Path, out: Path, widen: bool) -> Path:
    """A copy of `src` with every tensor rounded to bfloat16 (truncated, as
    tests/test_checkpoint.py writes it): stored as BF16, or widened back to F32 when `widen`
    (the same values in f32, the comparison's baseline)."""
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


def check_bf16_equals_its_values_in_f32(model_dir: Path, tmp_path: Path, q8_max_rel_rms: float | None = None) -> None:
    """The bf16 copy gives the logits of its values widened to f32, to LOGIT_ATOL, with f32 KV
    caches on both (what is checked is reading bf16 weights; a bf16 checkpoint's default f16
    cache rounds keys and values); its default cache stays within F16_KV_MAX_REL_RMS of that. With `q8_max_rel_rms`, Q8_0 on load from bf16 stays
    within that relative RMS of them."""
    bf16_dir = as_bf16_checkpoint(model_dir, tmp_path / "bf16", widen=False)
    f32_dir = as_bf16_checkpoint(model_dir, tmp_path / "f32", widen=True)
    ref = Model.load(f32_dir, threads=2).logits_all(PREFILL_IDS)
    bf16 = Model.load(bf16_dir, threads=2, kv_dtype="f32")
    np.testing.assert_allclose(bf16.logits_all(PREFILL_IDS), ref, atol=LOGIT_ATOL, rtol=0)
    default = Model.load(bf16_dir, threads=2)
    assert default.pipeline.spans[0].kv_dtype == "f16"
    assert relative_rms(default.logits_all(PREFILL_IDS), ref) < F16_KV_MAX_REL_RMS
    if q8_max_rel_rms is not None:
        q8 = Model.load(bf16_dir, threads=2, quantize="Q8_0").logits_all(PREFILL_IDS)
        rel_rms = relative_rms(q8, ref)
        assert 0 < rel_rms < q8_max_rel_rms, f"Q8_0 from bf16: relative RMS logit error {rel_rms:.4f}"


def check_mesh_gives_the_one_process_tokens(
    model_dir: Path,
    layers: Sequence[str],
    node_dir: Path,
    prompt: str = "Pipeline parallel inference",
    n_tokens: int = 24,
    local: Model | None = None,
    transport: str = "tcp",
    devices: Sequence[str] | None = None,
    end_device: str = "cpu",
) -> None:
    """One in-process worker per `layers` spec ("0-1": layers 0 and 1) on 127.0.0.1 over
    `transport`, each on its `devices` entry (default "cpu"; the torch path for others): f32
    hidden states on the wire, so the greedy tokens equal one process's (`local`, or the
    model loaded with one thread on the CPU path) exactly, on the chained route and on the
    star one, step by step and with speculative decoding. `end_device`: where the End node's
    embedding and head run."""
    from meshpy.mesh import Worker, WorkerSettings, connect
    from meshpy.mesh.launcher import LocalMesh
    from tests.test_mesh import greedy

    local = local if local is not None else Model.load(model_dir, threads=1)
    want = greedy(local, prompt, n_tokens)
    ranges = [range(int(first), int(last) + 1) for first, last in (spec.split("-") for spec in layers)]
    with LocalMesh(transport=transport) as mesh, ExitStack() as workers:
        addr = mesh.start_bootstrap()
        started = [
            workers.enter_context(Worker(WorkerSettings(
                bootstrap=addr, model=model_dir, layers=spec, threads=1, node_dir=node_dir / spec,
                port=0, host="127.0.0.1", transport=transport, device=device,
            )))
            for spec, device in zip(layers, devices or ["cpu"] * len(layers), strict=True)
        ]
        assert [w.layers for w in started] == ranges
        with connect(model_dir, addr, threads=1, route_timeout=30, transport=transport, device=end_device) as model:
            assert [h.layers for h in model.pipeline.route()] == ranges
            for route in ("chain", "star"):
                model.pipeline.route_mode = route
                assert greedy(model, prompt, n_tokens) == want, route
                assert model.speculation
                got = list(model.generate_ids(model.encode(prompt), n_tokens))  # may stop at end of turn
                assert got and got == want[: len(got)], route


def check_a_batch_equals_each_session_alone(model_dir: Path, layers: range) -> None:
    """Two sessions' prefills (20 and 7 random rows of the span's input width) in one forward
    call, then a batched decode step: each session's output equals its own run, bit for bit
    (every row's products are independent of the rows beside it)."""
    from meshpy import _native
    from meshpy.pipeline import LocalSpan

    source = open_model_source(model_dir)
    span = LocalSpan(source, read_config(source), layers, _native.ThreadPool(2)).native
    rng = np.random.default_rng(0)
    width = span.row_width_in
    a, b = (rng.standard_normal((n, width)).astype(np.float32) for n in (20, 7))
    steps = rng.standard_normal((2, 1, width)).astype(np.float32)
    alone = []
    for prompt, step in zip((a, b), steps):
        cache = span.new_cache(64)
        alone.append((span.forward(prompt, cache), span.forward(step, cache)))
    caches = [span.new_cache(64), span.new_cache(64)]
    prefill = span.forward_batch(np.concatenate([a, b]), [(caches[0], 20), (caches[1], 7)])
    decode = span.forward_batch(np.concatenate(list(steps)), [(caches[0], 1), (caches[1], 1)])
    np.testing.assert_array_equal(prefill[:20], alone[0][0])
    np.testing.assert_array_equal(prefill[20:], alone[1][0])
    np.testing.assert_array_equal(decode[:1], alone[0][1])
    np.testing.assert_array_equal(decode[1:], alone[1][1])
