"""meshpy.gpu.quant against meshpy._native: the torch dequantizers bit-exact with the Rust
scalar references (and so with ggml) on random blocks of every type they serve; QuantLinear's
dequantize-and-matmul path against a float64 product of the reference weights; the Triton
kernels (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K) against that path, on CUDA or under TRITON_INTERPRET=1
(run in a subprocess here when this process has neither)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from meshpy import _native  # noqa: E402
from meshpy.gpu import quant  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Where the meshpy this process imported lives (the checkout's python/, or the installed
#: wheel's site-packages): child processes import the same one.
MESHPY_HOME = str(Path(quant.__file__).resolve().parents[2])

# Types _native.quantize makes (blocks from random f32 rows, as a checkpoint holds them).
QUANTIZED_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# Block types checked on random bytes too (every bit pattern of the quants), by the offsets of
# their f16 fields, set to random finite halves; the k-quants only so (quantize lacks them).
RANDOM_BYTE_TYPES = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip

# f32 products in another summation order (blocked, split-K, tensor-core tiles) differ from a
# float64 product by at most this, relative to sum_k |x_k w_k| (measured: <= 1e-7).
F32_DOT_RTOL = 2e-6
# Half-precision x: weights rounded to x's dtype (2^-12 relative for f16, 2^-9 for bf16) and
# the output rounded once more. Measured for f16: <= 3e-4.
HALF_DOT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (rows, cols): rows not a multiple of BLOCK_N (32); several K tiles, for the legacy types a
# last tile (128 elements) half full, for Q6_K three super-blocks (split_k 2: two and one).
KERNEL_SHAPES = {
    "Q8_0": (40, 32 * 10), "Q4_0": (40, 32 * 10), "Q5_0": (40, 32 * 10),
    "Q4_K": (40, 512), "Q6_K": (40, 768),
}  # fmt: skip


def _blocks(ty: str, rows: int, cols: int, seed: int = 0, random_bytes: bool = False) -> np.ndarray:
    """(rows, row_bytes) uint8 blocks of type `ty`: random weights quantized, or random bytes."""
    rng = np.random.default_rng(seed)
    row_bytes = _native.tensor_nbytes(ty, [1, cols])
    if ty in QUANTIZED_TYPES and not random_bytes:
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        data = np.frombuffer(_native.quantize(ty, x.reshape(-1)), dtype=np.uint8)
        return data.reshape(rows, row_bytes).copy()
    fmt = quant.block_format(ty)
    data = rng.integers(0, 256, (rows, cols // fmt.elems, fmt.nbytes), dtype=np.uint8)
    for offset in RANDOM_BYTE_TYPES[ty]:
        halves = rng.uniform(-0.1, 0.1, data.shape[:2]).astype(np.float16)
        data[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(rows, row_bytes)


def _reference(ty: str, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return _native.dequantize(ty, data, rows * cols).reshape(rows, cols)


def _assert_close_dot(ours: torch.Tensor, x: np.ndarray, w: np.ndarray, rtol: float = F32_DOT_RTOL) -> None:
    """ours ~ x @ w.T (in float64) within rtol of sum |x w|, per element."""
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    err = np.abs(ours.double().cpu().numpy() - exact)
    worst = float((err / np.maximum(scale, 1e-30)).max())
    assert worst <= rtol, f"relative error {worst:.3g} > {rtol}"


@pytest.mark.parametrize(
    ("ty", "random_bytes"),
    [(ty, False) for ty in QUANTIZED_TYPES] + [(ty, True) for ty in RANDOM_BYTE_TYPES],
)
def test_dequantize_is_bit_exact(ty: str, random_bytes: bool) -> None:
    rows, cols = 4, 512
    data = _blocks(ty, rows, cols, random_bytes=random_bytes)
    ours = quant.dequantize(ty, torch.from_numpy(data)).numpy()
    theirs = _reference(ty, data, rows, cols)
    assert ours.shape == (rows, cols) and ours.dtype == np.float32
    same = ours.view(np.uint32) == theirs.view(np.uint32)
    if not same.all():
        r, c = np.argwhere(~same)[0]
        pytest.fail(f"{ty} [{r}, {c}]: ours {ours[r, c]!r}, _native {theirs[r, c]!r}")


def test_block_sizes_match_native() -> None:
    for fmt in quant.FORMATS.values():
        assert _native.tensor_nbytes(fmt.name, [1, fmt.elems]) == fmt.nbytes, fmt.name


def test_type_names_as_native_takes_them() -> None:
    assert quant.block_format("q4k").name == "Q4_K"
    assert quant.block_format("bf16").name == "BF16"
    with pytest.raises(ValueError, match="supported"):
        quant.block_format("Q3_K")


@pytest.mark.parametrize("ty", ["Q8_0", "Q4_K", "Q6_K", "F16"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fallback_forward_matches_product(ty: str, m: int) -> None:
    rows, cols = 24, 512
    data = _blocks(ty, rows, cols, seed=m)
    layer = quant.QuantLinear.from_blocks(ty, rows, cols, data, "cpu")
    x = np.random.default_rng(1).standard_normal((m, cols), dtype=np.float32)
    y = layer.forward(torch.from_numpy(x))
    assert y.shape == (m, rows) and y.dtype == torch.float32
    _assert_close_dot(y, x, _reference(ty, data, rows, cols))


def test_forward_keeps_leading_dims_and_dtype() -> None:
    rows, cols = 8, 64
    layer = quant.QuantLinear.from_blocks("Q4_0", rows, cols, _blocks("Q4_0", rows, cols).tobytes(), "cpu")
    x = torch.randn(2, 3, cols, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, rows) and y.dtype == torch.bfloat16


def test_blocks_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="blocks"):
        quant.QuantLinear("Q8_0", 4, 64, torch.zeros((4, 67), dtype=torch.uint8))
    with pytest.raises(ValueError, match="whole blocks"):
        quant.QuantLinear("Q4_K", 4, 128, torch.zeros((4, 72), dtype=torch.uint8))


def test_cpu_path_does_not_import_triton() -> None:
    code = (
        "import sys, torch\n"
        "from meshpy.gpu import quant\n"
        "layer = quant.QuantLinear('Q8_0', 2, 32, torch.zeros((2, 34), dtype=torch.uint8))\n"
        "layer.forward(torch.ones(1, 32))\n"
        "print('triton' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [MESHPY_HOME, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Triton kernels. Under the interpreter they run on CPU tensors; its bf16 tl.dot is wrong
# (triton 3.9 reads the raw bits), so bf16 is checked on CUDA only.

_DEVICE = "cuda" if torch.cuda.is_available() and not quant._interpreting() else "cpu"
_KERNELS_HERE = quant.kernels_in_use(_DEVICE)
_HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if _DEVICE == "cuda" else [])
needs_kernels = pytest.mark.skipif(not _KERNELS_HERE, reason="needs CUDA or TRITON_INTERPRET=1 (test_kernels_in_interpreter runs it)")


def _kernel_case(ty: str, m: int) -> tuple[quant.QuantLinear, np.ndarray, np.ndarray]:
    """A layer of type ty on the kernels' device, its reference weights, and random x (m rows)."""
    rows, cols = KERNEL_SHAPES[ty]
    data = _blocks(ty, rows, cols, seed=m)
    layer = quant.QuantLinear.from_blocks(ty, rows, cols, data, _DEVICE)
    assert layer.uses_kernel
    x = np.random.default_rng(m).standard_normal((m, cols), dtype=np.float32)
    return layer, _reference(ty, data, rows, cols), x


@needs_kernels
@pytest.mark.parametrize("ty", sorted(quant.KERNEL_TYPES))
@pytest.mark.parametrize("m", [1, 3, 8])
def test_kernel_matches_fallback(ty: str, m: int) -> None:
    layer, w, x = _kernel_case(ty, m)
    xt = torch.from_numpy(x).to(_DEVICE)
    fallback = torch.matmul(xt, layer.dequantize().T)
    for split_k in (1, 2):  # 2: two programs share each row's K tiles, partials summed
        y = quant.quant_matmul(xt, layer.blocks, ty, layer.rows, layer.cols, split_k=split_k)
        assert y.shape == (m, layer.rows) and y.dtype == torch.float32
        _assert_close_dot(y, x, w)
        torch.testing.assert_close(y, fallback, rtol=0, atol=2 * F32_DOT_RTOL * float(np.abs(x).sum(1).max() * np.abs(w).max()))
    torch.testing.assert_close(layer.forward(xt), quant.quant_matmul(xt, layer.blocks, ty, layer.rows, layer.cols), rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("ty", sorted(quant.KERNEL_TYPES))
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", _HALF_DTYPES, ids=str)
def test_kernel_half_inputs(ty: str, m: int, dtype: torch.dtype) -> None:
    layer, w, x = _kernel_case(ty, m)
    xt = torch.from_numpy(x).to(_DEVICE, dtype)
    y = layer.forward(xt)
    assert y.shape == (m, layer.rows) and y.dtype == dtype
    _assert_close_dot(y, xt.double().cpu().numpy(), w, HALF_DOT_RTOL[dtype])


def test_kernels_in_interpreter() -> None:
    """Runs the kernel tests above in a child process with TRITON_INTERPRET=1 (it must be set
    before triton is imported), when this process cannot run them itself."""
    if _KERNELS_HERE:
        pytest.skip("the kernel tests run in this process")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [MESHPY_HOME, str(ROOT), env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_kernel_"]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and "skipped" not in summary, done.stdout[-4000:] + done.stderr[-2000:]
