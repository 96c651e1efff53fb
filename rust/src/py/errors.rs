//! Maps the core's [`Error`] onto the exception classes of `meshpy.errors`, which also
//! inherit a builtin (`ValueError`, `OSError`, ...) so callers can catch either.

use pyo3::prelude::*;

use crate::error::Error;

/// The `meshpy.errors` class name for each variant.
fn class_name(err: &Error) -> &'static str {
    match err {
        Error::Io { .. } => "CheckpointIOError",
        Error::Format { .. } => "CheckpointFormatError",
        Error::UnsupportedType { .. } => "UnsupportedTypeError",
        Error::UnsupportedArchitecture { .. } => "UnsupportedArchitectureError",
        Error::MissingTensor { .. } => "MissingTensorError",
        Error::Shape(_) => "ShapeError",
        Error::ContextOverflow { .. } => "ContextOverflowError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::Frame(_) => "FrameError",
        Error::FrameTooLarge { .. } => "FrameTooLargeError",
        Error::Identity { .. } => "IdentityError",
        Error::Network(_) => "NetworkError",
        Error::Worker { .. } => "WorkerError",
        Error::Timeout(_) => "RequestTimeoutError",
        Error::Backend(_) => "BackendError",
    }
}

/// Converts a core error into the matching `meshpy.errors` exception.
pub(crate) fn to_py_err(err: Error) -> PyErr {
    let message = err.to_string();
    Python::attach(|py| {
        let class = py
            .import("meshpy.errors")
            .and_then(|module| module.getattr(class_name(&err)));
        let instance = class.and_then(|class| match &err {
            // WorkerError(code, message, peer, recoverable=...): the code stays machine-readable.
            Error::Worker { peer, code, message } => {
                let kwargs = pyo3::types::PyDict::new(py);
                kwargs.set_item("recoverable", code.recoverable())?;
                kwargs.set_item("moved_to", crate::wire::moved_to(*code, message))?;
                class.call((code.name(), message, peer), Some(&kwargs))
            }
            _ => class.call1((message.clone(),)),
        });
        match instance {
            Ok(instance) => PyErr::from_value(instance),
            // meshpy.errors is part of the package; this only happens in a broken install.
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
        }
    })
}
