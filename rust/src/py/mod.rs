//! Thin pyo3 bindings: convert arguments into owned Rust values, release the GIL for the
//! work, convert results back. One file per exposed concept.

mod buffers;
mod checkpoint;
mod errors;
mod json;
mod logging;
mod model;
mod net;
mod quant;
mod torch_span;
mod wire;

use pyo3::prelude::*;

pub(crate) use errors::to_py_err;

/// Registers every binding on the `meshpy._native` module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    checkpoint::register(m)?;
    logging::register(m)?;
    model::register(m)?;
    net::register(m)?;
    quant::register(m)?;
    torch_span::register(m)?;
    wire::register(m)?;
    Ok(())
}
