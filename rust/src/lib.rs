//! meshpy's Rust core, exposed to Python as `meshpy._native`.
//!
//! The pure-Rust modules (`quant`, `checkpoint`, `compute`, `model`, `wire`, `net`, `span`) know nothing of
//! Python and test with `cargo test`; `py` holds the thin bindings, one file per exposed
//! concept.

pub mod checkpoint;
pub mod compute;
pub mod error;
pub mod model;
pub mod net;
pub mod quant;
pub mod span;
pub mod wire;

mod py;
#[cfg(test)]
mod test_rng;

pub use error::{Error, Result};

use pyo3::prelude::*;

/// The `meshpy._native` extension module: exports only.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::register(m)
}
