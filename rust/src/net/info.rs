//! What a node says about itself: the answer to an `Info` frame, one JSON object.
//!
//! It merges, in this order (later keys win): the static description the node was given (the
//! device, thread count, version, bytes of weights loaded, ...), the handler's live one
//! ([`FrameHandler::info`]: what it serves, sessions, KV memory; `{"mode": "none"}` without a
//! handler), and the node's own `peer_id`, `listen_addrs` (each ending in `/p2p/<peer id>`) and
//! `relay` (the version of chained routes it serves), `relays` (how many it has run),
//! `refusals` (the errors it has answered, by code name) and `traffic` (frame bytes sent to
//! and received from each peer).
//! Every node answers `Info`, whatever its handler, and a node without a handler still answers
//! `Ping`.

use std::sync::RwLock;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Map, Value};

use super::codec::error_frame_for;
use super::FrameHandler;
use super::peers::Refusals;
use crate::wire::{ErrorCode, Message};

/// The chained-route protocol version a node serves, as its `Info` says (`"relay"`).
pub const RELAY_VERSION: u32 = 1;

/// A JSON object (the static part of a node's description).
pub type JsonObject = Map<String, Value>;

/// Bytes of tensor-protocol frames exchanged with each peer, both ways (for `Info`'s
/// `"traffic"`: `{peer: {"sent": n, "received": n}}`), whoever asked.
#[derive(Default)]
pub(crate) struct Traffic(std::sync::Mutex<std::collections::HashMap<PeerId, [u64; 2]>>);

impl Traffic {
    /// Counts `sent` and `received` bytes with `peer`.
    pub(crate) fn count(&self, peer: PeerId, sent: usize, received: usize) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(peer).or_default();
        entry[0] += sent as u64;
        entry[1] += received as u64;
    }

    fn to_json(&self) -> Value {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Value::Object(map.iter().map(|(p, [s, r])| (p.to_string(), json!({ "sent": s, "received": r }))).collect())
    }
}

/// The node's side of its description, shared by the event loop (which keeps the listen
/// addresses current), the handle (which sets the static part) and the serving tasks.
pub(crate) struct NodeInfo {
    peer_id: PeerId,
    /// Relays this node has run (for `Info`'s `"relays"`).
    relays: std::sync::atomic::AtomicU64,
    /// Errors this node has answered, by code (for `Info`'s `"refusals"`).
    refusals: Refusals,
    listen_addrs: RwLock<Vec<Multiaddr>>,
    fixed: RwLock<JsonObject>,
    /// Frame bytes per peer (for `Info`'s `"traffic"`), shared with the stream pool.
    pub(crate) traffic: std::sync::Arc<Traffic>,
}

impl NodeInfo {
    pub(crate) fn new(peer_id: PeerId, fixed: JsonObject) -> Self {
        NodeInfo {
            peer_id,
            relays: Default::default(),
            refusals: Refusals::default(),
            listen_addrs: RwLock::new(Vec::new()),
            fixed: RwLock::new(fixed),
            traffic: Default::default(),
        }
    }

    /// The node's peer id.
    pub(crate) fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Counts a relay run.
    pub(crate) fn count_relay(&self) {
        self.relays.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts an error answered.
    pub(crate) fn count_refusal(&self, code: ErrorCode) {
        self.refusals.count(code);
    }

    /// Records the listen addresses (without `/p2p/...`).
    pub(crate) fn set_listen_addrs(&self, addrs: &[Multiaddr]) {
        *self.listen_addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs.to_vec();
    }

    /// Merges `fields` into the static description (a key given replaces the old value).
    pub(crate) fn update(&self, fields: JsonObject) {
        self.fixed.write().unwrap_or_else(|e| e.into_inner()).extend(fields);
    }

    /// The whole description, with `handler`'s live part.
    pub(crate) fn describe(&self, handler: Option<&dyn FrameHandler>) -> Value {
        let mut out = self.fixed.read().unwrap_or_else(|e| e.into_inner()).clone();
        match handler.map_or_else(|| json!({ "mode": "none" }), |h| h.info()) {
            Value::Object(live) => out.extend(live),
            other => {
                out.insert("handler".to_string(), other);
            }
        }
        let addrs: Vec<String> = self
            .listen_addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(self.peer_id)).to_string())
            .collect();
        out.insert("peer_id".to_string(), Value::String(self.peer_id.to_string()));
        // The version of chained routes (`Relay` / `Collect`) this node serves.
        out.insert("relay".to_string(), json!(RELAY_VERSION));
        out.insert("relays".to_string(), json!(self.relays.load(std::sync::atomic::Ordering::Relaxed)));
        out.insert("listen_addrs".to_string(), json!(addrs));
        out.insert("refusals".to_string(), self.refusals.to_json());
        out.insert("traffic".to_string(), self.traffic.to_json());
        Value::Object(out)
    }

    /// The `InfoReply` frame describing the node.
    pub(crate) fn reply(&self, handler: Option<&dyn FrameHandler>) -> Vec<u8> {
        Message::InfoReply(self.describe(handler).to_string()).encode().unwrap_or_else(|e| error_frame_for(&e, None))
    }
}
