//! Reading raw byte buffers handed over from Python, shared by the bindings.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyByteArray, PyBytes};

/// Raw bytes from Python: `bytes` (borrowed without a copy; they are immutable), `bytearray`
/// (copied), or anything with `tobytes()` such as a numpy array or `memoryview` (copied in C
/// order, so any dtype and shape gives its raw bytes).
pub(crate) fn raw_bytes(data: &Bound<'_, PyAny>) -> PyResult<PyBackedBytes> {
    if data.is_instance_of::<PyBytes>() || data.is_instance_of::<PyByteArray>() {
        return data.extract::<PyBackedBytes>().map_err(PyErr::from);
    }
    match data.call_method0("tobytes") {
        Ok(bytes) => bytes.extract::<PyBackedBytes>().map_err(PyErr::from),
        Err(_) => Err(PyTypeError::new_err(format!(
            "expected bytes, bytearray or an array with tobytes(), got {}",
            data.get_type().name()?
        ))),
    }
}
