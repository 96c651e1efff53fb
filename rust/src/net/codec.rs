//! The tensor protocol's request/response codec: one wire frame per request and per response
//! on a fresh stream, delimited by the frame's own fixed header.
//!
//! The reader takes the 24-byte fixed header first and checks it with
//! [`FrameHeader::parse`] against the receiver's [`Limits`], so an oversized or garbled frame
//! is refused before its body is read or any buffer is sized from its lengths. On the serving
//! side a refusal becomes an [`Request::Refused`] the node answers with an `Error` frame
//! (the requester learns why); a peer that closes its stream mid-frame is refused the same
//! way, and a broken connection fails that one request only.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;

use crate::error::Error;
use crate::wire::{ErrorCode, ErrorReply, FrameHeader, Limits, FIXED_HEADER_LEN};

/// The protocol name of tensor frames.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshpy/tensor/1");

/// A tensor request: the frame a client sends, or, as the serving side read it, a refusal.
#[derive(Debug)]
pub enum Request {
    /// A whole frame, within the limits (its body is not decoded yet).
    Frame(Vec<u8>),
    /// A frame refused while reading: the reply to send instead of calling the handler.
    Refused(ErrorReply),
}

/// Reads and writes whole frames; `limits` bound what it reads.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    /// What this side accepts from peers.
    pub limits: Limits,
}

/// Why reading a frame stopped: the peer's bytes were wrong (answerable) or the stream broke.
enum ReadError {
    /// The frame is refused; the stream still works for a reply.
    Refused(ErrorReply),
    /// The stream failed (reset, closed connection).
    Io(io::Error),
}

/// Reads one frame: fixed header, checked, then exactly the bytes it announces.
async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, limits: &Limits) -> Result<Vec<u8>, ReadError> {
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    let got = read_full(io, &mut fixed).await.map_err(ReadError::Io)?;
    if got < FIXED_HEADER_LEN {
        return Err(refused(
            ErrorCode::MalformedFrame,
            format!("truncated frame: the stream ended after {got} of the {FIXED_HEADER_LEN} fixed header bytes"),
        ));
    }
    let header = FrameHeader::parse(&fixed, limits).map_err(|e| ReadError::Refused(ErrorReply::from_error(&e, None)))?;
    // parse() checked frame_len against the limits, so it fits memory we agreed to spend.
    let total = header
        .frame_len()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| refused(ErrorCode::FrameTooLarge, "frame length does not fit this machine".to_string()))?;
    let mut frame = vec![0u8; total];
    frame[..FIXED_HEADER_LEN].copy_from_slice(&fixed);
    let got = read_full(io, &mut frame[FIXED_HEADER_LEN..]).await.map_err(ReadError::Io)?;
    if got < total - FIXED_HEADER_LEN {
        return Err(refused(
            ErrorCode::MalformedFrame,
            format!(
                "truncated frame: the stream ended after {} of the {total} bytes its header announces",
                FIXED_HEADER_LEN + got
            ),
        ));
    }
    Ok(frame)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
async fn read_full<T: AsyncRead + Unpin + Send>(io: &mut T, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match io.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn refused(code: ErrorCode, message: String) -> ReadError {
    ReadError::Refused(ErrorReply { code, session: None, message })
}

/// An io error carrying a refusal's text, for the requesting side (which has nobody to reply to).
fn to_io(e: ReadError) -> io::Error {
    match e {
        ReadError::Io(e) => e,
        ReadError::Refused(r) => io::Error::new(io::ErrorKind::InvalidData, format!("{}: {}", r.code, r.message)),
    }
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        match read_frame(io, &self.limits).await {
            Ok(frame) => Ok(Request::Frame(frame)),
            Err(ReadError::Refused(reply)) => Ok(Request::Refused(reply)),
            Err(ReadError::Io(e)) => Err(e),
        }
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, &self.limits).await.map_err(to_io)
    }

    /// Writes the request bytes as given: the sender owns their validity (tests send garbage
    /// on purpose; the receiver checks everything).
    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Request::Frame(bytes) => {
                io.write_all(&bytes).await?;
                io.close().await
            }
            Request::Refused(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, "a refusal is not a request")),
        }
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}

/// An `Error` frame for `reply` (falls back to a bare internal error if the message cannot be
/// encoded, which only an over-long message could cause).
pub fn error_frame(reply: ErrorReply) -> Vec<u8> {
    crate::wire::Message::Error(reply).encode().unwrap_or_else(|e| {
        crate::wire::Message::Error(ErrorReply { code: ErrorCode::Internal, session: None, message: e.to_string() })
            .encode()
            .unwrap_or_default()
    })
}

/// An `Error` frame for a core error.
pub fn error_frame_for(err: &Error, session: Option<crate::wire::SessionId>) -> Vec<u8> {
    error_frame(ErrorReply::from_error(err, session))
}
