//! Bindings for `wire`: encode each message kind to `bytes`, decode a frame to a dict, read a
//! fixed header, and convert f32 <-> bf16. For tests and the Python side of the mesh; the
//! Rust transport uses `wire` directly. Arguments are copied into owned Rust values before
//! the GIL is released for the work.

use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray2, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::buffers::raw_bytes;
use super::json::{dict_to_json, json_to_dict};
use super::to_py_err;
use crate::error::Error;
use crate::wire::{
    self, DType, Entry, ErrorCode, ErrorReply, ForkSession, Forward, ForwardResult, FrameHeader, Limits,
    Message, ModelId, SessionId, Shape, Span, Tensor, MODEL_HASH_LEN,
};

/// An entry as Python passes it: `(session, step, start_pos, n_tokens)`.
pub(super) type PyEntry = (u128, u64, u32, u32);

pub(super) fn entries_of(entries: &[PyEntry]) -> Vec<Entry> {
    entries
        .iter()
        .map(|&(session, step, start_pos, n_tokens)| Entry {
            session: SessionId(session),
            step,
            start_pos,
            n_tokens,
        })
        .collect()
}

fn entries_to_py(entries: &[Entry]) -> Vec<PyEntry> {
    entries
        .iter()
        .map(|e| (e.session.0, e.step, e.start_pos, e.n_tokens))
        .collect()
}

/// A float32 `(rows, hidden)` array, copied (any strides), with its shape.
pub(super) fn matrix_of(hidden: &PyReadonlyArray2<'_, f32>) -> PyResult<(Vec<f32>, Shape)> {
    let shape = hidden.shape();
    let dims = [shape[0], shape[1]].map(u32::try_from);
    let [Ok(rows), Ok(cols)] = dims else {
        return Err(to_py_err(Error::Shape(format!(
            "hidden states of shape {shape:?} do not fit a frame (u32 dimensions)"
        ))));
    };
    // as_slice() also accepts Fortran order, whose memory order is not the row order.
    let data = match hidden.as_slice() {
        Ok(slice) if hidden.is_c_contiguous() => slice.to_vec(),
        _ => hidden.as_array().iter().copied().collect(),
    };
    Ok((data, Shape::matrix(rows, cols)))
}


/// The model id of a 32-byte content hash and a name.
pub(super) fn model_id(model_hash: &[u8], model_name: &str) -> PyResult<ModelId> {
    let hash: [u8; MODEL_HASH_LEN] = model_hash.try_into().map_err(|_| {
        to_py_err(Error::InvalidArgument(format!(
            "model_hash must be {MODEL_HASH_LEN} bytes, got {}",
            model_hash.len()
        )))
    })?;
    Ok(ModelId { hash, name: model_name.to_string() })
}

/// Encodes `msg` with the GIL released and returns the frame as `bytes`.
fn encode<'py>(py: Python<'py>, msg: Message<'_>) -> PyResult<Bound<'py, PyBytes>> {
    let frame = py.detach(|| msg.encode()).map_err(to_py_err)?;
    Ok(PyBytes::new(py, &frame))
}

/// Receive limits: the defaults, with the frame size capped at `max_frame_bytes` if given.
fn limits(max_frame_bytes: Option<u64>) -> Limits {
    let mut limits = Limits::default();
    if let Some(max) = max_frame_bytes {
        limits.max_frame_bytes = max;
    }
    limits
}

/// encode_forward(model_hash, model_name, first_layer, layer_count, entries, hidden,
/// dtype="bf16") -> bytes: a `Forward` frame. `entries` are `(session, step, start_pos,
/// n_tokens)`; `hidden` is float32 `(sum of n_tokens, width)`, sent as `dtype`.
#[pyfunction]
#[pyo3(signature = (model_hash, model_name, first_layer, layer_count, entries, hidden, dtype = "bf16"))]
#[allow(clippy::too_many_arguments)]
fn encode_forward<'py>(
    py: Python<'py>,
    model_hash: &[u8],
    model_name: &str,
    first_layer: u32,
    layer_count: u32,
    entries: Vec<PyEntry>,
    hidden: PyReadonlyArray2<'py, f32>,
    dtype: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let model = model_id(model_hash, model_name)?;
    let dtype = DType::from_name(dtype).map_err(to_py_err)?;
    let (data, shape) = matrix_of(&hidden)?;
    let msg = Message::Forward(Forward {
        model,
        span: Span {
            first_layer,
            layer_count,
        },
        entries: entries_of(&entries),
        hidden: Tensor::from_f32(&data, shape, dtype).map_err(to_py_err)?,
    });
    encode(py, msg)
}

/// encode_forward_result(entries, hidden, dtype="bf16") -> bytes: a `ForwardResult` frame.
#[pyfunction]
#[pyo3(signature = (entries, hidden, dtype = "bf16"))]
fn encode_forward_result<'py>(
    py: Python<'py>,
    entries: Vec<PyEntry>,
    hidden: PyReadonlyArray2<'py, f32>,
    dtype: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let dtype = DType::from_name(dtype).map_err(to_py_err)?;
    let (data, shape) = matrix_of(&hidden)?;
    let msg = Message::ForwardResult(ForwardResult {
        entries: entries_of(&entries),
        hidden: Tensor::from_f32(&data, shape, dtype).map_err(to_py_err)?,
    });
    encode(py, msg)
}

/// encode_error(code, message, session=None) -> bytes: an `Error` frame; `code` is a name
/// from `error_codes()`.
#[pyfunction]
#[pyo3(signature = (code, message, session = None))]
fn encode_error<'py>(
    py: Python<'py>,
    code: &str,
    message: &str,
    session: Option<u128>,
) -> PyResult<Bound<'py, PyBytes>> {
    let msg = Message::Error(ErrorReply {
        code: ErrorCode::from_name(code).map_err(to_py_err)?,
        session: session.map(SessionId),
        message: message.to_string(),
    });
    encode(py, msg)
}

/// encode_close_session(sessions, ack=False) -> bytes: a `CloseSession` frame, or with
/// `ack` its `CloseSessionAck`.
#[pyfunction]
#[pyo3(signature = (sessions, ack = false))]
fn encode_close_session<'py>(
    py: Python<'py>,
    sessions: Vec<u128>,
    ack: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let ids = sessions.into_iter().map(SessionId).collect();
    encode(
        py,
        if ack {
            Message::CloseSessionAck(ids)
        } else {
            Message::CloseSession(ids)
        },
    )
}

/// encode_fork_session(source, target, positions) -> bytes: a `ForkSession` frame (start
/// session `target` as a copy of `source`'s first `positions` positions).
#[pyfunction]
fn encode_fork_session(py: Python<'_>, source: u128, target: u128, positions: u32) -> PyResult<Bound<'_, PyBytes>> {
    encode(py, Message::ForkSession(ForkSession { source: SessionId(source), target: SessionId(target), positions }))
}

/// encode_ping(nonce, pong=False) -> bytes: a `Ping` frame, or with `pong` a `Pong`.
#[pyfunction]
#[pyo3(signature = (nonce, pong = false))]
fn encode_ping(py: Python<'_>, nonce: u64, pong: bool) -> PyResult<Bound<'_, PyBytes>> {
    encode(
        py,
        if pong {
            Message::Pong(nonce)
        } else {
            Message::Ping(nonce)
        },
    )
}

/// encode_info() -> bytes: an `Info` frame (asks a node to describe itself).
#[pyfunction]
fn encode_info(py: Python<'_>) -> PyResult<Bound<'_, PyBytes>> {
    encode(py, Message::Info)
}

/// encode_info_reply(info) -> bytes: an `InfoReply` frame carrying the dict `info` as JSON.
#[pyfunction]
fn encode_info_reply<'py>(py: Python<'py>, info: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let json = dict_to_json(info, "info")?;
    encode(py, Message::InfoReply(json))
}

/// decode_frame(data, max_frame_bytes=None) -> dict: one whole frame decoded. Keys: "kind",
/// then per kind: forward "model_hash", "model_name", "first_layer", "layer_count";
/// forward / forward_result "entries" (tuples), "dtype", "hidden" (float32 `(rows, width)`);
/// error "code", "session", "message"; close_session(_ack) "sessions"; ping / pong "nonce";
/// info_reply "info" (a dict); relay the forward keys, "chain", "keep" and "next" (tuples of peer id
/// bytes, address bytes list, first layer, layer count); collect "chain", "entries", "wait_ms"; info
/// and relayed none; handover "model_hash", "model_name", "first_layer", "layer_count",
/// "session", "step", "owner", "digest", "state" (bytes); handover_ack "session"; fork_session
/// "source", "target", "positions"; fork_session_ack "session". Raises `FrameError` / `FrameTooLargeError` for
/// anything that is not a valid frame (an info reply that is not one JSON object included).
#[pyfunction]
#[pyo3(signature = (data, max_frame_bytes = None))]
fn decode_frame<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    max_frame_bytes: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let bytes = raw_bytes(data)?;
    let limits = limits(max_frame_bytes);
    let (msg, values) = py
        .detach(|| {
            let msg = Message::decode(&bytes, &limits)?;
            let values = msg.tensor().map(|t| t.to_f32());
            Ok::<_, Error>((msg, values))
        })
        .map_err(to_py_err)?;
    let d = PyDict::new(py);
    d.set_item("kind", msg.kind().name())?;
    if let (Some(tensor), Some(values)) = (msg.tensor(), values) {
        let dims: Vec<usize> = tensor.shape().dims().iter().map(|&n| n as usize).collect();
        d.set_item("dtype", tensor.dtype().name())?;
        d.set_item("hidden", PyArray1::from_vec(py, values).reshape(dims)?)?;
    }
    let forward_items = |f: &Forward<'_>| -> PyResult<()> {
        d.set_item("entries", entries_to_py(&f.entries))?;
        d.set_item("model_hash", PyBytes::new(py, &f.model.hash))?;
        d.set_item("model_name", &f.model.name)?;
        d.set_item("first_layer", f.span.first_layer)?;
        d.set_item("layer_count", f.span.layer_count)
    };
    match &msg {
        Message::Forward(f) => forward_items(f)?,
        Message::Relay(r) => {
            forward_items(&r.forward)?;
            d.set_item("chain", r.chain)?;
            d.set_item("keep", r.keep)?;
            let next: Vec<_> = r
                .next
                .iter()
                .map(|h| {
                    let addrs: Vec<_> = h.addrs.iter().map(|a| PyBytes::new(py, a)).collect();
                    (PyBytes::new(py, &h.peer), addrs, h.span.first_layer, h.span.layer_count)
                })
                .collect();
            d.set_item("next", next)?;
        }
        Message::Collect(c) => {
            d.set_item("entries", entries_to_py(&c.entries))?;
            d.set_item("chain", c.chain)?;
            d.set_item("wait_ms", c.wait_ms)?;
        }
        Message::Relayed => {}
        Message::ForwardResult(r) => d.set_item("entries", entries_to_py(&r.entries))?,
        Message::Error(e) => {
            d.set_item("code", e.code.name())?;
            d.set_item("session", e.session.map(|s| s.0))?;
            d.set_item("message", &e.message)?;
        }
        Message::CloseSession(ids) | Message::CloseSessionAck(ids) => {
            d.set_item("sessions", ids.iter().map(|s| s.0).collect::<Vec<_>>())?;
        }
        Message::Ping(nonce) | Message::Pong(nonce) => d.set_item("nonce", nonce)?,
        Message::Info => {}
        Message::InfoReply(json) => d.set_item("info", json_to_dict(py, json)?)?,
        Message::Handover(h) => {
            d.set_item("model_hash", PyBytes::new(py, &h.model.hash))?;
            d.set_item("model_name", &h.model.name)?;
            d.set_item("first_layer", h.span.first_layer)?;
            d.set_item("layer_count", h.span.layer_count)?;
            d.set_item("session", h.session.0)?;
            d.set_item("step", h.step)?;
            d.set_item("owner", PyBytes::new(py, &h.owner))?;
            d.set_item("digest", PyBytes::new(py, &h.digest))?;
            d.set_item("state", PyBytes::new(py, h.state))?;
        }
        Message::HandoverAck(id) | Message::ForkSessionAck(id) => d.set_item("session", id.0)?,
        Message::ForkSession(f) => {
            d.set_item("source", f.source.0)?;
            d.set_item("target", f.target.0)?;
            d.set_item("positions", f.positions)?;
        }
    }
    Ok(d)
}

/// read_frame_header(prefix, max_frame_bytes=None) -> dict: the fixed header from the first
/// 24 bytes ("kind", "header_len", "payload_len", "frame_len"), checked against the limits,
/// so a reader knows how many bytes follow before reading them.
#[pyfunction]
#[pyo3(signature = (prefix, max_frame_bytes = None))]
fn read_frame_header<'py>(
    py: Python<'py>,
    prefix: &[u8],
    max_frame_bytes: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let h = FrameHeader::parse(prefix, &limits(max_frame_bytes)).map_err(to_py_err)?;
    let d = PyDict::new(py);
    d.set_item("kind", h.kind.name())?;
    d.set_item("header_len", h.header_len)?;
    d.set_item("payload_len", h.payload_len)?;
    d.set_item("frame_len", h.frame_len())?;
    Ok(d)
}

/// error_codes() -> list[str]: the error code names, in wire order (1, 2, ...).
#[pyfunction]
fn error_codes() -> Vec<&'static str> {
    ErrorCode::ALL.iter().map(|c| c.name()).collect()
}

/// f32_to_bf16(x) -> numpy.ndarray[uint16]: bf16 bits of float32 `x` (any shape), rounded to
/// nearest even as frames are; NaN stays NaN.
#[pyfunction]
fn f32_to_bf16<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Bound<'py, PyArrayDyn<u16>>> {
    let shape = x.shape().to_vec();
    let data: Vec<f32> = x.as_array().iter().copied().collect();
    let bits: Vec<u16> = py.detach(|| data.iter().map(|&v| wire::f32_to_bf16(v)).collect());
    bits.into_pyarray(py).reshape(shape)
}

/// bf16_to_f32(bits) -> numpy.ndarray[float32]: the values of bf16 `bits` (any shape).
#[pyfunction]
fn bf16_to_f32<'py>(
    py: Python<'py>,
    bits: PyReadonlyArrayDyn<'py, u16>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = bits.shape().to_vec();
    let data: Vec<u16> = bits.as_array().iter().copied().collect();
    let values: Vec<f32> = py.detach(|| data.iter().map(|&b| wire::bf16_to_f32(b)).collect());
    values.into_pyarray(py).reshape(shape)
}

/// Adds the wire functions to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode_forward, m)?)?;
    m.add_function(wrap_pyfunction!(encode_forward_result, m)?)?;
    m.add_function(wrap_pyfunction!(encode_error, m)?)?;
    m.add_function(wrap_pyfunction!(encode_close_session, m)?)?;
    m.add_function(wrap_pyfunction!(encode_fork_session, m)?)?;
    m.add_function(wrap_pyfunction!(encode_ping, m)?)?;
    m.add_function(wrap_pyfunction!(encode_info, m)?)?;
    m.add_function(wrap_pyfunction!(encode_info_reply, m)?)?;
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(read_frame_header, m)?)?;
    m.add_function(wrap_pyfunction!(error_codes, m)?)?;
    m.add_function(wrap_pyfunction!(f32_to_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(bf16_to_f32, m)?)?;
    Ok(())
}
