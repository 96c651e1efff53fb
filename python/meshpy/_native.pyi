"""Type stubs for meshpy._native, the Rust extension. One section per binding file, headed
"# <name> (rust/src/py/<name>.rs)"; tests check each section against the module."""

from typing import Final

import numpy as np
import numpy.typing as npt

__version__: Final[str]

# quant (rust/src/py/quant.rs)
# Type names are ggml's, any case: "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q8_0",
# "Q8_1", "Q4_K", "Q6_K", "Q8_K". `data`/`w` take bytes, bytearray, or anything with
# tobytes() (numpy arrays, memoryview), read as raw bytes.

def dequantize(type_name: str, data: bytes | bytearray | memoryview | npt.NDArray[np.generic], n: int) -> npt.NDArray[np.float32]:
    """The n elements encoded in data (exactly n elements of that type), bit-exact with ggml."""

def quantize(type_name: str, x: npt.NDArray[np.float32]) -> bytes:
    """x (1-D float32) encoded as that type, bit-exact with ggml's reference quantizers."""

def vec_dot(type_name: str, w: bytes | bytearray | memoryview | npt.NDArray[np.generic], x: npt.NDArray[np.float32]) -> float:
    """Dot of weight row w with x (1-D float32), x quantized to the type's activation format."""

def simd_level() -> str:
    """The kernels' instruction set on this CPU: "scalar", "avx2", "avx512" or "avx512vnni"."""
