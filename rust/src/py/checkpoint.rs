//! Python binding of [`crate::checkpoint::Checkpoint`]: open, inspect metadata and tensors,
//! copy a tensor's bytes out (tests, small tensors).

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::quant::RAW_BYTES;
use super::to_py_err;
use crate::checkpoint::{self, MetaValue};

/// A memory-mapped checkpoint: one GGUF file, or one or more safetensors shards.
#[pyclass(frozen, name = "Checkpoint", module = "meshpy._native")]
pub(crate) struct Checkpoint {
    inner: checkpoint::Checkpoint,
}

impl Checkpoint {
    /// The Rust checkpoint, for other bindings that load from it.
    pub(crate) fn inner(&self) -> &checkpoint::Checkpoint {
        &self.inner
    }
}

/// A metadata value as a Python object; arrays become lists.
fn meta_to_py<'py>(py: Python<'py>, value: &MetaValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        MetaValue::U8(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::I8(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::U16(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::I16(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::U32(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::I32(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::U64(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::I64(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::F32(v) => f64::from(*v).into_pyobject(py)?.into_any(),
        MetaValue::F64(v) => v.into_pyobject(py)?.into_any(),
        MetaValue::Bool(v) => v.into_pyobject(py)?.to_owned().into_any(),
        MetaValue::String(s) => s.into_pyobject(py)?.into_any(),
        MetaValue::Array(items) => {
            let items = items
                .iter()
                .map(|item| meta_to_py(py, item))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
    })
}

#[pymethods]
impl Checkpoint {
    /// Opens and indexes the files (format chosen by their first bytes).
    #[new]
    fn new(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<Self> {
        let inner = py
            .detach(|| checkpoint::Checkpoint::open(&paths))
            .map_err(to_py_err)?;
        Ok(Checkpoint { inner })
    }

    /// "gguf" or "safetensors".
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format().name()
    }

    /// The files, as pathlib.Path, in the order given.
    #[getter]
    fn paths(&self) -> Vec<PathBuf> {
        self.inner.paths().to_vec()
    }

    /// GGUF key-values (arrays as lists), or the safetensors `__metadata__` strings.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in self.inner.metadata() {
            dict.set_item(key, meta_to_py(py, value)?)?;
        }
        Ok(dict)
    }

    /// Every tensor name, sorted.
    fn tensor_names(&self) -> Vec<&str> {
        self.inner.tensor_names()
    }

    /// `(type name, shape)` of a tensor, shape outermost first; `"U8"` for a safetensors `U8`
    /// tensor (raw bytes: MXFP4 blocks and exponents).
    fn tensor_info<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<(&'static str, Bound<'py, PyTuple>)> {
        match self.inner.info(name) {
            Ok(info) => Ok((info.ty.name(), PyTuple::new(py, &info.shape)?)),
            Err(err) => match self.inner.u8_tensor(name) {
                Ok((_, shape)) => Ok((RAW_BYTES, PyTuple::new(py, shape)?)),
                Err(_) => Err(to_py_err(err)),
            },
        }
    }

    /// A GGUF file's byte count up to the end of its key-values (see
    /// `Checkpoint::metadata_end` in Rust); None for safetensors.
    #[getter]
    fn metadata_end(&self) -> Option<usize> {
        self.inner.metadata_end()
    }

    /// `(path, start, end)`: the file holding a tensor and its bytes' range there.
    fn byte_range(&self, name: &str) -> PyResult<(PathBuf, usize, usize)> {
        let (path, start, end) = self.inner.byte_range(name).map_err(to_py_err)?;
        Ok((path.to_path_buf(), start, end))
    }

    /// The SHA-256 (hex) of a tensor's stored bytes, read in place without the GIL; its pages
    /// are dropped from this process afterwards.
    fn tensor_sha256(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        py.detach(|| self.inner.tensor_sha256(name)).map_err(to_py_err)
    }

    /// A copy of a tensor's raw little-endian bytes (`U8` tensors too).
    fn tensor_bytes<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        match self.inner.data(name) {
            Ok(data) => Ok(PyBytes::new(py, data.bytes())),
            Err(err) => match self.inner.u8_tensor(name) {
                Ok((bytes, _)) => Ok(PyBytes::new(py, bytes)),
                Err(_) => Err(to_py_err(err)),
            },
        }
    }

    /// Test hook: reads every byte of the named tensors in place (no copy) and returns the
    /// wrapping sum of their bytes, so tests can check how much of the file becomes resident.
    fn touch(&self, py: Python<'_>, names: Vec<String>) -> PyResult<u64> {
        let data = names
            .iter()
            .map(|name| self.inner.data(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py_err)?;
        Ok(py.detach(|| {
            data.iter()
                .flat_map(|tensor| tensor.bytes())
                .fold(0u64, |sum, &b| sum.wrapping_add(u64::from(b)))
        }))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn __repr__(&self) -> String {
        let paths: Vec<String> = self
            .inner
            .paths()
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        format!(
            "Checkpoint(format={:?}, paths=[{}], tensors={})",
            self.inner.format().name(),
            paths.join(", "),
            self.inner.len()
        )
    }
}

/// Adds `Checkpoint` to the module.
/// `(header, ranges)`: the header of a GGUF file holding `tensors` (name, type name, shape
/// outermost first) in that order around `prefix`, another GGUF's bytes up to the end of its
/// key-values, and each tensor's `(offset, length)` in the file (see
/// `checkpoint::store_header`).
#[pyfunction]
fn gguf_store_header<'py>(
    py: Python<'py>,
    prefix: &[u8],
    tensors: Vec<(String, String, Vec<usize>)>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<checkpoint::ByteRange>)> {
    let typed = tensors
        .into_iter()
        .map(|(name, ty, shape)| Ok((name, crate::quant::GgmlType::from_name(&ty)?, shape)))
        .collect::<crate::error::Result<Vec<_>>>()
        .map_err(to_py_err)?;
    let (header, offsets) = checkpoint::store_header(prefix, &typed).map_err(to_py_err)?;
    Ok((PyBytes::new(py, &header), offsets))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gguf_store_header, m)?)?;
    m.add_class::<Checkpoint>()
}
