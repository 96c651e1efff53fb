//! The client half: one hop of the End node's sessions in one call ([`forward`]), or a whole
//! chained route ([`forward_chain`]). The hidden states go
//! out as a `Forward` frame, and the answer comes back checked (the same entries, the same
//! shape) and decoded to f32, or as [`Error::Worker`] carrying the worker's refusal code, so
//! the caller (Python's routing, rerouting and replay policy) sees values or a typed error,
//! never a frame. Waiting on the network blocks only the calling thread.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use crate::error::{Error, Result};
use crate::net::NodeHandle;
use crate::wire::{
    Collect, DType, Entry, ErrorCode, Forward, Message, ModelId, NextHop, Relay, Shape, Span, Tensor, MAX_HOP_ADDRS,
};

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
    /// Values per row of the answer: the hidden size, or wider rows for a model that sends
    /// more beside the hidden states (`DecoderConfig::row_width`).
    pub width_out: usize,
}

/// Runs `hidden` (row-major f32, `width` per row, one row per token of `hop.entries` in
/// order) through `hop` on `peer`; the worker's output, of the same shape.
///
/// Errors: [`Error::Shape`] when the rows do not match the entries (nothing is sent);
/// [`Error::Network`] / [`Error::Timeout`] from the transport; [`Error::Worker`] with the
/// worker's code when it refuses, or with `InvalidRequest` when its answer is not the
/// result of this request (other entries, another shape, another kind of frame).
pub fn forward(node: &NodeHandle, peer: PeerId, hop: Hop<'_>, hidden: &[f32], width: usize, timeout: Option<Duration>) -> Result<Vec<f32>> {
    let shape = shape_of(hop.entries, hidden, width)?;
    let answer = Shape::matrix(shape.dims()[0], u32::try_from(hop.width_out).map_err(|_| Error::Shape("width out of range".into()))?);
    let frame = Message::Forward(Forward {
        model: hop.model.clone(),
        span: hop.span,
        entries: hop.entries.to_vec(),
        hidden: Tensor::from_f32(hidden, shape, hop.wire)?,
    })
    .encode()?;
    let reply = node.request(peer, frame, timeout)?;
    output_of(node, peer, &reply, hop.entries, answer)
}

/// One worker of a chained route: who, where it may be dialed, and which layers it runs.
#[derive(Clone, Debug)]
pub struct ChainHop {
    /// The worker.
    pub peer: PeerId,
    /// Addresses the previous worker may dial it at (beyond those it knows); at most
    /// [`MAX_HOP_ADDRS`] are sent.
    pub addrs: Vec<Multiaddr>,
    /// The layers it runs.
    pub span: Span,
    /// Values per row of its answer (see [`Hop::width_out`]).
    pub width_out: usize,
}

/// What a chained forward gave: each hop's output in route order, up to the first hop that
/// failed, and that hop's index and error.
#[derive(Debug)]
pub struct ChainOutcome {
    /// The outputs of hops `0..outputs.len()`.
    pub outputs: Vec<Vec<f32>>,
    /// The hop that failed and why; `None` when every hop answered.
    pub failure: Option<(usize, Error)>,
}

/// Runs `hidden` through every hop of `route` as a chained route (see `net::relay`): a
/// `Relay` to the first worker, which passes its output on, and so on, with a `Collect` to
/// every later worker sent at the same time; each worker's output comes back as the answer
/// to the End node's own request, checked as [`forward`] checks its answer. `model`,
/// `entries` and `wire` mean what they mean in a [`Hop`] (whose span is each hop's).
///
/// Errors: [`Error::Shape`] / [`Error::InvalidArgument`] before anything is sent; once sent,
/// failures are the outcome's, so the caller keeps what the hops before them gave.
#[allow(clippy::too_many_arguments)]
pub fn forward_chain(
    node: &NodeHandle,
    route: &[ChainHop],
    model: &ModelId,
    entries: &[Entry],
    wire: DType,
    hidden: &[f32],
    width: usize,
    timeout: Option<Duration>,
) -> Result<ChainOutcome> {
    let Some(first) = route.first() else {
        return Err(Error::InvalidArgument("a chained route needs at least one hop".to_string()));
    };
    let shape = shape_of(entries, hidden, width)?;
    let next = route[1..]
        .iter()
        .map(|h| NextHop {
            peer: h.peer.to_bytes(),
            addrs: h.addrs.iter().take(MAX_HOP_ADDRS).map(|a| a.to_vec()).collect(),
            span: h.span,
        })
        .collect();
    let chain = next_chain_id();
    let relay = Message::Relay(Relay {
        chain,
        keep: false,
        next,
        forward: Forward { model: model.clone(), span: first.span, entries: entries.to_vec(), hidden: Tensor::from_f32(hidden, shape, wire)? },
    })
    .encode()?;
    let timeout = timeout.unwrap_or(node.request_timeout());
    // The relay first: it is the step's path; the collects only have to be there before
    // their outputs are.
    let mut pending = Vec::with_capacity(route.len());
    pending.push(node.start_request(first.peer, relay, Some(timeout)));
    for (i, hop) in route.iter().enumerate().skip(1) {
        // Hop i's input comes after i hops have run, each allowed `timeout`; the worker
        // gives up then, and the margin lets its own answer say so.
        let wait = timeout.saturating_mul(i as u32 + 1);
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        let collect = Message::Collect(Collect { chain, entries: entries.to_vec(), wait_ms }).encode()?;
        pending.push(node.start_request(hop.peer, collect, Some(wait + COLLECT_MARGIN)));
    }
    let mut outputs = Vec::with_capacity(route.len());
    for (i, (hop, request)) in route.iter().zip(pending).enumerate() {
        let answer = Shape::matrix(shape.dims()[0], u32::try_from(hop.width_out).map_err(|_| Error::Shape("width out of range".into()))?);
        match request.and_then(|r| r.wait()).and_then(|reply| output_of(node, hop.peer, &reply, entries, answer)) {
            Ok(values) => outputs.push(values),
            Err(err) => return Ok(ChainOutcome { outputs, failure: Some((i, err)) }),
        }
    }
    Ok(ChainOutcome { outputs, failure: None })
}

/// A chain id not used before by this process (seeded from the clock, so another process's
/// ids differ too; a collision would need the same sessions and steps besides).
fn next_chain_id() -> u64 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        std::sync::atomic::AtomicU64::new(nanos ^ u64::from(std::process::id()).rotate_left(40))
    });
    next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How much longer the End node waits for a `Collect`'s answer than the worker waits for
/// its relay.
const COLLECT_MARGIN: Duration = Duration::from_secs(2);

/// The shape of `hidden` as `entries`' rows of `width`, or why it is not one.
fn shape_of(entries: &[Entry], hidden: &[f32], width: usize) -> Result<Shape> {
    let rows: u64 = entries.iter().map(|e| u64::from(e.n_tokens)).sum();
    if width == 0 || hidden.len() as u64 != rows * width as u64 {
        return Err(Error::Shape(format!(
            "{} hidden values for {rows} tokens of width {width}",
            hidden.len()
        )));
    }
    Ok(Shape::matrix(
        u32::try_from(rows).map_err(|_| Error::Shape(format!("{rows} rows do not fit a frame")))?,
        u32::try_from(width).map_err(|_| Error::Shape(format!("width {width} does not fit a frame")))?,
    ))
}

/// The output a worker's answer carries, checked against the request (`entries`, `shape`);
/// its refusal, or an answer to something else, as [`Error::Worker`].
fn output_of(node: &NodeHandle, peer: PeerId, reply: &[u8], entries: &[Entry], shape: Shape) -> Result<Vec<f32>> {
    let refused = |code: ErrorCode, message: String| Error::Worker { peer: peer.to_string(), code, message };
    match Message::decode(reply, &node.limits()).map_err(|e| refused(ErrorCode::InvalidRequest, format!("undecodable answer: {e}")))? {
        Message::ForwardResult(r) if r.entries == entries && r.hidden.shape() == shape => Ok(r.hidden.to_f32()),
        Message::ForwardResult(r) => Err(refused(
            ErrorCode::InvalidRequest,
            format!(
                "an answer for entries {:?} of shape {:?}, to a request for {:?} of shape {:?}",
                r.entries,
                r.hidden.shape().dims(),
                entries,
                shape.dims()
            ),
        )),
        Message::Error(e) => Err(refused(e.code, e.message)),
        other => Err(refused(ErrorCode::InvalidRequest, format!("a {} frame in answer to a forward", other.kind()))),
    }
}
