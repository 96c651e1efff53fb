//! The one error type of the Rust core. Each variant maps to a `meshpy.errors` class in
//! `py/errors.rs`; messages are written for the user who has to fix the input.

use std::path::PathBuf;

/// Everything that can go wrong in the Rust core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file is truncated or corrupt; `detail` says where and what.
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    /// A tensor type (quantization format or dtype) that no kernel handles.
    #[error("unsupported tensor type {name}; supported: {supported}")]
    UnsupportedType { name: String, supported: String },
    /// A model architecture that has no forward pass here.
    #[error("unsupported architecture {name:?}; supported: {supported}")]
    UnsupportedArchitecture { name: String, supported: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name:?} not found in checkpoint; it has: {available}")]
    MissingTensor { name: String, available: String },
    /// Tensor shapes or lengths that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A sequence longer than the context (or the KV cache) holds.
    #[error("context overflow: {needed} positions needed, the limit is {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    /// A bad argument from the caller (Python or a peer).
    #[error("{0}")]
    InvalidArgument(String),
    /// A malformed wire frame (bad magic, unknown version, kind or dtype, a truncated section,
    /// lengths that disagree); the message names the field, its value and its byte offset.
    #[error("malformed frame: {0}")]
    Frame(String),
    /// A wire frame (or one of its counts) over the receiver's `wire::Limits`.
    #[error("frame too large: {what} is {value}, the limit is {limit}")]
    FrameTooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// A node's identity key file is unreadable as a key (corrupt, truncated, another format).
    #[error("{path}: not a valid node identity key: {detail}")]
    Identity { path: PathBuf, detail: String },
    /// A network operation failed: listening, dialing, a lost connection, a peer that does not
    /// speak the protocol, a DHT query with no answer, a node already shut down.
    #[error("network error: {0}")]
    Network(String),
    /// A worker refused or failed a span request; `code` says why (and whether another
    /// provider may serve it: [`crate::wire::ErrorCode::recoverable`]).
    #[error("{peer}: {}: {message}", code.name())]
    Worker {
        peer: String,
        code: crate::wire::ErrorCode,
        message: String,
    },
    /// A network request got no answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Another backend (the torch path) failed to compute: its error, as it said it.
    #[error("backend error: {0}")]
    Backend(String),
}

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
