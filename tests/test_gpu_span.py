"""The torch span (python/meshpy/gpu/span.py) on torch's CPU device against the CPU span
(rust/src/model/decoder.rs) it mirrors, on every tiny checkpoint: the same rows in, prefill
then decode steps, sessions batched together, splits into layer ranges (also inside Gemma 4's
KV-sharing groups, where keys and values cross the boundary in the rows), f16 KV caches, bf16
weights, and the KV store's fork, hand-over (read_rows / write_rows) and freeing."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.end_model import EndModel
from meshpy.models.config import ModelConfig, read_config
from meshpy.models.source import ModelSource, open_model_source
from meshpy.pipeline import LocalSpan
from tests.conftest import DATA
from tests.family_checks import relative_rms

torch = pytest.importorskip("torch")
from meshpy.gpu.span import TorchSpan  # noqa: E402  (needs torch)

CHECKPOINTS = sorted(p.name for p in DATA.glob("tiny-*") if (p / "config.json").exists())

# f32 weights and f32 arithmetic on both sides: differences are rounding order only (oneDNN's
# sgemm against our kernels, SDPA against attention.rs, libm against the vector exp), grown
# through the layers. Measured over every checkpoint and step below (f32 KV): relative RMS error
# (`relative_rms`: RMS error over the output's spread) 4e-7 to 3e-6, largest element error
# 6e-7 to 7e-6 of the largest output; tiny-gemma4-ple 8.7e-6 and 7.3e-5, its random layers
# amplifying (a 1e-7 relative change of its input moves the CPU's own output by 1e-5).
F32_MAX_REL_RMS = 3e-5
F32_MAX_ERR = 3e-4

# f16 KV caches on both paths: the same rounding, but a key or value whose f32 inputs differ
# in the last bit may round to the neighbouring f16 value (2^-11 relative) and the layers
# after amplify it (the CPU path moves as much under a 1e-7 change of its input). Measured:
# relative RMS 8e-7 (gpt-oss) to 4.6e-4 (tiny-gemma4), largest element error up to 1.04e-3.
F16_KV_MAX_REL_RMS = 1.5e-3
F16_KV_MAX_ERR = 3e-3

# bf16 weight matrices and matmul inputs (8 significant bits) against the CPU's f32 path:
# relative RMS error over the steps of SCHEDULE (f32 KV), measured per checkpoint. One layer
# alone gives 4e-3 to 9e-3; where a token's router logits, moved by the rounding, choose
# another expert, its whole output differs (tiny-gpt-oss, tiny-gemma4-moe: one such token):
# those get twice the margin.
BF16_MEASURED = {
    "tiny-gemma3": 8.6e-3,
    "tiny-gemma4": 2.6e-2,
    "tiny-gemma4-moe": 9.5e-2,
    "tiny-gemma4-ple": 4.0e-2,
    "tiny-gpt-oss": 1.23e-1,
    "tiny-gpt-oss-notrunc": 1.7e-2,
    "tiny-llama": 1.6e-2,
    "tiny-llama-linear": 1.3e-2,
    "tiny-llama-yarn": 1.7e-2,
    "tiny-llama3-tied": 1.4e-2,
    "tiny-mistral": 1.4e-2,
    "tiny-phi3": 1.5e-2,
    "tiny-phi3-mini": 1.7e-2,
    "tiny-qwen2": 1.2e-2,
    "tiny-qwen2-swa": 1.1e-2,
    "tiny-qwen3-moe": 1.7e-2,
    "tiny-qwen3-moe-mixed": 9.0e-3,
    "tiny-qwen3-tied": 1.3e-2,
}
BF16_ROUTER_FLIPS = {"tiny-gpt-oss", "tiny-gemma4-moe"}

#: Forward calls as (session, new tokens) per sequence: a session alone (prefill of 5, three
#: decode steps), then two batched together with different lengths, the longer one (104)
#: past every sliding window (8 to 24) and Phi-3's LongRoPE switch at position 100.
SCHEDULE: list[list[tuple[int, int]]] = [[(0, 5)], [(0, 1)], [(0, 1)], [(0, 1)], [(1, 5), (2, 104)]] + [[(1, 1), (2, 1)]] * 3


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch's threads and the CPU span's pool spin against each other on a small machine;
    these shapes are tiny, so one torch thread runs the file twice as fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def pool() -> _native.ThreadPool:
    return _native.ThreadPool(2)


@functools.cache
def model(name: str) -> tuple[ModelSource, ModelConfig, EndModel]:
    source = open_model_source(DATA / name)
    config = read_config(source)
    return source, config, EndModel(source, config, pool())


@functools.cache
def cpu_span(name: str, start: int, stop: int, kv_dtype: str | None = None) -> LocalSpan:
    source, config, _ = model(name)
    return LocalSpan(source, config, range(start, stop), pool(), kv_dtype=kv_dtype)


def torch_span(name: str, span: LocalSpan, dtype: torch.dtype = torch.float32, kv_dtype: str | None = None) -> TorchSpan:
    return TorchSpan(span.native, model(name)[1].span_config(None, kv_dtype), "cpu", dtype)


def embedded(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows entering layer 0 for `n` random tokens, as the End model makes them (Gemma 4's
    per-layer inputs included): the magnitudes a span really sees."""
    end = model(name)[2]
    return end.embed(rng.integers(0, end.embedding.vocab, n).tolist())


class Runner:
    """Runs the same forward calls through CPU spans (one KvCache per session) and torch spans
    (one slot per session), each path feeding its own outputs on to its next range."""

    def __init__(self, cpu: Sequence[LocalSpan], gpu: Sequence[tuple[TorchSpan, tuple[int, int]]]) -> None:
        self.cpu, self.gpu = list(cpu), list(gpu)
        self.caches: dict[int, list[_native.KvCache]] = {}
        self.positions: dict[int, int] = {}

    def step(self, rows: np.ndarray, seqs: Sequence[tuple[int, int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One call of `seqs` (session, n_tokens); the rows leaving every range, CPU and torch."""
        for session, _ in seqs:
            if session not in self.caches:
                self.caches[session] = [span.new_cache(256) for span in self.cpu]
                self.positions[session] = 0
        want, got = [], []
        hidden = rows
        for i, span in enumerate(self.cpu):
            hidden = span.native.forward_batch(hidden, [(self.caches[s][i], n) for s, n in seqs])
            want.append(hidden)
        hidden = rows
        for i, (span, layers) in enumerate(self.gpu):
            slots = [(100 * i + s, self.positions[s], n) for s, n in seqs]
            hidden = span.forward(hidden, slots, layers, [])
            got.append(hidden)
        for s, n in seqs:
            self.positions[s] += n
        return want, got


def run_schedule(name: str, runner: Runner, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(CPU, torch) rows leaving each range, per call of SCHEDULE."""
    rng = np.random.default_rng(seed)
    out = []
    for seqs in SCHEDULE:
        want, got = runner.step(embedded(name, sum(n for _, n in seqs), rng), seqs)
        out += list(zip(want, got))
    return out


def errors(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Largest relative RMS error, and largest element error over the largest output."""
    rms = max(relative_rms(got, want) for want, got in pairs)
    worst = max(float(np.abs(got - want).max() / np.abs(want).max()) for want, got in pairs)
    return rms, worst


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("kv_dtype", [None, "f16"])
def test_prefill_decode_and_batches_equal_the_cpu_span(name: str, kv_dtype: str | None) -> None:
    n_layers = model(name)[1].n_layers
    cpu = cpu_span(name, 0, n_layers, kv_dtype)
    gpu = torch_span(name, cpu, kv_dtype=kv_dtype)
    assert gpu.kv_dtype == cpu.kv_dtype == (kv_dtype or "f32")
    rms, worst = errors(run_schedule(name, Runner([cpu], [(gpu, (0, n_layers))])))
    max_rms, max_err = (F32_MAX_REL_RMS, F32_MAX_ERR) if kv_dtype is None else (F16_KV_MAX_REL_RMS, F16_KV_MAX_ERR)
    print(f"\n{name} kv {gpu.kv_dtype}: relative RMS {rms:.2e}, largest {worst:.2e}")
    assert rms < max_rms and worst < max_err, (rms, worst)


#: Where each checkpoint is cut: in the middle; Gemma 4 E2B-style at 3 (between the sources 1,
#: 2 and their sharers 3..5, whose keys and values cross in the rows) and at 2 and 4 (source 1
#: before the first cut, source 2 inside the middle range, sharers on both sides of 4).
SPLITS = [(name, (model(name)[1].n_layers // 2,)) for name in CHECKPOINTS if name != "tiny-gemma4-ple"] + [
    ("tiny-gemma4-ple", (3,)),
    ("tiny-gemma4-ple", (2, 4)),
]


@pytest.mark.parametrize(("name", "cuts"), SPLITS, ids=[f"{name}-{'-'.join(map(str, cuts))}" for name, cuts in SPLITS])
def test_a_split_into_layer_ranges_equals_the_cpu_spans(name: str, cuts: tuple[int, ...]) -> None:
    """The torch span of all layers run as ranges (a slot per range) and torch spans loaded
    from each CPU range give what the CPU ranges give, at every boundary."""
    n_layers = model(name)[1].n_layers
    bounds = [0, *cuts, n_layers]
    ranges = list(zip(bounds, bounds[1:]))
    cpu = [cpu_span(name, a, b) for a, b in ranges]
    whole = torch_span(name, cpu_span(name, 0, n_layers))
    for gpu in ([(whole, r) for r in ranges], [(torch_span(name, c), (0, b - a)) for c, (a, b) in zip(cpu, ranges)]):
        pairs = run_schedule(name, Runner(cpu, gpu))
        widths = [_native.row_width(model(name)[1].span_config(), b) for b in bounds[1:]]
        assert [want.shape[1] for want, _ in pairs[: len(ranges)]] == widths
        rms, worst = errors(pairs)
        assert rms < F32_MAX_REL_RMS and worst < F32_MAX_ERR, (rms, worst)


def test_keys_and_values_crossing_a_split_are_rounded_to_the_f16_cache() -> None:
    """Split inside the KV-sharing group with f16 caches: the carried keys and values leave as
    the cache stores them (f16 values), as the CPU's do."""
    name, d = "tiny-gemma4-ple", 64
    cpu = [cpu_span(name, 0, 3, "f16"), cpu_span(name, 3, 6, "f16")]
    gpu = [(torch_span(name, c, kv_dtype="f16"), (0, 3)) for c in cpu]
    pairs = run_schedule(name, Runner(cpu, gpu))
    for want, got in pairs[::2]:  # the rows leaving layer 2
        carried = got[:, d + 3 * 8 :]
        np.testing.assert_array_equal(carried, carried.astype(np.float16).astype(np.float32))
    rms, worst = errors(pairs)
    assert rms < F16_KV_MAX_REL_RMS and worst < F16_KV_MAX_ERR, (rms, worst)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_bf16_weights_stay_near_the_cpu_f32_path(name: str) -> None:
    n_layers = model(name)[1].n_layers
    cpu = cpu_span(name, 0, n_layers)
    gpu = torch_span(name, cpu, torch.bfloat16)
    assert gpu._layers[0].w["attn_q"].dtype == torch.bfloat16 and gpu._layers[0].w["attn_norm"].dtype == torch.float32
    assert 0.5 * cpu.native.nbytes < gpu.nbytes < 0.6 * cpu.native.nbytes  # matrices halved, the rest f32
    pairs = run_schedule(name, Runner([cpu], [(gpu, (0, n_layers))]))
    rms = float(np.sqrt(np.mean([relative_rms(got, want) ** 2 for want, got in pairs])))
    print(f"\n{name} bf16: relative RMS {rms:.2e}")
    assert rms < BF16_MEASURED[name] * (2.0 if name in BF16_ROUTER_FLIPS else 1.5)


@pytest.mark.parametrize("name", ["tiny-gemma4-ple", "tiny-gpt-oss", "tiny-mistral"])
def test_a_fork_continues_as_its_source_and_a_retry_rewrites(name: str) -> None:
    """A slot forked at the source's length continues bit-equal to it; one forked at fewer
    positions, and a source stepping again from an earlier position (a retry after the
    caller truncated), equal the CPU's fork and truncate."""
    n_layers = model(name)[1].n_layers
    cpu = cpu_span(name, 0, n_layers, "f16")
    gpu = torch_span(name, cpu, kv_dtype="f16")
    layers = (0, n_layers)
    rng = np.random.default_rng(1)
    prompt, step, tail = embedded(name, 12, rng), embedded(name, 1, rng), embedded(name, 3, rng)
    cache = cpu.new_cache(64)
    cpu.native.forward(prompt, cache)
    gpu.forward(prompt, [(0, 0, 12)], layers, [])

    gpu.fork(0, 1, 12, layers)
    np.testing.assert_array_equal(gpu.forward(step, [(1, 12, 1)], layers, []), gpu.forward(step, [(0, 12, 1)], layers, []))

    short = cache.fork(9)
    gpu.fork(0, 2, 9, layers)
    want = cpu.native.forward(tail, short)
    got = gpu.forward(tail, [(2, 9, 3)], layers, [])
    np.testing.assert_allclose(got, want, rtol=0, atol=F16_KV_MAX_ERR * np.abs(want).max())

    cache.truncate(10)
    want = cpu.native.forward(tail, cache)
    got = gpu.forward(tail, [(0, 10, 3)], layers, [])
    np.testing.assert_allclose(got, want, rtol=0, atol=F16_KV_MAX_ERR * np.abs(want).max())


@pytest.mark.parametrize(("name", "kv_dtype"), [("tiny-gemma4-ple", "f16"), ("tiny-gpt-oss", None)])
def test_rows_read_from_one_slot_and_written_to_another_continue_identically(name: str, kv_dtype: str | None) -> None:
    """A session handed over: every cache layer's keys and values read (in the KV dtype) and
    written into a fresh slot, which then steps bit-equal to the source. Over layers 3..6 of
    the E2B-style Gemma 4, whose cache layers are the mirrors of sources 1 and 2."""
    n_layers = model(name)[1].n_layers
    layers = (3, 6) if name == "tiny-gemma4-ple" else (0, n_layers)
    gpu = torch_span(name, cpu_span(name, 0, n_layers, kv_dtype), kv_dtype=kv_dtype)
    config = model(name)[1].span_config(None, kv_dtype)
    rng = np.random.default_rng(2)
    width = _native.row_width(config, layers[0])
    prompt, step = (rng.standard_normal((n, width)).astype(np.float32) for n in (20, 1))
    gpu.forward(prompt, [(5, 0, 20)], layers, [])
    widths = gpu.cache_widths(layers)
    assert widths == ([16, 32] if name == "tiny-gemma4-ple" else [32, 32, 32])
    dtype = np.dtype("float16" if kv_dtype else "float32")
    for layer, w in enumerate(widths):
        assert [a.shape for a in gpu.read_rows(9, layers, layer, 0, 0)] == [(0, w), (0, w)]  # a slot never used
        keys, values = gpu.read_rows(5, layers, layer, 0, 20)
        assert keys.shape == values.shape == (20, w) and keys.dtype == values.dtype == dtype
        # As the Rust side passes them: read-only arrays over the bytes.
        keys, values = (np.frombuffer(a.tobytes(), dtype).reshape(-1, w) for a in (keys, values))
        gpu.write_rows(6, layers, layer, 0, keys, values)
    np.testing.assert_array_equal(gpu.forward(step, [(6, 20, 1)], layers, []), gpu.forward(step, [(5, 20, 1)], layers, []))


def test_freed_slots_are_dropped_and_their_ids_reusable() -> None:
    name = "tiny-llama"
    gpu = torch_span(name, cpu_span(name, 0, 3))
    rng = np.random.default_rng(3)
    prompt = embedded(name, 6, rng)
    first = gpu.forward(prompt, [(7, 0, 6)], (0, 3), [])
    gpu.forward(embedded(name, 1, rng), [(8, 0, 1)], (0, 3), [7])
    with pytest.raises(ValueError, match="slot 7"):
        gpu.read_rows(7, (0, 3), 0, 0, 1)
    # A slot holds one layer range until freed; freed, its id serves another.
    with pytest.raises(ValueError, match="slot 8 holds layers 0..3"):
        gpu.forward(prompt[:, :64], [(8, 1, 6)], (1, 3), [])
    gpu.forward(prompt, [(8, 0, 6)], (1, 3), [8])  # freed and reused in the same call
    # A fresh cache under a freed id: the first run's output again.
    np.testing.assert_array_equal(gpu.forward(prompt, [(7, 0, 6)], (0, 3), []), first)


def test_a_gguf_llama_rotates_adjacent_pairs(tmp_path: Path) -> None:
    """GGUF Llama's permuted q/k rows rotate pairs (2i, 2i+1) (`rope_interleaved`), here with a
    sliding window of 6 written into the file."""
    pytest.importorskip("gguf")
    from tests.fixtures.llama_gguf import write_llama_gguf

    source = open_model_source(write_llama_gguf(DATA / "tiny-llama", tmp_path / "tiny.gguf", sliding_window=6))
    config = read_config(source)
    assert config.rope_interleaved
    cpu = LocalSpan(source, config, range(config.n_layers), pool())
    gpu = TorchSpan(cpu.native, config.span_config(), "cpu", torch.float32)
    runner = Runner([cpu], [(gpu, (0, config.n_layers))])
    rng = np.random.default_rng(4)
    pairs = []
    for seqs in SCHEDULE:
        rows = rng.standard_normal((sum(n for _, n in seqs), config.hidden)).astype(np.float32)
        pairs += list(zip(*runner.step(rows, seqs)))
    rms, worst = errors(pairs)
    assert rms < F32_MAX_REL_RMS and worst < F32_MAX_ERR, (rms, worst)


def test_equal_router_logits_choose_the_lower_experts() -> None:
    """As moe.rs `equal_logits_choose_the_lower_experts`: ties go to the lower expert, each
    row's experts come in ascending order, with their renormalized weights."""
    from meshpy.gpu.span import _Moe, _route

    moe = _Moe(n_experts=128, n_used=2, norm_topk_prob=True, topk_softmax=False, swiglu_clamp=None)
    logits = torch.zeros(3, 128)
    logits[1, [90, 7, 64]] = 3.0
    logits[2, [100, 5]] = torch.tensor([2.0, 1.0])
    chosen, weight = _route(logits, moe)
    assert chosen.tolist() == [[0, 1], [7, 64], [5, 100]]
    assert weight[:2].tolist() == [[0.5, 0.5], [0.5, 0.5]]
    np.testing.assert_allclose(weight[2].numpy(), [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)
