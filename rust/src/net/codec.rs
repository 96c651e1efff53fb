//! The tensor protocol "/meshpy/tensor/1" on a libp2p stream: the requester writes one wire
//! frame, the server answers with one frame, and the stream may carry the next request.
//! Frames delimit themselves by their fixed header, so no extra length prefix is needed.
//!
//! [`read_frame`] takes the 24-byte fixed header first and checks it with
//! [`FrameHeader::parse`] against the receiver's [`Limits`], so an oversized or garbled frame
//! is refused before its body is read or any buffer is sized from its lengths; the body's
//! buffer then grows with the bytes that actually arrive (at most [`READ_CHUNK`] ahead), so a
//! peer announcing a large frame and sending little of it holds little memory; and a frame that
//! pauses for the stall timeout, or takes longer than that plus its length at
//! [`MIN_FRAME_RATE`], is refused, so nobody holds a buffer for long. A refusal is
//! answered with an `Error` frame, after which the server closes that stream (its unread rest
//! cannot be resynchronised); a peer that closes or breaks its stream mid-frame fails that one
//! request, never the connection or other streams.

use std::io;
use std::time::Duration;

use futures::prelude::*;
use libp2p::StreamProtocol;

use crate::error::Error;
use crate::wire::{ErrorCode, ErrorReply, FrameHeader, Limits, Message, SessionId, FIXED_HEADER_LEN};

/// The protocol name of tensor streams.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshpy/tensor/1");

/// Why reading a frame stopped short of a whole frame.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended cleanly before the first byte of a frame (the peer is done with it).
    Closed,
    /// The frame is refused (garbled, over the limits, cut short by the end of the stream);
    /// the reply says why, and the stream can still carry it.
    Refused(ErrorReply),
    /// The stream failed (reset, connection lost).
    Io(io::Error),
}

impl ReadError {
    /// The error as a core error, for a requester (which has nobody to reply to).
    pub fn into_error(self, what: &str) -> Error {
        match self {
            ReadError::Closed => Error::Network(format!("{what}: the peer closed the stream without answering")),
            ReadError::Refused(r) => Error::Network(format!("{what}: bad response frame: {}: {}", r.code, r.message)),
            ReadError::Io(e) => Error::Network(format!("{what}: {e}")),
        }
    }
}

/// How far ahead of the bytes received a frame's buffer is allocated.
pub const READ_CHUNK: usize = 256 << 10;

/// Reads one frame: the fixed header, checked against `limits`, then exactly the bytes it
/// announces. The first byte may take any time (an idle stream waits for its next request);
/// after it, a pause of `stall` (when given; it needs a tokio runtime) refuses the frame.
pub async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, limits: &Limits, stall: Option<Duration>) -> Result<Vec<u8>, ReadError> {
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    let first = read_full(io, &mut fixed[..1], None).await.map_err(|(e, _)| ReadError::Io(e))?;
    if first == 0 {
        return Err(ReadError::Closed);
    }
    // Once begun, a frame must keep coming: no pause of `stall`, and all of it within `stall`
    // plus its length at MIN_FRAME_RATE (so a byte now and then cannot hold a buffer forever).
    let begun = tokio_now(stall);
    let got = 1 + read_full(io, &mut fixed[1..], stall.map(|s| (s, deadline(begun, s, FIXED_HEADER_LEN))))
        .await
        .map_err(|(e, n)| stalled_or_io(e, 1 + n, FIXED_HEADER_LEN))?;
    if got < FIXED_HEADER_LEN {
        return Err(refused(
            ErrorCode::MalformedFrame,
            format!("truncated frame: the stream ended after {got} of the {FIXED_HEADER_LEN} fixed header bytes"),
        ));
    }
    let header = FrameHeader::parse(&fixed, limits).map_err(|e| ReadError::Refused(ErrorReply::from_error(&e, None)))?;
    // parse() checked frame_len against the limits: this is memory we agreed to spend.
    let total = header
        .frame_len()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| refused(ErrorCode::FrameTooLarge, "frame length does not fit this machine".to_string()))?;
    let mut frame = Vec::with_capacity(total.min(FIXED_HEADER_LEN + READ_CHUNK));
    frame.extend_from_slice(&fixed);
    while frame.len() < total {
        let start = frame.len();
        let want = (total - start).min(READ_CHUNK);
        frame.resize(start + want, 0);
        let got = read_full(io, &mut frame[start..], stall.map(|s| (s, deadline(begun, s, total))))
            .await
            .map_err(|(e, n)| stalled_or_io(e, start + n, total))?;
        if got < want {
            return Err(refused(
                ErrorCode::MalformedFrame,
                format!(
                    "truncated frame: the stream ended after {} of the {total} bytes its header announces",
                    start + got
                ),
            ));
        }
    }
    Ok(frame)
}

/// The slowest a frame may arrive once begun, on average (a live link is far faster).
pub const MIN_FRAME_RATE: usize = 64 << 10;

/// The time now, on tokio's clock, when limits apply (they need a tokio runtime).
fn tokio_now(stall: Option<Duration>) -> Option<tokio::time::Instant> {
    stall.map(|_| tokio::time::Instant::now())
}

/// When a frame of `len` bytes begun at `begun` must be whole.
fn deadline(begun: Option<tokio::time::Instant>, stall: Duration, len: usize) -> tokio::time::Instant {
    let begun = begun.unwrap_or_else(tokio::time::Instant::now);
    begun + stall + Duration::from_secs_f64(len as f64 / MIN_FRAME_RATE as f64)
}

/// Fills `buf` unless the stream ends first; returns the bytes read. With `limits` (a pause,
/// a deadline), a read that brings nothing for the pause, or runs past the deadline, fails
/// with `TimedOut`. A failure comes with the bytes read before it.
async fn read_full<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut [u8],
    limits: Option<(Duration, tokio::time::Instant)>,
) -> Result<usize, (io::Error, usize)> {
    let mut filled = 0;
    while filled < buf.len() {
        let read = io.read(&mut buf[filled..]);
        let got = match limits {
            None => read.await,
            Some((stall, deadline)) => {
                let until = deadline.min(tokio::time::Instant::now() + stall);
                tokio::time::timeout_at(until, read).await.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            }
        };
        match got {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, filled)),
        }
    }
    Ok(filled)
}

/// A failed read inside a frame: a stall is a refusal (the stream can still carry the reply),
/// anything else the stream's failure.
fn stalled_or_io(e: io::Error, at: usize, total: usize) -> ReadError {
    if e.kind() != io::ErrorKind::TimedOut {
        return ReadError::Io(e);
    }
    refused(
        ErrorCode::MalformedFrame,
        format!("the frame stalled: {at} of its {total} bytes arrived, more slowly than this node waits for"),
    )
}

fn refused(code: ErrorCode, message: String) -> ReadError {
    ReadError::Refused(ErrorReply { code, session: None, message })
}

/// Writes `frame` and flushes it.
pub async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, frame: &[u8]) -> io::Result<()> {
    io.write_all(frame).await?;
    io.flush().await
}

/// Whether `bytes` are exactly one frame by their fixed header (the body is not checked).
/// Anything else is sent on a stream of its own that the sender then closes, so the server
/// sees where it ends.
pub fn is_whole_frame(bytes: &[u8]) -> bool {
    FrameHeader::parse(bytes, &Limits::unlimited())
        .ok()
        .and_then(|h| h.frame_len())
        .is_some_and(|n| n == bytes.len() as u64)
}

/// An `Error` frame for `reply` (falls back to a bare internal error if the message cannot be
/// encoded, which only an over-long message could cause).
pub fn error_frame(reply: ErrorReply) -> Vec<u8> {
    Message::Error(reply).encode().unwrap_or_else(|e| {
        Message::Error(ErrorReply { code: ErrorCode::Internal, session: None, message: e.to_string() })
            .encode()
            .unwrap_or_default()
    })
}

/// An `Error` frame for a core error.
pub fn error_frame_for(err: &Error, session: Option<SessionId>) -> Vec<u8> {
    error_frame(ErrorReply::from_error(err, session))
}
