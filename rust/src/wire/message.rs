//! Typed messages and their encoding to and decoding from whole frames.
//!
//! Encoding checks the message (the same rules decoding enforces, limits aside), sizes the
//! frame exactly, and writes it in one pass; f32 tensors are converted to their wire dtype
//! straight into the frame. Decoding checks the fixed header and every count against
//! [`Limits`] before it allocates, reads each field bounds-checked, and borrows the tensor
//! bytes from the input.

use super::batch::{
    check_batch, check_entries, Entry, ModelId, SessionId, Span, ENTRY_LEN, MAX_MODEL_NAME_LEN, MODEL_HASH_LEN,
};
use super::frame::{padding, FrameHeader, Kind, Limits, Reader, Writer, FIXED_HEADER_LEN};
use super::reply::{ErrorCode, ErrorReply};
use super::tensor::{DType, Shape, Tensor, TensorView, MAX_DIMS};
use crate::error::{Error, Result};

/// A `Forward` request: run `entries` through layers `span` of `model`.
#[derive(Clone, Debug, PartialEq)]
pub struct Forward<'a> {
    /// The model the client routes for; a worker serving another replies `WrongModel`.
    pub model: ModelId,
    /// The layers to run.
    pub span: Span,
    /// The sessions in the batch, in row order.
    pub entries: Vec<Entry>,
    /// Input hidden states, `(sum of n_tokens, hidden)`.
    pub hidden: Tensor<'a>,
}

/// A `ForwardResult` reply: the request's entries echoed, and the span's output.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardResult<'a> {
    /// The request's entries, in the same order.
    pub entries: Vec<Entry>,
    /// Output hidden states, `(sum of n_tokens, hidden)`.
    pub hidden: Tensor<'a>,
}

/// Most hops a `Relay` may still name after its own.
pub const MAX_RELAY_HOPS: usize = 64;
/// Most addresses a relay hop may carry, and the longest one in bytes.
pub const MAX_HOP_ADDRS: usize = 8;
/// Longest address a relay hop may carry, in bytes.
pub const MAX_HOP_ADDR_LEN: usize = 1024;
/// Longest peer id a relay hop may carry, in bytes (one length byte).
pub const MAX_PEER_ID_LEN: usize = 255;

/// A hop still ahead of a `Relay`: who runs it (the transport's peer id and addresses, as
/// bytes: the codec does not parse them) and which layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The peer's id, 1 to [`MAX_PEER_ID_LEN`] bytes.
    pub peer: Vec<u8>,
    /// Where the peer may be dialed, at most [`MAX_HOP_ADDRS`] of 1 to [`MAX_HOP_ADDR_LEN`]
    /// bytes each (a hint: the transport may know others).
    pub addrs: Vec<Vec<u8>>,
    /// The layers it runs.
    pub span: Span,
}

/// A `Relay` request: run `forward`, then send its output to `next[0]` as a `Relay` carrying
/// `next[1..]` (kept), if any hops are left. A kept relay (`keep`) is answered `Relayed` and
/// its output waits for a `Collect`; one not kept (the route's first hop, asked by the End
/// node itself) is answered with the output, as a `Forward` is.
#[derive(Clone, Debug, PartialEq)]
pub struct Relay<'a> {
    /// Names this attempt at the step: a `Collect` asks for the output of this chain and
    /// these entries, so a retry's collect never takes an earlier attempt's output.
    pub chain: u64,
    /// Whether the output waits for a `Collect` (the answer is then `Relayed`).
    pub keep: bool,
    /// The hops after this one, in order; at most [`MAX_RELAY_HOPS`].
    pub next: Vec<NextHop>,
    /// What to run here.
    pub forward: Forward<'a>,
}

/// A `Collect` request: the output of the kept relay with these entries, as a
/// `ForwardResult` (or the `Error` it ended with), waiting at most `wait_ms` for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collect {
    /// The relay's chain id.
    pub chain: u64,
    /// The relayed request's entries, exactly.
    pub entries: Vec<Entry>,
    /// How long the worker waits for the relay before answering `Timeout`.
    pub wait_ms: u32,
}

/// Length of a [`Handover`]'s state digest (SHA-256).
pub const STATE_DIGEST_LEN: usize = 32;

/// A `Handover` request: hold session `session` of layers `span` of `model` from now on, with
/// the KV cache `state` (the payload, as `KvCache::export_state` writes it) whose SHA-256 is
/// `digest`; `step` is the last step it ran, and the session counts against `owner` (the
/// peer that started it). Answered `HandoverAck` once held, or an `Error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover<'a> {
    pub model: ModelId,
    pub span: Span,
    pub session: SessionId,
    pub step: u64,
    /// The owner's peer id, 1 to [`MAX_PEER_ID_LEN`] bytes.
    pub owner: Vec<u8>,
    pub digest: [u8; STATE_DIGEST_LEN],
    pub state: &'a [u8],
}

/// A `ForkSession` request: start session `target` as a copy of the first `positions`
/// positions of session `source`'s KV cache here (its layers, its owner's limits, its last
/// step), so generations sharing a prompt prefill it once. Answered `ForkSessionAck(target)`,
/// or an `Error` that leaves nothing behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkSession {
    pub source: SessionId,
    pub target: SessionId,
    pub positions: u32,
}

/// A message: what one frame carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Message<'a> {
    /// Run a batch through a span.
    Forward(Forward<'a>),
    /// A span's output.
    ForwardResult(ForwardResult<'a>),
    /// A failed request.
    Error(ErrorReply),
    /// Close these sessions, freeing their KV caches.
    CloseSession(Vec<SessionId>),
    /// The sessions a `CloseSession` closed (those the worker held; unknown ones are left
    /// out).
    CloseSessionAck(Vec<SessionId>),
    /// A probe; the peer answers `Pong` with the same nonce.
    Ping(u64),
    /// The answer to a `Ping`.
    Pong(u64),
    /// Asks the peer to describe itself.
    Info,
    /// The answer to an `Info`: the text of one JSON object (UTF-8), kept as sent so that
    /// decoding and encoding again gives the same bytes. Both directions check that it is an
    /// object.
    InfoReply(String),
    /// Run a batch through a span, then pass it on along a chained route.
    Relay(Relay<'a>),
    /// The output of a kept relay, once there.
    Collect(Collect),
    /// A kept relay ran (the output waits for its `Collect`) and went on.
    Relayed,
    /// Take over a session with its KV cache.
    Handover(Handover<'a>),
    /// The session a `Handover` named is held here now.
    HandoverAck(SessionId),
    /// Start a session as a copy of another's first positions.
    ForkSession(ForkSession),
    /// The session a `ForkSession` started is held here now.
    ForkSessionAck(SessionId),
}

/// Bytes of an encoded tensor descriptor with `ndim` dimensions: dtype, ndim, u32 dims.
fn tensor_desc_len(ndim: usize) -> usize {
    2 + 4 * ndim
}

/// Bytes of a u32 count followed by `n` items of `item` bytes.
fn list_len(n: usize, item: usize) -> usize {
    4 + n * item
}

impl<'a> Message<'a> {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Forward(_) => Kind::Forward,
            Message::ForwardResult(_) => Kind::ForwardResult,
            Message::Error(_) => Kind::Error,
            Message::CloseSession(_) => Kind::CloseSession,
            Message::CloseSessionAck(_) => Kind::CloseSessionAck,
            Message::Ping(_) => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
            Message::Info => Kind::Info,
            Message::InfoReply(_) => Kind::InfoReply,
            Message::Relay(_) => Kind::Relay,
            Message::Collect(_) => Kind::Collect,
            Message::Relayed => Kind::Relayed,
            Message::Handover(_) => Kind::Handover,
            Message::HandoverAck(_) => Kind::HandoverAck,
            Message::ForkSession(_) => Kind::ForkSession,
            Message::ForkSessionAck(_) => Kind::ForkSessionAck,
        }
    }

    /// The tensor the payload carries, if the kind has one.
    pub fn tensor(&self) -> Option<&Tensor<'a>> {
        match self {
            Message::Forward(f) => Some(&f.hidden),
            Message::ForwardResult(r) => Some(&r.hidden),
            Message::Relay(r) => Some(&r.forward.hidden),
            _ => None,
        }
    }

    /// Checks what the decoder would reject (limits aside); errors are the caller's
    /// (`InvalidArgument` / `Shape`), not the frame's.
    fn check(&self) -> Result<()> {
        let invalid = Error::InvalidArgument;
        match self {
            Message::Forward(f) => check_forward(f)?,
            Message::Relay(r) => {
                check_forward(&r.forward)?;
                check_next_hops(&r.next).map_err(invalid)?;
            }
            Message::Collect(c) => {
                check_entry_count(c.entries.len())?;
                check_entries(&c.entries).map_err(invalid)?;
            }
            Message::ForwardResult(r) => {
                check_entry_count(r.entries.len())?;
                r.hidden.check()?;
                check_batch(&r.entries, &r.hidden.shape()).map_err(invalid)?;
            }
            Message::Error(e) => {
                // Keeps the header section length within its u32 field.
                if e.message.len() > (u32::MAX as usize) / 2 {
                    return Err(invalid(format!(
                        "error message of {} bytes is too long for a frame",
                        e.message.len()
                    )));
                }
            }
            Message::CloseSession(ids) | Message::CloseSessionAck(ids) => {
                check_entry_count(ids.len())?;
            }
            Message::InfoReply(json) => {
                if json.len() > (u32::MAX as usize) / 2 {
                    return Err(invalid(format!(
                        "info reply of {} bytes is too long for a frame",
                        json.len()
                    )));
                }
                check_json_object(json).map_err(|e| invalid(format!("info {e}")))?;
            }
            Message::Handover(h) => {
                if h.model.name.len() > MAX_MODEL_NAME_LEN {
                    return Err(invalid(format!("model name is {} bytes, at most {MAX_MODEL_NAME_LEN} fit a frame", h.model.name.len())));
                }
                if let Some(problem) = h.span.problem() {
                    return Err(invalid(problem));
                }
                if h.owner.is_empty() || h.owner.len() > MAX_PEER_ID_LEN {
                    return Err(invalid(format!("a handover owner of {} bytes (1 to {MAX_PEER_ID_LEN})", h.owner.len())));
                }
            }
            Message::ForkSession(f) => {
                if f.source == f.target {
                    return Err(invalid(format!("session {} cannot be forked into itself", f.source)));
                }
            }
            Message::Ping(_)
            | Message::Pong(_)
            | Message::Info
            | Message::Relayed
            | Message::HandoverAck(_)
            | Message::ForkSessionAck(_) => {}
        }
        Ok(())
    }

    /// Bytes of the header section before padding.
    fn section_len(&self) -> usize {
        match self {
            Message::Forward(f) => forward_section_len(f),
            Message::Relay(r) => 8 + 2 + r.next.iter().map(next_hop_len).sum::<usize>() + forward_section_len(&r.forward),
            Message::Collect(c) => 8 + 4 + list_len(c.entries.len(), ENTRY_LEN),
            Message::ForwardResult(r) => {
                list_len(r.entries.len(), ENTRY_LEN)
                    + tensor_desc_len(r.hidden.shape().dims().len())
            }
            Message::Error(e) => 2 + 1 + 16 + 4 + e.message.len(),
            Message::CloseSession(ids) | Message::CloseSessionAck(ids) => list_len(ids.len(), 16),
            Message::Ping(_) | Message::Pong(_) => 8,
            Message::Info | Message::Relayed => 0,
            Message::InfoReply(json) => 4 + json.len(),
            Message::Handover(h) => MODEL_HASH_LEN + 1 + h.model.name.len() + 8 + 16 + 8 + 1 + h.owner.len() + STATE_DIGEST_LEN,
            Message::HandoverAck(_) | Message::ForkSessionAck(_) => 16,
            Message::ForkSession(_) => 16 + 16 + 4,
        }
    }

    /// The fixed header this message encodes with; checks the message first.
    fn frame_header(&self) -> Result<FrameHeader> {
        self.check()?;
        let section = self.section_len();
        let header_len = u32::try_from(section + padding(section)).map_err(|_| {
            Error::InvalidArgument(format!("header section of {section} bytes overflows u32"))
        })?;
        Ok(FrameHeader {
            kind: self.kind(),
            header_len,
            payload_len: match self {
                Message::Handover(h) => h.state.len() as u64,
                _ => self.tensor().map_or(0, |t| t.byte_len() as u64),
            },
        })
    }

    /// Bytes of the encoded frame, after checking the message.
    pub fn encoded_len(&self) -> Result<usize> {
        let h = self.frame_header()?;
        frame_len_usize(&h)
    }

    /// The message as a new frame (allocated once, at its exact size).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let h = self.frame_header()?;
        let mut out = vec![0u8; frame_len_usize(&h)?];
        self.write(&h, &mut out);
        Ok(out)
    }

    /// Appends the frame to `out` (reuse one buffer across frames to save allocations).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let h = self.frame_header()?;
        let start = out.len();
        out.resize(start + frame_len_usize(&h)?, 0);
        self.write(&h, &mut out[start..]);
        Ok(())
    }

    /// Writes the frame into `buf`, sized exactly by `h`.
    fn write(&self, h: &FrameHeader, buf: &mut [u8]) {
        let mut w = Writer::new(buf);
        h.write(&mut w);
        match self {
            Message::Forward(f) => write_forward(&mut w, f),
            Message::Relay(r) => {
                w.u64(r.chain);
                w.u8(u8::from(r.keep));
                w.u8(r.next.len() as u8);
                for hop in &r.next {
                    w.u8(hop.peer.len() as u8);
                    w.bytes(&hop.peer);
                    w.u8(hop.addrs.len() as u8);
                    for addr in &hop.addrs {
                        w.u16(addr.len() as u16);
                        w.bytes(addr);
                    }
                    w.u32(hop.span.first_layer);
                    w.u32(hop.span.layer_count);
                }
                write_forward(&mut w, &r.forward);
            }
            Message::Collect(c) => {
                w.u64(c.chain);
                w.u32(c.wait_ms);
                write_entries(&mut w, &c.entries);
            }
            Message::ForwardResult(r) => {
                write_entries(&mut w, &r.entries);
                write_tensor_desc(&mut w, &r.hidden);
            }
            Message::Error(e) => {
                w.u16(e.code as u16);
                w.u8(u8::from(e.session.is_some()));
                w.u128(e.session.map_or(0, |s| s.0));
                w.u32(e.message.len() as u32);
                w.bytes(e.message.as_bytes());
            }
            Message::CloseSession(ids) | Message::CloseSessionAck(ids) => {
                w.u32(ids.len() as u32);
                for id in ids {
                    w.u128(id.0);
                }
            }
            Message::Ping(nonce) | Message::Pong(nonce) => w.u64(*nonce),
            Message::Info | Message::Relayed => {}
            Message::InfoReply(json) => {
                w.u32(json.len() as u32);
                w.bytes(json.as_bytes());
            }
            Message::Handover(h) => {
                w.bytes(&h.model.hash);
                w.u8(h.model.name.len() as u8);
                w.bytes(h.model.name.as_bytes());
                w.u32(h.span.first_layer);
                w.u32(h.span.layer_count);
                w.u128(h.session.0);
                w.u64(h.step);
                w.u8(h.owner.len() as u8);
                w.bytes(&h.owner);
                w.bytes(&h.digest);
            }
            Message::HandoverAck(id) | Message::ForkSessionAck(id) => w.u128(id.0),
            Message::ForkSession(f) => {
                w.u128(f.source.0);
                w.u128(f.target.0);
                w.u32(f.positions);
            }
        }
        let pad = FIXED_HEADER_LEN + h.header_len as usize - w.pos();
        w.bytes(&[0u8; 8][..pad]);
        if let Some(t) = self.tensor() {
            t.write_bytes(w.reserve(t.byte_len()));
        }
        if let Message::Handover(h) = self {
            w.bytes(h.state);
        }
        debug_assert_eq!(w.pos(), buf.len(), "encoder sized the frame wrongly");
    }

    /// Decodes one whole frame (exactly its bytes), checking it against `limits`. Tensors
    /// borrow from `frame`. Never panics: any input that is not a valid frame is an
    /// `Error::Frame` naming the field, or `Error::FrameTooLarge`.
    pub fn decode(frame: &'a [u8], limits: &Limits) -> Result<Message<'a>> {
        let h = FrameHeader::parse(frame, limits)?;
        // parse() checked frame_len against the limits; it may still exceed usize on 32-bit.
        let total = h.frame_len().unwrap_or(u64::MAX);
        if frame.len() as u64 != total {
            return Err(Error::Frame(format!(
                "{} frame is {total} bytes by its header (24 + {} + {}), the buffer holds {}",
                h.kind,
                h.header_len,
                h.payload_len,
                frame.len()
            )));
        }
        let section_end = FIXED_HEADER_LEN + h.header_len as usize;
        let mut r = Reader::new(&frame[FIXED_HEADER_LEN..section_end], FIXED_HEADER_LEN);
        let payload = &frame[section_end..];
        if !matches!(h.kind, Kind::Forward | Kind::ForwardResult | Kind::Relay | Kind::Handover) && !payload.is_empty() {
            return Err(Error::Frame(format!(
                "a {} frame has no payload, this one has {} bytes",
                h.kind,
                payload.len()
            )));
        }
        let msg = match h.kind {
            Kind::Forward => Message::Forward(read_forward(&mut r, payload, limits)?),
            Kind::Relay => {
                let chain = r.u64("chain id")?;
                let at = r.offset();
                let keep = match r.u8("keep flag")? {
                    0 => false,
                    1 => true,
                    flag => return Err(Error::Frame(format!("relay keep flag is {flag} at byte {at}, must be 0 or 1"))),
                };
                let at = r.offset();
                let n = r.u8("next hop count")? as usize;
                if n > MAX_RELAY_HOPS {
                    return Err(Error::Frame(format!("{n} next hops at byte {at}, at most {MAX_RELAY_HOPS}")));
                }
                let mut next = Vec::with_capacity(n);
                for _ in 0..n {
                    next.push(read_next_hop(&mut r)?);
                }
                let forward = read_forward(&mut r, payload, limits)?;
                Message::Relay(Relay { chain, keep, next, forward })
            }
            Kind::Collect => {
                let chain = r.u64("chain id")?;
                let wait_ms = r.u32("collect wait")?;
                let at = r.offset();
                let entries = read_entries(&mut r, limits)?;
                check_entries(&entries).map_err(|e| Error::Frame(format!("collect entries at byte {at}: {e}")))?;
                Message::Collect(Collect { chain, entries, wait_ms })
            }
            Kind::Relayed => Message::Relayed,
            Kind::Handover => {
                let hash = r.array::<MODEL_HASH_LEN>("model hash")?;
                let name_len = r.u8("model name length")?;
                let name = read_str(&mut r, name_len.into(), "model name")?;
                let span = read_span(&mut r)?;
                let session = SessionId(r.u128("session id")?);
                let step = r.u64("step")?;
                let at = r.offset();
                let owner_len = r.u8("owner length")? as usize;
                if owner_len == 0 {
                    return Err(Error::Frame(format!("handover at byte {at} has an empty owner")));
                }
                let owner = r.take(owner_len, "owner")?.to_vec();
                let digest = r.array::<STATE_DIGEST_LEN>("state digest")?;
                Message::Handover(Handover { model: ModelId { hash, name }, span, session, step, owner, digest, state: payload })
            }
            Kind::HandoverAck => Message::HandoverAck(SessionId(r.u128("session id")?)),
            Kind::ForkSessionAck => Message::ForkSessionAck(SessionId(r.u128("session id")?)),
            Kind::ForkSession => {
                let source = SessionId(r.u128("source session id")?);
                let target = SessionId(r.u128("target session id")?);
                let positions = r.u32("positions")?;
                if source == target {
                    return Err(Error::Frame(format!("session {source} cannot be forked into itself")));
                }
                Message::ForkSession(ForkSession { source, target, positions })
            }
            Kind::ForwardResult => {
                let entries = read_entries(&mut r, limits)?;
                let hidden = read_batch_tensor(&mut r, &entries, payload, limits)?;
                Message::ForwardResult(ForwardResult { entries, hidden })
            }
            Kind::Error => {
                let at = r.offset();
                let code =
                    ErrorCode::from_code(r.u16("error code")?).map_err(|e| at_byte(e, at))?;
                let at = r.offset();
                let has_session = r.u8("has-session flag")?;
                let session = r.u128("session id")?;
                let session = match (has_session, session) {
                    (0, 0) => None,
                    (1, id) => Some(SessionId(id)),
                    (0, _) => {
                        return Err(Error::Frame(format!(
                            "error frame: no session (byte {at} is 0) but a nonzero session id"
                        )))
                    }
                    (flag, _) => {
                        return Err(Error::Frame(format!(
                            "error frame: has-session flag is {flag} at byte {at}, must be 0 or 1"
                        )))
                    }
                };
                let len = r.u32("error message length")?;
                let message = read_str(&mut r, len as usize, "error message")?;
                Message::Error(ErrorReply {
                    code,
                    session,
                    message,
                })
            }
            Kind::CloseSession | Kind::CloseSessionAck => {
                let n = read_count(&mut r, 16, "session id count", limits)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(SessionId(r.u128("session id")?));
                }
                if h.kind == Kind::CloseSession {
                    Message::CloseSession(ids)
                } else {
                    Message::CloseSessionAck(ids)
                }
            }
            Kind::Ping => Message::Ping(r.u64("nonce")?),
            Kind::Pong => Message::Pong(r.u64("nonce")?),
            Kind::Info => Message::Info,
            Kind::InfoReply => {
                let len = r.u32("info length")?;
                let at = r.offset();
                let json = read_str(&mut r, len as usize, "info")?;
                check_json_object(&json)
                    .map_err(|e| Error::Frame(format!("info at byte {at} {e}")))?;
                Message::InfoReply(json)
            }
        };
        r.finish(h.kind.name())?;
        Ok(msg)
    }
}

/// The frame length as usize (it may not fit on 32-bit targets).
fn frame_len_usize(h: &FrameHeader) -> Result<usize> {
    h.frame_len()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::InvalidArgument("frame larger than the address space".to_string()))
}

/// An entry or id count the u32 count field can carry.
fn check_entry_count(n: usize) -> Result<()> {
    if u32::try_from(n).is_err() {
        return Err(Error::InvalidArgument(format!(
            "{n} entries do not fit a frame"
        )));
    }
    Ok(())
}

/// Why `json` is not the text of one JSON object, if it is not (to follow "info").
fn check_json_object(json: &str) -> std::result::Result<(), String> {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(other) => Err(format!(
            "must be a JSON object, got {}",
            match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            }
        )),
        Err(e) => Err(format!("is not valid JSON ({e})")),
    }
}

/// Adds the byte offset to a frame error about a value read at `at`.
fn at_byte(err: Error, at: usize) -> Error {
    match err {
        Error::Frame(msg) => Error::Frame(format!("byte {at}: {msg}")),
        other => other,
    }
}

/// Checks a `Forward`'s fields (also a `Relay`'s), as the decoder would.
fn check_forward(f: &Forward<'_>) -> Result<()> {
    let invalid = Error::InvalidArgument;
    if f.model.name.len() > MAX_MODEL_NAME_LEN {
        return Err(invalid(format!(
            "model name is {} bytes, at most {MAX_MODEL_NAME_LEN} fit a frame",
            f.model.name.len()
        )));
    }
    if let Some(problem) = f.span.problem() {
        return Err(invalid(problem));
    }
    check_entry_count(f.entries.len())?;
    f.hidden.check()?;
    check_batch(&f.entries, &f.hidden.shape()).map_err(invalid)?;
    Ok(())
}

/// Why a relay's next hops cannot be encoded, if they cannot.
fn check_next_hops(next: &[NextHop]) -> std::result::Result<(), String> {
    if next.len() > MAX_RELAY_HOPS {
        return Err(format!("{} next hops, at most {MAX_RELAY_HOPS}", next.len()));
    }
    for (i, hop) in next.iter().enumerate() {
        if hop.peer.is_empty() || hop.peer.len() > MAX_PEER_ID_LEN {
            return Err(format!("next hop {i}: a peer id of {} bytes (1 to {MAX_PEER_ID_LEN})", hop.peer.len()));
        }
        if hop.addrs.len() > MAX_HOP_ADDRS {
            return Err(format!("next hop {i}: {} addresses, at most {MAX_HOP_ADDRS}", hop.addrs.len()));
        }
        if let Some(a) = hop.addrs.iter().find(|a| a.is_empty() || a.len() > MAX_HOP_ADDR_LEN) {
            return Err(format!("next hop {i}: an address of {} bytes (1 to {MAX_HOP_ADDR_LEN})", a.len()));
        }
        if let Some(problem) = hop.span.problem() {
            return Err(format!("next hop {i}: {problem}"));
        }
    }
    Ok(())
}

/// Bytes of a `Forward`'s header section (also the tail of a `Relay`'s).
fn forward_section_len(f: &Forward<'_>) -> usize {
    MODEL_HASH_LEN + 1 + f.model.name.len() + 8 + list_len(f.entries.len(), ENTRY_LEN) + tensor_desc_len(f.hidden.shape().dims().len())
}

/// Bytes of one relay hop: peer, addresses, span.
fn next_hop_len(hop: &NextHop) -> usize {
    1 + hop.peer.len() + 1 + hop.addrs.iter().map(|a| 2 + a.len()).sum::<usize>() + 8
}

fn write_forward(w: &mut Writer<'_>, f: &Forward<'_>) {
    w.bytes(&f.model.hash);
    w.u8(f.model.name.len() as u8);
    w.bytes(f.model.name.as_bytes());
    w.u32(f.span.first_layer);
    w.u32(f.span.layer_count);
    write_entries(w, &f.entries);
    write_tensor_desc(w, &f.hidden);
}

fn read_forward<'a>(r: &mut Reader<'_>, payload: &'a [u8], limits: &Limits) -> Result<Forward<'a>> {
    let hash = r.array::<MODEL_HASH_LEN>("model hash")?;
    let name_len = r.u8("model name length")?;
    let name = read_str(r, name_len.into(), "model name")?;
    let span = read_span(r)?;
    let entries = read_entries(r, limits)?;
    let hidden = read_batch_tensor(r, &entries, payload, limits)?;
    Ok(Forward { model: ModelId { hash, name }, span, entries, hidden })
}

fn read_span(r: &mut Reader<'_>) -> Result<Span> {
    let span = Span { first_layer: r.u32("first layer")?, layer_count: r.u32("layer count")? };
    match span.problem() {
        Some(problem) => Err(Error::Frame(problem)),
        None => Ok(span),
    }
}

fn read_next_hop(r: &mut Reader<'_>) -> Result<NextHop> {
    let at = r.offset();
    let peer_len = r.u8("next hop peer id length")? as usize;
    if peer_len == 0 {
        return Err(Error::Frame(format!("next hop at byte {at} has an empty peer id")));
    }
    let peer = r.take(peer_len, "next hop peer id")?.to_vec();
    let at = r.offset();
    let n_addrs = r.u8("next hop address count")? as usize;
    if n_addrs > MAX_HOP_ADDRS {
        return Err(Error::Frame(format!("{n_addrs} next hop addresses at byte {at}, at most {MAX_HOP_ADDRS}")));
    }
    let mut addrs = Vec::with_capacity(n_addrs);
    for _ in 0..n_addrs {
        let at = r.offset();
        let len = r.u16("next hop address length")? as usize;
        if len == 0 || len > MAX_HOP_ADDR_LEN {
            return Err(Error::Frame(format!("a next hop address of {len} bytes at byte {at} (1 to {MAX_HOP_ADDR_LEN})")));
        }
        addrs.push(r.take(len, "next hop address")?.to_vec());
    }
    let span = read_span(r)?;
    Ok(NextHop { peer, addrs, span })
}

fn write_entries(w: &mut Writer<'_>, entries: &[Entry]) {
    w.u32(entries.len() as u32);
    for e in entries {
        w.u128(e.session.0);
        w.u64(e.step);
        w.u32(e.start_pos);
        w.u32(e.n_tokens);
    }
}

fn write_tensor_desc(w: &mut Writer<'_>, t: &Tensor<'_>) {
    let shape = t.shape();
    w.u8(t.dtype() as u8);
    w.u8(shape.dims().len() as u8);
    for &d in shape.dims() {
        w.u32(d);
    }
}

/// `len` bytes of UTF-8 as a string (the length was read from the frame; `take` checks it
/// against the bytes present before anything is allocated).
fn read_str(r: &mut Reader<'_>, len: usize, field: &str) -> Result<String> {
    let at = r.offset();
    let bytes = r.take(len, field)?;
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(e) => Err(Error::Frame(format!(
            "{field} at byte {at} is not UTF-8 ({e})"
        ))),
    }
}

/// A u32 count of items of `item_len` bytes, checked against the entry limit and against the
/// bytes left in the section, so the caller can allocate for it.
fn read_count(r: &mut Reader<'_>, item_len: usize, field: &str, limits: &Limits) -> Result<usize> {
    let at = r.offset();
    let n = r.u32(field)?;
    Limits::check("entry count", n.into(), limits.max_entries.into())?;
    let n = n as usize;
    let needed = n.saturating_mul(item_len);
    if needed > r.remaining() {
        return Err(Error::Frame(format!(
            "{field} {n} at byte {at} needs {needed} bytes, the section has {} left",
            r.remaining()
        )));
    }
    Ok(n)
}

fn read_entries(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<Entry>> {
    let n = read_count(r, ENTRY_LEN, "entry count", limits)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(Entry {
            session: SessionId(r.u128("entry session")?),
            step: r.u64("entry step")?,
            start_pos: r.u32("entry start position")?,
            n_tokens: r.u32("entry token count")?,
        });
    }
    Ok(entries)
}

/// Reads a tensor descriptor and checks it and the payload against the batch and `limits`.
fn read_batch_tensor<'a>(
    r: &mut Reader<'_>,
    entries: &[Entry],
    payload: &'a [u8],
    limits: &Limits,
) -> Result<Tensor<'a>> {
    let at = r.offset();
    let dtype = DType::from_code(r.u8("tensor dtype")?).map_err(|e| at_byte(e, at))?;
    let ndim = r.u8("tensor rank")?;
    if ndim == 0 || ndim as usize > MAX_DIMS {
        return Err(Error::Frame(format!(
            "tensor rank {ndim} at byte {} (1 to {MAX_DIMS})",
            at + 1
        )));
    }
    let mut dims = [0u32; MAX_DIMS];
    for d in &mut dims[..ndim as usize] {
        *d = r.u32("tensor dimension")?;
    }
    let shape = Shape::new(&dims[..ndim as usize])?;
    let (tokens, hidden) = check_batch(entries, &shape).map_err(Error::Frame)?;
    Limits::check("token count", tokens, limits.max_tokens.into())?;
    Limits::check("hidden width", hidden.into(), limits.max_hidden.into())?;
    let view = TensorView::new(dtype, shape, payload).map_err(|_| {
        Error::Frame(format!(
            "payload is {} bytes, a {} tensor of shape {:?} is {}",
            payload.len(),
            dtype.name(),
            shape.dims(),
            shape.byte_len(dtype).unwrap_or(u64::MAX)
        ))
    })?;
    Ok(Tensor::View(view))
}
