"""meshpy._native quant bindings against gguf-py, the reference numpy implementation of
ggml's formats: dequantization bit-exact on every tensor type of both packaged models and on
random blocks of the types neither holds, quantization bit-exact where gguf-py quantizes, dot
products within stated bounds, GGUF files of every such type written by gguf-py."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.errors import ShapeError, UnsupportedTypeError
from tests.fixtures.llama_gguf import finish

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Tensor types each packaged model holds: the test fails if a file changes under us.
SMOLLM2_TYPES = {"F32", "Q4_1", "Q8_0"}
GEMMA3_TYPES = {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
# Tensors checked per type (spread over the file) and rows per tensor (head and tail).
TENSORS_PER_TYPE = 6
ROWS_PER_END = 96

# vec_dot(w, x) quantizes x (to meshpy's 16-bit A16 blocks for quantized weights) and so
# differs from the float dot of the dequantized row with x; relative to sum |w_i x_i| that
# error stays under this (A16: ~1.4e-6 on gaussian data, up to ~6e-6 on real rows; ggml's
# 8-bit activations: ~1e-3; F32/F16 weights use f32 activations: ~1e-8).
MAX_ACTIVATION_DOT_ERROR = 2e-5


def _gguf_name(qtype: gguf.GGMLQuantizationType) -> str:
    """ggml's spelling, which the bindings take ("Q4_K", "F32")."""
    return qtype.name


def _sample(tensors: list, k: int) -> list:
    """Up to k tensors spread evenly over the list (first and last included)."""
    if len(tensors) <= k:
        return tensors
    picks = np.linspace(0, len(tensors) - 1, k).round().astype(int)
    return [tensors[i] for i in sorted(set(picks))]


def _row_slices(data: np.ndarray) -> list[np.ndarray]:
    """Whole rows from a tensor's raw data: all of a small tensor, head and tail of a big one."""
    if data.ndim < 2 or data.shape[0] <= 2 * ROWS_PER_END:
        return [np.ascontiguousarray(data)]
    return [np.ascontiguousarray(data[:ROWS_PER_END]), np.ascontiguousarray(data[-ROWS_PER_END:])]


def _assert_same_bits(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    theirs = np.ascontiguousarray(theirs, dtype=np.float32).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape, what
    same = ours.view(np.uint32) == theirs.view(np.uint32)
    if not same.all():
        i = int(np.argmin(same))
        pytest.fail(f"{what}: {np.count_nonzero(~same)} elements differ, first at {i}: {ours[i]!r} vs {theirs[i]!r}")


# gguf.GGUFReader spends ~13 s parsing Gemma's 262k-token vocabulary.
@pytest.fixture(scope="module", params=["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def model(request: pytest.FixtureRequest) -> tuple[str, Path, set[str]]:
    if request.param == "smollm2":
        return "smollm2", request.getfixturevalue("smollm2_gguf"), SMOLLM2_TYPES
    return "gemma3", request.getfixturevalue("gemma3_gguf"), GEMMA3_TYPES


@pytest.fixture(scope="module")
def tensors_by_type(model: tuple[str, Path, set[str]]) -> dict[str, list]:
    _, path, _ = model
    by_type: dict[str, list] = defaultdict(list)
    for tensor in gguf.GGUFReader(path).tensors:
        by_type[_gguf_name(tensor.tensor_type)].append(tensor)
    return by_type


def test_models_hold_the_expected_types(model: tuple[str, Path, set[str]], tensors_by_type: dict[str, list]) -> None:
    name, _, expected = model
    assert set(tensors_by_type) == expected, name


def test_dequantize_real_tensors_bit_exact(model: tuple[str, Path, set[str]], tensors_by_type: dict[str, list]) -> None:
    """Every tensor type of the model, several tensors each, against gguf-py."""
    name, _, _ = model
    checked = 0
    for type_name, tensors in sorted(tensors_by_type.items()):
        for tensor in _sample(tensors, TENSORS_PER_TYPE):
            for rows in _row_slices(tensor.data):
                raw = rows.view(np.uint8)
                theirs = gguf.quants.dequantize(rows, tensor.tensor_type)
                ours = _native.dequantize(type_name, raw, theirs.size)
                _assert_same_bits(ours, theirs, f"{name} {tensor.name} ({type_name})")
                checked += theirs.size
    assert checked > 1_000_000, f"only {checked} elements checked"


def test_vec_dot_on_real_rows(model: tuple[str, Path, set[str]], tensors_by_type: dict[str, list]) -> None:
    """vec_dot of real weight rows with random activations, against numpy on the dequantized rows."""
    rng = np.random.default_rng(0)
    for type_name, tensors in sorted(tensors_by_type.items()):
        for tensor in _sample([t for t in tensors if t.data.ndim == 2], 3):
            rows = np.ascontiguousarray(tensor.data[:8])
            weights = gguf.quants.dequantize(rows, tensor.tensor_type)
            x = rng.standard_normal(weights.shape[1]).astype(np.float32)
            raw = rows.view(np.uint8).reshape(rows.shape[0], -1)
            for row, w in zip(raw, weights):
                exact = float(np.dot(w.astype(np.float64), x.astype(np.float64)))
                scale = float(np.abs(w.astype(np.float64) * x).sum())
                got = _native.vec_dot(type_name, row.tobytes(), x)
                assert abs(got - exact) <= MAX_ACTIVATION_DOT_ERROR * scale, f"{tensor.name}: {got} vs {exact}"


# --- Types neither model holds: synthetic data --------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantize_and_dequantize_match_gguf_numpy(qtype: gguf.GGMLQuantizationType) -> None:
    """Legacy block types: our quantizer gives gguf-py's bytes, and decodes them identically."""
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((16, 256)) * rng.uniform(1e-3, 10.0, (16, 1))).astype(np.float32)
    x[3] = 0.0  # all-zero blocks: scale 0
    x[5, :32] = 1.0  # constant block
    theirs = gguf.quants.quantize(x, qtype)
    ours = _native.quantize(_gguf_name(qtype), x.reshape(-1))
    assert ours == theirs.tobytes()
    _assert_same_bits(_native.dequantize(_gguf_name(qtype), ours, x.size), gguf.quants.dequantize(theirs, qtype), qtype.name)


def test_q4_0_random_blocks_bit_exact() -> None:
    """Q4_0 (in neither model) from random bytes: every nibble pattern, finite scales."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (512, 18), dtype=np.uint8)
    blocks[:, :2] = rng.uniform(-4.0, 4.0, (512, 1)).astype(np.float16).view(np.uint8)
    ours = _native.dequantize("Q4_0", blocks, 512 * 32)
    _assert_same_bits(ours, gguf.quants.dequantize(blocks, Q.Q4_0), "Q4_0")


# Block layouts of the types tested from random blocks: byte offsets of each block's f16
# scales, and the byte range of its packed sub-block scales (None: the type has none).
RANDOM_BLOCK_TYPES = {
    Q.Q5_1: ((0, 2), None),
    Q.Q2_K: ((80, 82), (0, 16)),
    Q.Q3_K: ((108,), (96, 108)),
    Q.Q5_K: ((0, 2), (4, 16)),
    Q.IQ4_NL: ((0,), None),
    Q.IQ4_XS: ((0,), (2, 8)),
    Q.MXFP4: ((), None),  # its scale is an E8M0 exponent byte (MXFP4_EXPONENTS)
}
# f16 scales every set of random blocks starts with: the largest finite, the smallest
# subnormal, the smallest normal, zeros of both signs, one.
EXTREME_HALVES = [65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14, 0.0, -0.0, 1.0]


# MXFP4 exponents every set of random blocks starts with: the subnormal scales (0, 1), the
# smallest normal one, the edges of what f16 holds exactly (104, 143), one (128), and the
# largest a 4096-element dot keeps finite in f32.
MXFP4_EXPONENTS = [0, 1, 2, 103, 104, 127, 128, 143, 144, 200]


def _random_blocks(qtype: gguf.GGMLQuantizationType, n_blocks: int, seed: int) -> np.ndarray:
    """(n_blocks, block bytes) well-formed blocks: random quant and sub-block scale bytes
    (every bit pattern), finite f16 scales of many magnitudes (EXTREME_HALVES first), and
    blocks 8..16 / 16..24 with every sub-block scale byte 0xFF / 0x00."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    halves, scale_bytes = RANDOM_BLOCK_TYPES[qtype]
    for at in halves:
        magnitude = 10.0 ** rng.uniform(-6, 3, n_blocks)
        d = (rng.standard_normal(n_blocks) * magnitude).astype(np.float16)
        d[: len(EXTREME_HALVES)] = EXTREME_HALVES
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    if qtype == Q.MXFP4:
        blocks[:, 0] = rng.integers(0, 201, n_blocks, dtype=np.uint8)
        blocks[: len(MXFP4_EXPONENTS), 0] = MXFP4_EXPONENTS
    if scale_bytes is not None:
        lo, hi = scale_bytes
        blocks[8:16, lo:hi] = 0xFF
        blocks[16:24, lo:hi] = 0x00
    return blocks


@pytest.mark.parametrize("qtype", list(RANDOM_BLOCK_TYPES), ids=lambda q: q.name)
def test_random_blocks_dequantize_bit_exact(qtype: gguf.GGMLQuantizationType) -> None:
    """Types neither model holds, from 4096 random blocks each, against gguf-py."""
    blocks = _random_blocks(qtype, 4096, int(qtype))
    theirs = gguf.quants.dequantize(blocks, qtype)
    assert np.isfinite(theirs).all()
    _assert_same_bits(_native.dequantize(_gguf_name(qtype), blocks, theirs.size), theirs, qtype.name)


@pytest.mark.parametrize("qtype", list(RANDOM_BLOCK_TYPES), ids=lambda q: q.name)
def test_random_blocks_vec_dot(qtype: gguf.GGMLQuantizationType) -> None:
    """vec_dot of random rows of 4096 elements, against numpy on gguf-py's dequantized rows."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    n_rows, per_row = 16, 4096 // block_size
    rows = _random_blocks(qtype, n_rows * per_row, 100 + int(qtype)).reshape(n_rows, -1)
    rng = np.random.default_rng(int(qtype))
    for row in rows:
        w = gguf.quants.dequantize(row, qtype).astype(np.float64)
        x = rng.standard_normal(w.size).astype(np.float32)
        exact = float(w @ x.astype(np.float64))
        got = _native.vec_dot(_gguf_name(qtype), row, x)
        assert abs(got - exact) <= MAX_ACTIVATION_DOT_ERROR * float(np.abs(w * x).sum()), f"{got} vs {exact}"


def test_gguf_file_of_every_random_block_type(tmp_path: Path) -> None:
    """A GGUF file written by gguf-py with one tensor of each type: it opens, names the
    types and shapes, and its bytes dequantize as gguf-py's do."""
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    written = {}
    for qtype in RANDOM_BLOCK_TYPES:
        rows = _random_blocks(qtype, 24 * 8, 200 + int(qtype)).reshape(24, -1)  # 24 rows of 8 blocks
        name = f"blk.0.{qtype.name.lower()}.weight"
        writer.add_tensor(name, rows, raw_dtype=qtype)
        written[name] = (qtype, rows)
    finish(writer)
    ckpt = _native.Checkpoint([path])
    for name, (qtype, rows) in written.items():
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = (rows.shape[0], rows.shape[1] // type_size * block_size)
        assert ckpt.tensor_info(name) == (_gguf_name(qtype), shape)
        data = ckpt.tensor_bytes(name)
        assert data == rows.tobytes()
        ours = _native.dequantize(ckpt.tensor_info(name)[0], data, shape[0] * shape[1])
        _assert_same_bits(ours, gguf.quants.dequantize(rows, qtype), name)


def test_f16_every_bit_pattern() -> None:
    """All 65536 halves; signalling NaNs come back as NaN (hardware F16C quiets them, numpy does not)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = _native.dequantize("F16", bits.tobytes(), bits.size)
    theirs = gguf.quants.dequantize(bits.view(np.uint8), Q.F16)
    signalling = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0) & ((bits & 0x0200) == 0)
    assert np.isnan(ours[signalling]).all()
    _assert_same_bits(ours[~signalling], theirs.reshape(-1)[~signalling], "F16")


def test_f16_and_bf16_quantize_match_numpy() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [rng.standard_normal(4096) * 100, [0.0, -0.0, np.inf, -np.inf, 1e-8, 65504.0, 65520.0, 1e-40, 3.0e38]]
    ).astype(np.float32)
    with np.errstate(over="ignore"):  # 65520 and 3e38 round to inf, as intended
        halves = x.astype(np.float16)
    assert _native.quantize("F16", x) == halves.tobytes()
    theirs_bf16 = gguf.quants.quantize(x, Q.BF16)
    assert _native.quantize("bf16", x) == theirs_bf16.tobytes()
    _assert_same_bits(_native.dequantize("BF16", theirs_bf16, x.size), gguf.quants.dequantize(theirs_bf16, Q.BF16), "BF16")
    nan = np.array([np.nan] * 32, dtype=np.float32)
    assert np.isnan(_native.dequantize("BF16", _native.quantize("BF16", nan), 32)).all()


def test_bf16_random_bit_patterns() -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 16, 4096, dtype=np.uint32).astype(np.uint16)
    _assert_same_bits(
        _native.dequantize("BF16", bits.tobytes(), bits.size),
        gguf.quants.dequantize(bits.view(np.uint8), Q.BF16),
        "BF16",
    )


def test_f32_round_trip() -> None:
    x = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    data = _native.quantize("F32", x)
    assert data == x.tobytes()
    _assert_same_bits(_native.dequantize("f32", data, x.size), x, "F32")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"])
def test_vec_dot_synthetic(type_name: str) -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal(4096).astype(np.float32)
    x = rng.standard_normal(4096).astype(np.float32)
    data = _native.quantize(type_name, w)
    wq = _native.dequantize(type_name, data, w.size).astype(np.float64)
    exact = float(wq @ x.astype(np.float64))
    got = _native.vec_dot(type_name, data, x)
    assert abs(got - exact) <= MAX_ACTIVATION_DOT_ERROR * float(np.abs(wq * x).sum())


# --- Errors and misc ----------------------------------------------------------------------


def test_errors_are_typed() -> None:
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        _native.dequantize("iq2_xxs", b"", 0)
    with pytest.raises(ValueError):  # UnsupportedTypeError is also a ValueError
        _native.dequantize("IQ2_XS", b"", 0)
    with pytest.raises(ShapeError):
        _native.dequantize("Q8_0", bytes(33), 32)
    with pytest.raises(ShapeError):
        _native.dequantize("Q8_0", bytes(34), 31)
    with pytest.raises(ShapeError):
        _native.quantize("Q4_0", np.zeros(33, dtype=np.float32))
    for type_name in ("Q4_K", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"):
        with pytest.raises(UnsupportedTypeError, match="Q5_1"):  # the message lists the targets
            _native.quantize(type_name, np.zeros(256, dtype=np.float32))
    with pytest.raises(UnsupportedTypeError):
        _native.vec_dot("Q8_K", bytes(292), np.zeros(256, dtype=np.float32))
    with pytest.raises(ShapeError):
        _native.vec_dot("Q4_0", bytes(18), np.zeros(64, dtype=np.float32))
    with pytest.raises(TypeError):
        _native.dequantize("Q8_0", 12345, 32)


def test_accepts_bytes_like_inputs() -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    data = _native.quantize("Q8_0", x)
    expected = _native.dequantize("Q8_0", data, 64)
    for form in (bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.uint8).reshape(2, 34)):
        np.testing.assert_array_equal(_native.dequantize("Q8_0", form, 64), expected)


def test_simd_level() -> None:
    assert _native.simd_level() in {"scalar", "avx2", "avx512", "avx512vnni"}


def test_stubs_match_the_extension() -> None:
    """The `# quant` section of _native.pyi names the functions and parameters the module has."""
    import ast
    import inspect
    import re

    # Sections are headed "# <name> (rust/src/py/<file>.rs)"; ours runs to the next header.
    stub = Path(_native.__file__).with_name("_native.pyi").read_text()
    parts = re.split(r"^# (\w+) \(rust/src/py/\w+\.rs\)$", stub, flags=re.MULTILINE)
    section = dict(zip(parts[1::2], parts[2::2]))["quant"]
    functions = [node for node in ast.parse(section).body if isinstance(node, ast.FunctionDef)]
    assert {f.name for f in functions} == {"dequantize", "quantize", "vec_dot", "tensor_nbytes", "simd_level", "simd_levels", "set_simd_level"}
    for f in functions:
        runtime = list(inspect.signature(getattr(_native, f.name)).parameters)
        assert runtime == [a.arg for a in f.args.args], f.name


def test_tensor_nbytes_is_what_the_file_stores(smollm2_gguf: Path) -> None:
    """Every tensor's byte count from its type and shape equals its byte range in the file."""
    ckpt = _native.Checkpoint([smollm2_gguf])
    for name in ckpt.tensor_names():
        type_name, shape = ckpt.tensor_info(name)
        _, start, end = ckpt.byte_range(name)
        assert _native.tensor_nbytes(type_name, list(shape)) == end - start, name
    assert _native.tensor_nbytes("MXFP4", [4, 64]) == 4 * 2 * 17
