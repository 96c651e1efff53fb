//! What a `Forward` names: the model, the span of layers, and the batch of per-session
//! entries whose token rows make up the hidden-state tensor; plus the batch's consistency
//! rules, which encoder and decoder share.

use std::fmt;

use super::tensor::Shape;

/// A session (one generation) as the End node names it: 128 random bits, so End nodes that
/// never talk to each other do not collide on a shared worker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SessionId(pub u128);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Bytes of a model's content hash.
pub const MODEL_HASH_LEN: usize = 32;
/// Longest readable model name, in UTF-8 bytes (it is length-prefixed by one byte).
pub const MAX_MODEL_NAME_LEN: usize = 255;

/// A model as workers and End nodes agree on it: the content hash of its weights and config
/// (the identity: files with the same name but other bytes differ here) and a readable name
/// for logs and errors.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ModelId {
    /// Content hash of the weights and config (e.g. SHA-256 or BLAKE3; the wire only
    /// compares the bytes).
    pub hash: [u8; MODEL_HASH_LEN],
    /// Readable name, at most [`MAX_MODEL_NAME_LEN`] UTF-8 bytes.
    pub name: String,
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", self.name)?;
        for b in &self.hash[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A contiguous range of transformer layers: `first_layer .. first_layer + layer_count`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Span {
    /// Index of the first layer.
    pub first_layer: u32,
    /// Number of layers, at least 1.
    pub layer_count: u32,
}

impl Span {
    /// One past the last layer (computed in u64, so it never overflows).
    pub fn end(&self) -> u64 {
        u64::from(self.first_layer) + u64::from(self.layer_count)
    }

    /// Whether every layer of `other` is one of this span's.
    pub fn contains(&self, other: Span) -> bool {
        self.first_layer <= other.first_layer && other.end() <= self.end()
    }

    /// Why the span is invalid, if it is: no layers, or an end past `u32::MAX`.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.layer_count == 0 {
            return Some(format!(
                "span starting at layer {} has no layers",
                self.first_layer
            ));
        }
        if self.end() > u64::from(u32::MAX) {
            return Some(format!(
                "span {}+{} ends past layer {}",
                self.first_layer,
                self.layer_count,
                u32::MAX
            ));
        }
        None
    }
}

/// Bytes of one entry on the wire: session (16), step (8), start position (4), tokens (4).
pub const ENTRY_LEN: usize = 32;

/// One session's part of a batch: its token rows are `n_tokens` consecutive rows of the
/// hidden-state tensor, in entry order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Entry {
    /// The session.
    pub session: SessionId,
    /// The session's step counter (0 for the prefill, then one per call), so a worker can
    /// tell a retry or a gap from the next step.
    pub step: u64,
    /// Position of the first of these tokens in the session's sequence (= KV cache length
    /// before this call).
    pub start_pos: u32,
    /// Number of tokens (rows) of this entry, at least 1.
    pub n_tokens: u32,
}

/// Checks a batch against its tensor's shape: at least one entry, each with at least one
/// token and positions that fit a u32, no session twice, and a 2-D tensor of
/// `(sum of n_tokens, hidden)` with `hidden >= 1`. Returns the total token count and the
/// hidden width, or what is wrong (the caller makes it an argument or frame error).
pub(crate) fn check_batch(entries: &[Entry], shape: &Shape) -> Result<(u64, u32), String> {
    let tokens = check_entries(entries)?;
    match *shape.dims() {
        [rows, hidden] if u64::from(rows) == tokens && hidden >= 1 => Ok((tokens, hidden)),
        [rows, hidden] if hidden >= 1 => Err(format!(
            "the hidden-state tensor has {rows} rows, the entries {tokens} tokens"
        )),
        _ => Err(format!(
            "the hidden-state tensor must be (tokens, hidden >= 1), got shape {:?}",
            shape.dims()
        )),
    }
}

/// Checks entries alone (the rules of [`check_batch`] that do not involve the tensor);
/// returns their total token count.
pub(crate) fn check_entries(entries: &[Entry]) -> Result<u64, String> {
    if entries.is_empty() {
        return Err("a batch needs at least one entry".to_string());
    }
    let mut tokens = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if e.n_tokens == 0 {
            return Err(format!("entry {i} (session {}) has no tokens", e.session));
        }
        if u64::from(e.start_pos) + u64::from(e.n_tokens) > u64::from(u32::MAX) {
            return Err(format!(
                "entry {i} (session {}): start position {} + {} tokens overflows u32",
                e.session, e.start_pos, e.n_tokens
            ));
        }
        tokens += u64::from(e.n_tokens);
    }
    if entries.len() > 1 {
        let mut ids: Vec<u128> = entries.iter().map(|e| e.session.0).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "session {} appears twice in one batch",
                SessionId(w[0])
            ));
        }
    }
    Ok(tokens)
}
