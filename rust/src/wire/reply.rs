//! The `Error` reply: a machine-readable code the client acts on (pick another provider,
//! restart the session, give up), the session it concerns, and a message for people.

use std::fmt;

use super::batch::SessionId;
use crate::error::{Error, Result};

/// Why a worker refused or failed a request (u16 on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// No KV cache for this session here: expired, closed, or never started on this worker.
    UnknownSession = 1,
    /// The worker serves another model (the content hash differs).
    WrongModel = 2,
    /// The worker does not host (all of) the requested layers.
    WrongSpan = 3,
    /// The worker cannot hold the session: its KV memory budget is spent. Try another
    /// provider.
    CannotHoldSession = 4,
    /// The session would grow past the model's context or the cache's length.
    ContextOverflow = 5,
    /// An entry's step or start position does not follow the session's last one.
    StepMismatch = 6,
    /// A well-formed frame the worker cannot act on (a hidden width that is not the model's,
    /// a dtype it does not take, ...).
    InvalidRequest = 7,
    /// The request frame did not decode.
    MalformedFrame = 8,
    /// The request frame is over the worker's limits.
    FrameTooLarge = 9,
    /// Anything else went wrong inside the worker.
    Internal = 10,
    /// A chained route broke at this hop: the worker could not pass its output on to the
    /// next one, or (answering a `Collect`) no relay reached it in time.
    RelayFailed = 11,
    /// The requester is over one of this node's per-peer limits (sessions, KV bytes, requests
    /// per second, streams at once); the message says which. Another provider may serve it.
    Overloaded = 12,
    /// The session is being handed to another worker (this one is leaving): send the same
    /// request again shortly; the answer then is `SessionMoved`, or the session stays here.
    SessionMoving = 13,
    /// The session was handed to another worker with its KV cache: send it there, nothing
    /// to replay. The message ends with that worker's peer id ([`ErrorReply::moved_to`]).
    SessionMoved = 14,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::UnknownSession,
        ErrorCode::WrongModel,
        ErrorCode::WrongSpan,
        ErrorCode::CannotHoldSession,
        ErrorCode::ContextOverflow,
        ErrorCode::StepMismatch,
        ErrorCode::InvalidRequest,
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::Internal,
        ErrorCode::RelayFailed,
        ErrorCode::Overloaded,
        ErrorCode::SessionMoving,
        ErrorCode::SessionMoved,
    ];

    /// Whether another provider of the layers (or the same worker, restarted) can serve the
    /// request after this refusal: the End node reroutes and replays the session's inputs
    /// then (after `SessionMoving` / `SessionMoved` it first waits / follows the session,
    /// with nothing to replay). The others (wrong model, context overflow, a request the worker cannot act on,
    /// a malformed or oversized frame) would fail anywhere, so they end the request.
    pub fn recoverable(self) -> bool {
        matches!(
            self,
            ErrorCode::UnknownSession
                | ErrorCode::CannotHoldSession
                | ErrorCode::StepMismatch
                | ErrorCode::WrongSpan
                | ErrorCode::Internal
                | ErrorCode::RelayFailed
                | ErrorCode::Overloaded
                | ErrorCode::SessionMoving
                | ErrorCode::SessionMoved
        )
    }

    /// The code with wire value `code`, or a frame error naming it.
    pub fn from_code(code: u16) -> Result<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| *c as u16 == code)
            .ok_or_else(|| Error::Frame(format!("unknown error code {code} (known: 1..=14)")))
    }

    /// The snake_case name ("unknown_session", ...), as Python sees it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::WrongModel => "wrong_model",
            ErrorCode::WrongSpan => "wrong_span",
            ErrorCode::CannotHoldSession => "cannot_hold_session",
            ErrorCode::ContextOverflow => "context_overflow",
            ErrorCode::StepMismatch => "step_mismatch",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::RelayFailed => "relay_failed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::SessionMoving => "session_moving",
            ErrorCode::SessionMoved => "session_moved",
        }
    }

    /// The code named `name` (as [`name`](Self::name) spells it).
    pub fn from_name(name: &str) -> Result<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown error code {name:?}; known: {}",
                    known.join(", ")
                ))
            })
    }

    /// The code a worker replies with when handling a request failed with `err`.
    pub fn for_error(err: &Error) -> ErrorCode {
        match err {
            Error::Frame(_) => ErrorCode::MalformedFrame,
            Error::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Error::ContextOverflow { .. } => ErrorCode::ContextOverflow,
            Error::Shape(_) | Error::InvalidArgument(_) | Error::UnsupportedType { .. } => {
                ErrorCode::InvalidRequest
            }
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The peer a refusal with `code` and `message` says the session moved to: the message's last
/// word, for `SessionMoved` ([`ErrorReply::moved`] writes it so); else `None`.
pub fn moved_to(code: ErrorCode, message: &str) -> Option<&str> {
    (code == ErrorCode::SessionMoved).then(|| message.rsplit(' ').next()).flatten().filter(|p| !p.is_empty())
}

/// The body of an `Error` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong, for the client's logic.
    pub code: ErrorCode,
    /// The session it concerns, when one does (an unknown session, a full cache).
    pub session: Option<SessionId>,
    /// What went wrong, for people (UTF-8).
    pub message: String,
}

impl ErrorReply {
    /// The `SessionMoved` reply for `session`, now held by peer `to` (its base58 id).
    pub fn moved(session: SessionId, to: &str) -> ErrorReply {
        ErrorReply { code: ErrorCode::SessionMoved, session: Some(session), message: format!("session {session} moved to {to}") }
    }

    /// The peer a `SessionMoved` reply names, else `None` (see [`moved_to`]).
    pub fn moved_to(&self) -> Option<&str> {
        moved_to(self.code, &self.message)
    }

    /// The reply a worker sends when a request failed with `err`.
    pub fn from_error(err: &Error, session: Option<SessionId>) -> ErrorReply {
        ErrorReply {
            code: ErrorCode::for_error(err),
            session,
            message: err.to_string(),
        }
    }
}
