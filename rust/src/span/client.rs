//! The client half: one hop of the End node's sessions in one call. The hidden states go
//! out as a `Forward` frame, and the answer comes back checked (the same entries, the same
//! shape) and decoded to f32, or as [`Error::Worker`] carrying the worker's refusal code, so
//! the caller (Python's routing, rerouting and replay policy) sees values or a typed error,
//! never a frame. Waiting on the network blocks only the calling thread.

use std::time::Duration;

use libp2p::PeerId;

use crate::error::{Error, Result};
use crate::net::NodeHandle;
use crate::wire::{DType, Entry, ErrorCode, Forward, Message, ModelId, Shape, Span, Tensor};

/// What one hop runs: which model and layers, for which sessions' positions, in which wire
/// dtype (the worker answers in the same one).
#[derive(Clone, Copy, Debug)]
pub struct Hop<'a> {
    /// The model the layers belong to.
    pub model: &'a ModelId,
    /// The layers the worker runs.
    pub span: Span,
    /// Sessions and positions, in the order of the hidden states' rows.
    pub entries: &'a [Entry],
    /// How hidden states travel.
    pub wire: DType,
}

/// Runs `hidden` (row-major f32, `width` per row, one row per token of `hop.entries` in
/// order) through `hop` on `peer`; the worker's output, of the same shape.
///
/// Errors: [`Error::Shape`] when the rows do not match the entries (nothing is sent);
/// [`Error::Network`] / [`Error::Timeout`] from the transport; [`Error::Worker`] with the
/// worker's code when it refuses, or with `InvalidRequest` when its answer is not the
/// result of this request (other entries, another shape, another kind of frame).
pub fn forward(node: &NodeHandle, peer: PeerId, hop: Hop<'_>, hidden: &[f32], width: usize, timeout: Option<Duration>) -> Result<Vec<f32>> {
    let rows: u64 = hop.entries.iter().map(|e| u64::from(e.n_tokens)).sum();
    if width == 0 || hidden.len() as u64 != rows * width as u64 {
        return Err(Error::Shape(format!(
            "{} hidden values for {rows} tokens of width {width}",
            hidden.len()
        )));
    }
    let shape = Shape::matrix(
        u32::try_from(rows).map_err(|_| Error::Shape(format!("{rows} rows do not fit a frame")))?,
        u32::try_from(width).map_err(|_| Error::Shape(format!("width {width} does not fit a frame")))?,
    );
    let frame = Message::Forward(Forward {
        model: hop.model.clone(),
        span: hop.span,
        entries: hop.entries.to_vec(),
        hidden: Tensor::from_f32(hidden, shape, hop.wire)?,
    })
    .encode()?;
    let reply = node.request(peer, frame, timeout)?;
    let refused = |code: ErrorCode, message: String| Error::Worker { peer: peer.to_string(), code, message };
    match Message::decode(&reply, &node.limits()).map_err(|e| refused(ErrorCode::InvalidRequest, format!("undecodable answer: {e}")))? {
        Message::ForwardResult(r) if r.entries == hop.entries && r.hidden.shape() == shape => Ok(r.hidden.to_f32()),
        Message::ForwardResult(r) => Err(refused(
            ErrorCode::InvalidRequest,
            format!(
                "an answer for entries {:?} of shape {:?}, to a request for {:?} of shape {:?}",
                r.entries,
                r.hidden.shape().dims(),
                hop.entries,
                shape.dims()
            ),
        )),
        Message::Error(e) => Err(refused(e.code, e.message)),
        other => Err(refused(ErrorCode::InvalidRequest, format!("a {} frame in answer to a forward", other.kind()))),
    }
}
