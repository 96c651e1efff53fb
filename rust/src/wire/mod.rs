//! The mesh's frame format: what an End node and a worker send each other, as bytes.
//!
//! Pure Rust, no I/O: a transport (libp2p request/response) carries one frame per request or
//! response body. [`Message::encode`] writes a frame, [`Message::decode`] reads one (tensors
//! as zero-copy views into the input), [`FrameHeader::parse`] reads just the fixed header so a
//! transport can refuse an oversized frame before reading its body.
//!
//! # Frame
//!
//! All integers are little-endian. A frame is a 24-byte fixed header, a header section of
//! `header_len` bytes, and a payload of `payload_len` bytes:
//!
//! | offset | size | field                                                              |
//! |-------:|-----:|--------------------------------------------------------------------|
//! |      0 |    4 | magic `b"MSHP"`                                                    |
//! |      4 |    2 | version u16, `1`                                                   |
//! |      6 |    1 | kind u8: 1 Forward, 2 ForwardResult, 3 Error, 4 CloseSession, 5 CloseSessionAck, 6 Ping, 7 Pong, 8 Info, 9 InfoReply, 10 Relay, 11 Collect, 12 Relayed, 13 Handover, 14 HandoverAck, 15 ForkSession, 16 ForkSessionAck |
//! |      7 |    1 | flags u8, `0` (none defined in version 1)                          |
//! |      8 |    4 | header_len u32: bytes of the header section, padding included       |
//! |     12 |    4 | reserved u32, `0`                                                  |
//! |     16 |    8 | payload_len u64: bytes of the payload                              |
//! |     24 |  h.. | header section: the kind's fields (below), then 0..=7 zero bytes so that `24 + header_len` is a multiple of 8 |
//! | 24 + header_len | payload_len | payload: raw little-endian tensor bytes, row-major (kinds 1, 2 and 10), a KV cache state (13); otherwise empty |
//!
//! The payload thus starts 8-byte aligned relative to the frame. Unknown versions, kinds,
//! flags, dtypes and error codes, nonzero reserved or padding bytes, and any byte the kind
//! does not account for are errors: a version 1 reader accepts exactly version 1 frames.
//!
//! # Header sections
//!
//! Shared pieces:
//!
//! - *entries*: `n: u32`, then `n` entries of 32 bytes each:
//!   `session u128 (16) | step u64 (8) | start_pos u32 (4) | n_tokens u32 (4)`.
//! - *tensor*: `dtype u8 (1 f32, 2 f16, 3 bf16) | ndim u8 (1..=4) | ndim × dim u32`, outermost
//!   first; the payload is exactly `product(dims) × size(dtype)` bytes.
//!
//! | kind | header section |
//! |------|----------------|
//! | Forward (1) | `model hash [u8; 32] \| name_len u8 \| name (UTF-8) \| first_layer u32 \| layer_count u32 \| entries \| tensor` |
//! | ForwardResult (2) | `entries \| tensor` |
//! | Error (3) | `code u16 \| has_session u8 (0/1) \| session u128 (0 when absent) \| message_len u32 \| message (UTF-8)` |
//! | CloseSession (4), CloseSessionAck (5) | `n u32 \| n × session u128` |
//! | Ping (6), Pong (7) | `nonce u64` |
//! | Info (8) | empty (`header_len` 0) |
//! | InfoReply (9) | `json_len u32 \| json (UTF-8 text of one JSON object)` |
//! | Relay (10) | `chain u64 \| keep u8 (0/1) \| n u8 (<= 64) \| n × next hop \| then exactly a Forward's fields` |
//! | Collect (11) | `chain u64 \| wait_ms u32 \| entries` |
//! | Relayed (12) | empty |
//! | Handover (13) | `model hash [u8; 32] \| name_len u8 \| name \| first_layer u32 \| layer_count u32 \| session u128 \| step u64 \| owner_len u8 (>= 1) \| owner peer id \| state digest [u8; 32] (SHA-256 of the payload)`; the payload is the cache state (`KvCache::export_state`) |
//! | HandoverAck (14), ForkSessionAck (16) | `session u128` |
//! | ForkSession (15) | `source u128 \| target u128 (not the source) \| positions u32` |
//!
//! A *next hop* is `peer_len u8 (>= 1) \| peer id bytes \| n_addrs u8 (<= 8) \| n_addrs ×
//! (addr_len u16 (1..=1024) \| address bytes) \| first_layer u32 \| layer_count u32`; the peer
//! id and addresses are the transport's (libp2p's binary forms), which the codec does not parse.
//!
//! Kinds 10-12 make a chained route: the End node sends a `Relay` (not kept) to the first
//! worker, which answers with its output like a `Forward` and sends its output on to the next
//! hop as a kept `Relay` naming the hops after it; a kept relay is answered `Relayed`, and its
//! output waits for the End node's `Collect` (sent to every later hop along with the first
//! relay). Old readers refuse the new kinds as unknown; a node says it serves them in its
//! `Info` (`"relay": 1`).
//!
//! Kinds 13-14 move a session off a leaving worker with its KV cache; kinds 15-16 start a
//! session as a copy of another's first positions on the same worker (several generations of
//! one prompt, or a kept prompt, prefill it once).
//!
//! In `Forward` and `ForwardResult` the tensor is `(sum of n_tokens, width)`: entry `i`'s
//! rows follow entry `i - 1`'s. `width` is the model's row width at the span's first layer
//! (the request) and past its last (the result): the hidden size, except for Gemma 4, whose
//! rows also carry the per-layer inputs of the layers still to run and the shared keys and
//! values crossing that boundary (`model::DecoderConfig::row_width`). The frame layout is
//! unchanged; a worker refuses rows of another width, naming the width it expects. A batch has at least one entry, every entry at least one
//! token, no session twice, `start_pos + n_tokens` fits a u32, and `layer_count >= 1`.
//!
//! # Example
//!
//! A `Forward` of model "tiny" (hash bytes 0..=31), layers 2..5, one entry (session 0x0102,
//! step 7, start 5, 2 tokens) and a bf16 tensor of shape (2, 4) is 136 bytes: the fixed
//! header, 91 bytes of fields + 5 bytes of padding (header_len 96), 16 bytes of payload.
//! The test `golden_forward_frame` holds its hex dump; `golden_info_frames` those of an
//! `Info` (24 bytes: the fixed header alone) and of the `InfoReply` `{"mode":"echo"}` (48
//! bytes: 4 + 15 bytes of fields, 5 of padding).
//!
//! An `InfoReply`'s JSON is bounded by the receiver's header section limit; its keys are the
//! node's business (see `net`), the codec only checks that it is one JSON object.
//!
//! # Limits
//!
//! [`Limits`] bounds what a receiver accepts (frame and header bytes, entries, tokens, hidden
//! width); every count is checked against them, and against the bytes actually present,
//! before anything is allocated. The codec checks structure only: whether a worker hosts the
//! model and span, or knows a session, is the worker's to answer with an [`ErrorReply`].

mod batch;
mod frame;
mod message;
mod reply;
mod tensor;

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tests_fuzz;

pub use batch::{Entry, ModelId, SessionId, Span, ENTRY_LEN, MAX_MODEL_NAME_LEN, MODEL_HASH_LEN};
pub use frame::{FrameHeader, Kind, Limits, FIXED_HEADER_LEN, MAGIC, PAYLOAD_ALIGN, VERSION};
pub use message::{
    Collect, ForkSession, Forward, ForwardResult, Handover, Message, NextHop, Relay, MAX_HOP_ADDRS, MAX_HOP_ADDR_LEN, MAX_PEER_ID_LEN,
    MAX_RELAY_HOPS, STATE_DIGEST_LEN,
};
pub use reply::{moved_to, ErrorCode, ErrorReply};
pub use tensor::{
    bf16_bytes_to_f32, bf16_to_f32, f16_bytes_to_f32, f32_bytes_to_f32, f32_to_bf16,
    f32_to_bf16_bytes, f32_to_f16_bytes, f32_to_f32_bytes, DType, Shape, Tensor, TensorView,
    MAX_DIMS,
};
