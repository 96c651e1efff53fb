//! JSON objects between Python dicts and Rust text, through Python's own `json` module (the
//! info of `Info` frames: small, rare, and a dict on the Python side).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::to_py_err;
use crate::error::Error;

/// The compact JSON text of `obj`, which must be a dict of JSON values (no NaN or infinity,
/// which JSON lacks); anything else is an `InvalidArgumentError` naming `what`.
pub(crate) fn dict_to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let invalid = |detail: String| to_py_err(Error::InvalidArgument(format!("{what}: {detail}")));
    if !obj.is_instance_of::<PyDict>() {
        return Err(invalid(format!("expected a dict, got {}", obj.get_type().name()?)));
    }
    let kwargs = PyDict::new(obj.py());
    kwargs.set_item("separators", (",", ":"))?;
    kwargs.set_item("ensure_ascii", false)?;
    kwargs.set_item("allow_nan", false)?;
    let text = obj
        .py()
        .import("json")?
        .call_method("dumps", (obj,), Some(&kwargs))
        .map_err(|e| invalid(format!("not JSON-serialisable ({e})")))?;
    text.extract()
}

/// `json`, the text of one JSON object (checked by the frame decoder), as a dict.
pub(crate) fn json_to_dict<'py>(py: Python<'py>, json: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (json,))
}

/// The text of a Rust JSON value as a dict.
pub(crate) fn value_to_dict<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    json_to_dict(py, &value.to_string())
}

/// A dict of JSON values as a Rust JSON object.
pub(crate) fn dict_to_map(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Map<String, serde_json::Value>> {
    let text = dict_to_json(obj, what)?;
    serde_json::from_str(&text).map_err(|e| to_py_err(Error::InvalidArgument(format!("{what}: {e}"))))
}
