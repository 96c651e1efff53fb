//! The fixed 24-byte frame header, message kinds, receive [`Limits`], and the bounds-checked
//! byte reader and writer the message codecs use.
//!
//! [`FrameHeader::parse`] reads only the first [`FIXED_HEADER_LEN`] bytes, so a transport can
//! check a frame's size against its limits before it reads (or allocates for) the body.

use std::fmt;

use crate::error::{Error, Result};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"MSHP";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header: magic, version, kind, flags, header length, reserved, payload
/// length.
pub const FIXED_HEADER_LEN: usize = 24;
/// The payload starts at a multiple of this many bytes from the frame start: the header
/// section is zero-padded so that tensors are aligned when the frame buffer is.
pub const PAYLOAD_ALIGN: usize = 8;

/// The kind of message a frame carries (byte 6 of the fixed header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Run a batch of entries through a span of layers (End node -> worker).
    Forward = 1,
    /// The span's output for a `Forward` (worker -> End node).
    ForwardResult = 2,
    /// A request failed: an error code, maybe a session, a message.
    Error = 3,
    /// Drop sessions and free their KV cache.
    CloseSession = 4,
    /// The sessions a `CloseSession` closed.
    CloseSessionAck = 5,
    /// A liveness / latency probe carrying a nonce.
    Ping = 6,
    /// The answer to a `Ping`, echoing its nonce.
    Pong = 7,
    /// Asks a node to describe itself (what it serves, its load); no fields.
    Info = 8,
    /// The answer to an `Info`: one JSON object.
    InfoReply = 9,
    /// A `Forward` on a chained route: run it, then pass the output on to the next hop.
    Relay = 10,
    /// Asks a worker of a chained route for its output of a relayed step, once it has it.
    Collect = 11,
    /// A worker's answer to the `Relay` a previous worker sent it: ran, and passed on.
    Relayed = 12,
    /// A session's KV cache, from a worker that is leaving to another provider of its layers.
    Handover = 13,
    /// The answer to a `Handover`: the session is held here now.
    HandoverAck = 14,
    /// Start a session as a copy of another's first positions (End node -> worker).
    ForkSession = 15,
    /// The answer to a `ForkSession`: the new session is held here.
    ForkSessionAck = 16,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 16] = [
        Kind::Forward,
        Kind::ForwardResult,
        Kind::Error,
        Kind::CloseSession,
        Kind::CloseSessionAck,
        Kind::Ping,
        Kind::Pong,
        Kind::Info,
        Kind::InfoReply,
        Kind::Relay,
        Kind::Collect,
        Kind::Relayed,
        Kind::Handover,
        Kind::HandoverAck,
        Kind::ForkSession,
        Kind::ForkSessionAck,
    ];

    /// The kind with wire code `code`, or a frame error naming it.
    pub fn from_code(code: u8) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| *k as u8 == code)
            .ok_or_else(|| {
                Error::Frame(format!(
                    "unknown message kind {code} at byte 6 (known: 1..=16)"
                ))
            })
    }

    /// The kind's snake_case name ("forward", "forward_result", ...), as Python sees it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::ForwardResult => "forward_result",
            Kind::Error => "error",
            Kind::CloseSession => "close_session",
            Kind::CloseSessionAck => "close_session_ack",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Info => "info",
            Kind::InfoReply => "info_reply",
            Kind::Relay => "relay",
            Kind::Collect => "collect",
            Kind::Relayed => "relayed",
            Kind::Handover => "handover",
            Kind::HandoverAck => "handover_ack",
            Kind::ForkSession => "fork_session",
            Kind::ForkSessionAck => "fork_session_ack",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a receiver accepts. Decoding checks every count against these before it allocates or
/// reads further, so a peer cannot make us allocate more than the bytes it actually sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame (fixed header + header section + payload), in bytes.
    pub max_frame_bytes: u64,
    /// Largest header section, in bytes (bounds what a transport reads before the payload).
    pub max_header_bytes: u32,
    /// Most entries (sessions) in one `Forward` batch, or session ids in a `CloseSession`.
    pub max_entries: u32,
    /// Widest hidden state (the tensor's last dimension).
    pub max_hidden: u32,
    /// Most token rows in one frame (the sum of the entries' token counts).
    pub max_tokens: u32,
}

impl Default for Limits {
    /// 256 MiB frames, 1 MiB header sections, 1024 entries, hidden width 65536, 65536 tokens.
    fn default() -> Self {
        Limits {
            max_frame_bytes: 256 << 20,
            max_header_bytes: 1 << 20,
            max_entries: 1024,
            max_hidden: 65536,
            max_tokens: 65536,
        }
    }
}

impl Limits {
    /// No limits beyond what the format itself can express (for tests and trusted input).
    pub fn unlimited() -> Self {
        Limits {
            max_frame_bytes: u64::MAX,
            max_header_bytes: u32::MAX,
            max_entries: u32::MAX,
            max_hidden: u32::MAX,
            max_tokens: u32::MAX,
        }
    }

    /// `Err(FrameTooLarge)` when `value > limit`.
    pub(crate) fn check(what: &'static str, value: u64, limit: u64) -> Result<()> {
        if value > limit {
            return Err(Error::FrameTooLarge { what, value, limit });
        }
        Ok(())
    }
}

/// The fixed header of a frame: everything a transport needs to know how many more bytes to
/// read and whether to read them at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message kind.
    pub kind: Kind,
    /// Bytes of the header section, padding included.
    pub header_len: u32,
    /// Bytes of the payload (raw tensor bytes).
    pub payload_len: u64,
}

impl FrameHeader {
    /// Reads and checks the fixed header from the first [`FIXED_HEADER_LEN`] bytes of
    /// `prefix` (more bytes are ignored): magic, version, kind, flags, reserved bytes, the
    /// header section's padding rule, and the sizes against `limits`.
    pub fn parse(prefix: &[u8], limits: &Limits) -> Result<FrameHeader> {
        let Some(fixed) = prefix.get(..FIXED_HEADER_LEN) else {
            return Err(Error::Frame(format!(
                "truncated fixed header: {} bytes, a frame starts with {FIXED_HEADER_LEN}",
                prefix.len()
            )));
        };
        let mut r = Reader::new(fixed, 0);
        let magic = r.array::<4>("magic")?;
        if magic != MAGIC {
            return Err(Error::Frame(format!(
                "bad magic {:02x?} at byte 0 (expected {:02x?} \"MSHP\")",
                magic, MAGIC
            )));
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(Error::Frame(format!(
                "unsupported version {version} at byte 4 (this build reads version {VERSION})"
            )));
        }
        let kind = Kind::from_code(r.u8("kind")?)?;
        let flags = r.u8("flags")?;
        if flags != 0 {
            return Err(Error::Frame(format!(
                "unknown flags {flags:#04x} at byte 7 (version {VERSION} defines none)"
            )));
        }
        let header_len = r.u32("header length")?;
        let reserved = r.u32("reserved")?;
        if reserved != 0 {
            return Err(Error::Frame(format!(
                "reserved bytes 12..16 are {reserved:#010x}, must be zero"
            )));
        }
        let payload_len = r.u64("payload length")?;
        Limits::check(
            "header section",
            header_len.into(),
            limits.max_header_bytes.into(),
        )?;
        if !(FIXED_HEADER_LEN as u64 + u64::from(header_len)).is_multiple_of(PAYLOAD_ALIGN as u64) {
            return Err(Error::Frame(format!(
                "header length {header_len} does not pad the payload to a multiple of \
                 {PAYLOAD_ALIGN} bytes"
            )));
        }
        let header = FrameHeader {
            kind,
            header_len,
            payload_len,
        };
        let frame_len = header.frame_len().ok_or_else(|| {
            Error::Frame(format!(
                "payload length {payload_len} overflows the frame size"
            ))
        })?;
        Limits::check("frame", frame_len, limits.max_frame_bytes)?;
        Ok(header)
    }

    /// Total bytes of the frame, or `None` if that overflows a u64.
    pub fn frame_len(&self) -> Option<u64> {
        (FIXED_HEADER_LEN as u64 + u64::from(self.header_len)).checked_add(self.payload_len)
    }

    /// Writes the fixed header into the first [`FIXED_HEADER_LEN`] bytes of `w`.
    pub(crate) fn write(&self, w: &mut Writer<'_>) {
        w.bytes(&MAGIC);
        w.u16(VERSION);
        w.u8(self.kind as u8);
        w.u8(0); // flags
        w.u32(self.header_len);
        w.u32(0); // reserved
        w.u64(self.payload_len);
    }
}

/// Bytes of zero padding after `unpadded` header-section bytes so that the payload starts at
/// a multiple of [`PAYLOAD_ALIGN`].
pub(crate) fn padding(unpadded: usize) -> usize {
    (PAYLOAD_ALIGN - (FIXED_HEADER_LEN + unpadded) % PAYLOAD_ALIGN) % PAYLOAD_ALIGN
}

/// A cursor over untrusted bytes: every read is bounds-checked and a short read is an error
/// naming the field and its offset in the frame.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Frame offset of `buf[0]`, for error messages.
    base: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, which starts at byte `base` of the frame.
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The frame offset of the next byte.
    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::Frame(format!(
                "truncated: {field} needs {n} bytes at byte {}, the section has {} left",
                self.offset(),
                self.remaining()
            )));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u128(&mut self, field: &str) -> Result<u128> {
        Ok(u128::from_le_bytes(self.array(field)?))
    }

    /// Checks that only zero padding (fewer than [`PAYLOAD_ALIGN`] bytes) is left, so no
    /// header section carries bytes its message does not account for.
    pub(crate) fn finish(&self, what: &str) -> Result<()> {
        let rest = &self.buf[self.pos..];
        if rest.len() >= PAYLOAD_ALIGN || rest.iter().any(|&b| b != 0) {
            return Err(Error::Frame(format!(
                "{} unexplained bytes at the end of the {what} header section (byte {}); \
                 at most {} zero padding bytes are allowed",
                rest.len(),
                self.offset(),
                PAYLOAD_ALIGN - 1
            )));
        }
        Ok(())
    }
}

/// A cursor writing into a buffer the encoder sized exactly beforehand; a write past the end
/// is a bug in the size computation (the slice indexing panics), never a property of input.
pub(crate) struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> Writer<'b> {
    /// A writer at the start of `buf`.
    pub(crate) fn new(buf: &'b mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// The next `n` bytes, to be filled by the caller.
    pub(crate) fn reserve(&mut self, n: usize) -> &mut [u8] {
        let out = &mut self.buf[self.pos..self.pos + n];
        self.pos += n;
        out
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.reserve(b.len()).copy_from_slice(b);
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn u128(&mut self, v: u128) {
        self.bytes(&v.to_le_bytes());
    }
}
