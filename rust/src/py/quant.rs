//! Bindings for `quant`: dequantize, quantize and dot products over ggml block formats, and
//! the SIMD level in use. Arguments become owned Rust values (or GIL-free views of immutable
//! `bytes`) before the work runs with the GIL released.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::buffers::raw_bytes;
use super::to_py_err;
use crate::quant::{self, GgmlType, SimdLevel};

/// A 1-D float32 numpy array as an owned vector.
fn floats(x: &PyReadonlyArray1<'_, f32>) -> Vec<f32> {
    match x.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => x.as_array().iter().copied().collect(),
    }
}

/// The type named `type_name` (ggml's spelling, any case: "Q4_K", "q8_0", "f16").
fn parse_type(type_name: &str) -> PyResult<GgmlType> {
    GgmlType::from_name(type_name).map_err(to_py_err)
}

/// dequantize(type_name, data, n) -> numpy.ndarray[float32]: the `n` elements encoded in
/// `data`, which must be exactly the bytes of `n` elements of that type (whole blocks).
#[pyfunction]
fn dequantize<'py>(
    py: Python<'py>,
    type_name: &str,
    data: &Bound<'py, PyAny>,
    n: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ty = parse_type(type_name)?;
    let bytes = raw_bytes(data)?;
    let out = py
        .detach(|| {
            let mut out = vec![0.0f32; n];
            quant::dequantize_row(ty, &bytes, &mut out).map(|()| out)
        })
        .map_err(to_py_err)?;
    Ok(PyArray1::from_vec(py, out))
}

/// quantize(type_name, x) -> bytes: `x` (1-D float32) encoded as that type, bit-exact with
/// ggml's reference quantizers. Targets: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1,
/// Q8_K (and meshpy's activation type A16).
#[pyfunction]
fn quantize<'py>(
    py: Python<'py>,
    type_name: &str,
    x: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyBytes>> {
    let ty = parse_type(type_name)?;
    let x = floats(&x);
    let out = py
        .detach(|| {
            let mut out = vec![0u8; ty.row_bytes(x.len())?];
            quant::quantize_row(ty, &x, &mut out).map(|()| out)
        })
        .map_err(to_py_err)?;
    Ok(PyBytes::new(py, &out))
}

/// vec_dot(type_name, w, x) -> float: the dot product of a weight row `w` (raw bytes of
/// `len(x)` elements of that type) with `x` (1-D float32), computed as the forward pass does:
/// `x` quantized to the type's activation format (A16 for quantized types, f32 for float
/// ones), then the fastest per-row kernel for this CPU.
#[pyfunction]
fn vec_dot<'py>(
    py: Python<'py>,
    type_name: &str,
    w: &Bound<'py, PyAny>,
    x: PyReadonlyArray1<'py, f32>,
) -> PyResult<f32> {
    let ty = parse_type(type_name)?;
    let w = raw_bytes(w)?;
    let x = floats(&x);
    py.detach(|| {
        let n = x.len();
        if ty.is_activation_only() {
            // No kernel takes it as weights: let `vec_dot` name the error.
            return quant::vec_dot(ty, n, &w, &[]);
        }
        let at = ty.activation_type();
        let a = if at == GgmlType::F32 {
            x.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            let mut a = vec![0u8; at.row_bytes(n)?];
            quant::quantize_activations(at, &x, &mut a);
            a
        };
        quant::vec_dot(ty, n, &w, &a)
    })
    .map_err(to_py_err)
}

/// tensor_nbytes(type_name, shape) -> int: bytes of a tensor of that type and shape (outermost
/// first) as a checkpoint stores it; InvalidArgumentError-like errors for a type or a row
/// length that does not fit.
/// The type name `Checkpoint.tensor_info` gives a safetensors `U8` tensor: raw bytes that only
/// a loader knowing their meaning reads (transformers' MXFP4 blocks and exponents).
pub(crate) const RAW_BYTES: &str = "U8";

#[pyfunction]
fn tensor_nbytes(type_name: &str, shape: Vec<usize>) -> PyResult<usize> {
    if type_name == RAW_BYTES {
        return Ok(shape.iter().product());
    }
    let ty = parse_type(type_name)?;
    let row = ty.row_bytes(shape.last().copied().unwrap_or(1)).map_err(to_py_err)?;
    Ok(row * shape.iter().rev().skip(1).product::<usize>())
}

/// simd_level() -> str: the instruction set the kernels use: "scalar", "avx2", "avx512" or
/// "avx512vnni" (the CPU's best, or what `MESHPY_ISA` / `set_simd_level` chose).
#[pyfunction]
fn simd_level() -> &'static str {
    quant::active_simd().name()
}

/// simd_levels() -> list[str]: every level this CPU runs, lowest first.
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    SimdLevel::ALL.iter().filter(|&&l| l <= quant::cpu_simd()).map(|l| l.name()).collect()
}

/// set_simd_level(name): kernels run at this level from now on (models loaded before keep
/// their matrix kernels); InvalidArgumentError for a level this CPU lacks or no level.
#[pyfunction]
fn set_simd_level(name: &str) -> PyResult<()> {
    let level = SimdLevel::from_name(name).ok_or_else(|| {
        to_py_err(crate::Error::InvalidArgument(format!(
            "{name:?} names no kernel level; choose one of {}",
            SimdLevel::ALL.map(|l| l.name()).join(", ")
        )))
    })?;
    quant::set_simd_level(level).map_err(to_py_err)
}

/// Adds the quant functions to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(vec_dot, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_nbytes, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    // A bad MESHPY_ISA fails the import with a message naming the choices, rather than
    // silently running other kernels than asked for.
    quant::simd_from_env().map_err(to_py_err)?;
    Ok(())
}
