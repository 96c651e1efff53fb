//! Serving tensor requests: the [`FrameHandler`] a node calls for each inbound frame (on
//! tokio's blocking pool, so a long forward never stalls the swarm), and [`EchoHandler`], which
//! answers without a model, for testing the network alone.

use libp2p::PeerId;

use super::codec::{error_frame, error_frame_for};
use crate::wire::{ErrorCode, ErrorReply, ForwardResult, Limits, Message, SessionId, Span};

/// What became of one session a leaving worker tried to hand over ([`FrameHandler::hand_over`]).
#[derive(Clone, Debug)]
pub struct Handed {
    pub session: SessionId,
    /// The worker holding it now, or why it stayed here (no other provider of its layers,
    /// every one refused it or failed).
    pub to: std::result::Result<PeerId, String>,
    /// Positions its cache held, and the bytes of their state.
    pub positions: usize,
    pub bytes: usize,
    /// From starting to hold its requests back to the new worker's acknowledgement.
    pub seconds: f64,
}

/// Sends one request frame to a peer and waits for its answer (how a handler reaches other
/// workers, through its node).
pub type SendFrame<'a> = &'a dyn Fn(PeerId, Vec<u8>) -> crate::error::Result<Vec<u8>>;

/// Answers one request frame with one response frame. Implementations never fail: every
/// problem becomes an `Error` frame, so the requester always learns why.
pub trait FrameHandler: Send + Sync + 'static {
    /// The response frame for `request`, a whole frame (already within the node's limits,
    /// not decoded) from `peer`.
    fn handle(&self, peer: PeerId, request: &[u8]) -> Vec<u8>;

    /// Sessions held (for status and tests); handlers without sessions hold none.
    fn session_count(&self) -> usize {
        0
    }

    /// Stops taking new sessions (the node is leaving); sessions already held carry on.
    /// Handlers without sessions ignore it.
    fn drain(&self) {}

    /// Hands every session held to another worker serving its layers (the node is leaving):
    /// to the first of `targets` (a peer and the layers it serves) that serves the session's
    /// layers and takes it, through `send`. Blocks while the transfers run; never call it on
    /// the event loop. Handlers without sessions hand nothing over.
    fn hand_over(&self, _targets: &[(PeerId, Span)], _send: SendFrame<'_>) -> Vec<Handed> {
        Vec::new()
    }

    /// Sessions handed over whose End node has not yet asked for them here (and so does not
    /// yet know where they went): a leaving worker stays until this is 0 or its drain time ends.
    fn moves_untold(&self) -> usize {
        0
    }

    /// Housekeeping the node runs about once a second (on its event-loop thread, so keep it
    /// short): e.g. dropping idle sessions.
    fn maintain(&self) {}

    /// Whether `handle(request)` is short enough to run on the node's event loop instead of
    /// the blocking pool, saving two thread wake-ups per request (tens of microseconds each on
    /// a busy machine). The loop stalls meanwhile, so only what takes microseconds to a few
    /// milliseconds qualifies.
    fn inline(&self, _request: &[u8]) -> bool {
        false
    }

    /// `handle(request)` on the node's event loop, for a request `inline` took; `None` when it
    /// would have to wait (for other work the handler is doing), so the node runs `handle` on
    /// the blocking pool instead. It must never block.
    fn handle_inline(&self, peer: PeerId, request: &[u8]) -> Option<Vec<u8>> {
        Some(self.handle(peer, request))
    }

    /// The handler's live description for `Info` replies: a JSON object whose `"mode"` names
    /// the handler, with whatever a client choosing a peer wants to know (what it serves, its
    /// load). Called on the node's event loop, so keep it short.
    fn info(&self) -> serde_json::Value;
}

/// Echo mode: a `Forward` comes back as a `ForwardResult` with the same entries and tensor
/// bytes, `Ping` as `Pong`, `CloseSession` as an acknowledgement of every id; anything else is
/// an `InvalidRequest` error. Its `Info` mode is `"echo"`.
#[derive(Clone, Debug, Default)]
pub struct EchoHandler {
    /// What the handler decodes.
    pub limits: Limits,
}

impl EchoHandler {
    /// An echo handler decoding within `limits`.
    pub fn new(limits: Limits) -> Self {
        EchoHandler { limits }
    }
}

impl FrameHandler for EchoHandler {
    fn handle(&self, _peer: PeerId, request: &[u8]) -> Vec<u8> {
        let reply = match Message::decode(request, &self.limits) {
            Err(e) => return error_frame_for(&e, None),
            Ok(Message::Forward(f)) => Message::ForwardResult(ForwardResult { entries: f.entries, hidden: f.hidden }),
            Ok(Message::Ping(nonce)) => Message::Pong(nonce),
            Ok(Message::CloseSession(ids)) => Message::CloseSessionAck(ids),
            Ok(other) => return unexpected(other.kind()),
        };
        reply.encode().unwrap_or_else(|e| error_frame_for(&e, None))
    }

    fn inline(&self, _request: &[u8]) -> bool {
        true
    }

    fn info(&self) -> serde_json::Value {
        serde_json::json!({ "mode": "echo" })
    }
}

/// The error frame for a request of a kind a worker does not serve (a reply kind).
pub(crate) fn unexpected(kind: crate::wire::Kind) -> Vec<u8> {
    error_frame(ErrorReply {
        code: ErrorCode::InvalidRequest,
        session: None,
        message: format!("a {kind} frame is not a request"),
    })
}
