//! What one peer may ask of a node at the network layer, and the count of every refusal.
//!
//! A node serves each peer's inbound tensor streams and requests within [`PeerLimits`]: at
//! most `max_streams` streams at once (each may hold a frame's read buffer), at most
//! `requests_per_second` requests (a token bucket holding one second's worth, so a burst that
//! size passes), and a frame that has begun must keep arriving (`stall_timeout` without a
//! byte, or the whole frame not in by `stall_timeout` plus its length at
//! `codec::MIN_FRAME_RATE`, refuses it and frees its buffer). A request over a limit is answered `Overloaded`,
//! which the End node treats as "try another provider"; the session limits per peer
//! (sessions, KV bytes) are the span handler's (`span::server`).
//!
//! [`Refusals`] counts every error a node answered, by code, for `Info` (`"refusals"`), so an
//! operator sees who is being turned away and why.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::wire::{ErrorCode, ErrorReply};

/// Per-peer limits at the network layer (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct PeerLimits {
    /// Inbound tensor streams one peer may have open at once.
    pub max_streams: usize,
    /// Requests one peer may send per second, on average; 0: no limit.
    pub requests_per_second: f64,
    /// Longest pause inside a frame (between its first byte and its last) before the frame
    /// is refused and its stream closed; a frame must also be whole within this plus its
    /// length at `codec::MIN_FRAME_RATE`.
    pub stall_timeout: Duration,
}

impl Default for PeerLimits {
    /// 128 streams, 2000 requests per second, 10 s stalls. An End node's busiest pattern,
    /// many sessions stepping one request each with a chained route's collects beside them,
    /// stays well under both counts; a frame on a live link never pauses for seconds.
    fn default() -> Self {
        PeerLimits { max_streams: 128, requests_per_second: 2000.0, stall_timeout: Duration::from_secs(10) }
    }
}

/// One peer's standing: streams open, and its token bucket.
struct Standing {
    streams: usize,
    tokens: f64,
    refilled: Instant,
}

/// The per-peer accounting of a node's server.
pub(crate) struct PeerGate {
    limits: PeerLimits,
    /// The protocol whose streams it counts ("tensor", "blob"), for messages.
    what: &'static str,
    peers: Mutex<HashMap<PeerId, Standing>>,
}

/// A stream admitted for `peer`; gives its slot back when dropped.
pub(crate) struct StreamSlot {
    gate: Arc<PeerGate>,
    peer: PeerId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut peers = self.gate.lock();
        if let Some(s) = peers.get_mut(&self.peer) {
            s.streams = s.streams.saturating_sub(1);
            // Forget a peer with nothing open and a full bucket: it costs nothing to re-create.
            if s.streams == 0 && self.gate.full(s) {
                peers.remove(&self.peer);
            }
        }
    }
}

impl PeerGate {
    pub(crate) fn new(limits: PeerLimits, what: &'static str) -> Self {
        PeerGate { limits, what, peers: Mutex::default() }
    }

    pub(crate) fn limits(&self) -> PeerLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Standing>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn burst(&self) -> f64 {
        self.limits.requests_per_second.max(1.0)
    }

    fn full(&self, s: &Standing) -> bool {
        self.limits.requests_per_second <= 0.0 || s.tokens + s.refilled.elapsed().as_secs_f64() * self.limits.requests_per_second >= self.burst()
    }

    fn standing<'a>(&self, peers: &'a mut HashMap<PeerId, Standing>, peer: PeerId) -> &'a mut Standing {
        peers.entry(peer).or_insert_with(|| Standing { streams: 0, tokens: self.burst(), refilled: Instant::now() })
    }

    /// Admits one more inbound stream of `peer`, or says why not.
    pub(crate) fn open_stream(self: &Arc<Self>, peer: PeerId) -> Result<StreamSlot, ErrorReply> {
        let mut peers = self.lock();
        let s = self.standing(&mut peers, peer);
        if s.streams >= self.limits.max_streams {
            return Err(overloaded(format!(
                "{peer} has {} {} streams open here, the most one peer may have at once",
                self.limits.max_streams,
                self.what
            )));
        }
        s.streams += 1;
        Ok(StreamSlot { gate: Arc::clone(self), peer })
    }

    /// Takes one request from `peer`'s bucket, or says why not.
    pub(crate) fn admit_request(&self, peer: PeerId) -> Result<(), ErrorReply> {
        let rate = self.limits.requests_per_second;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = self.burst();
        let mut peers = self.lock();
        let s = self.standing(&mut peers, peer);
        let now = Instant::now();
        s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate).min(burst);
        s.refilled = now;
        if s.tokens < 1.0 {
            return Err(overloaded(format!("{peer} sent more than {rate} requests per second, the most one peer may send here")));
        }
        s.tokens -= 1.0;
        Ok(())
    }
}

fn overloaded(message: String) -> ErrorReply {
    ErrorReply { code: ErrorCode::Overloaded, session: None, message }
}

/// Errors a node has answered, by code name.
#[derive(Default)]
pub(crate) struct Refusals(Mutex<BTreeMap<&'static str, u64>>);

impl Refusals {
    /// Counts one answer of `code`.
    pub(crate) fn count(&self, code: ErrorCode) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(code.name()).or_default() += 1;
    }

    /// The counts so far, as a JSON object (codes never answered are absent).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!(*self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
