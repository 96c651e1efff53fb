//! Chained routes, the worker's side: a `Relay` runs through the handler like a `Forward`, and
//! its output goes on to the next hop as a kept `Relay`, so a decode step crosses each link
//! once (End node -> first worker -> ... -> last worker -> End node: N + 1 crossings for N
//! workers, where the star route pays 2N). The End node sends, along with the first relay, a
//! `Collect` to every later hop; each worker answers it with its output once the relay has
//! reached it and run, so the last worker's answer is the step's result, and every other
//! worker's output reaches the End node too, off the step's path. Replay inputs thus stay on
//! the End node, as on the star route: a lost worker never takes its successor's inputs with
//! it.
//!
//! A worker answers its own requester (the End node's relay or `Collect`) only once its relay
//! onward is written to the next hop's stream: a worker killed after answering has already
//! passed the step on. One that cannot pass it on answers `RelayFailed` instead of its output,
//! and the End node goes on hop by hop from there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::codec::{error_frame, error_frame_for};
use super::tensor::{run_handler, Server};
use super::FrameHandler;
use crate::wire::{Entry, ErrorCode, ErrorReply, Forward, Message, NextHop, Relay};

/// Longest a `Collect` may wait for its relay, whatever it asks.
const MAX_COLLECT_WAIT: Duration = Duration::from_secs(600);
/// An output nobody collected is dropped after this long.
const OUTBOX_TTL: Duration = Duration::from_secs(60);
/// Most bytes of outputs waiting for a `Collect`; past it the oldest are dropped.
const OUTBOX_BYTES: usize = 256 << 20;

/// What names one relayed step: its chain id and entries.
type Key = (u64, Vec<Entry>);

/// What the outbox holds for one relayed request (keyed by its chain id and entries).
enum Slot {
    /// The answer frame (a `ForwardResult`, or the `Error` the relay ended with).
    Ready { frame: Vec<u8>, at: Instant },
    /// `Collect`s that arrived first.
    Waiting(Vec<oneshot::Sender<Vec<u8>>>),
}

/// Outputs of kept relays, waiting for the End node's `Collect` (or `Collect`s waiting for
/// their relay: the two race, the `Collect` usually arriving first).
#[derive(Default)]
pub(crate) struct Outbox {
    slots: Mutex<HashMap<Key, Slot>>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `frame` to the `Collect`s waiting for `key`, or keeps it for one.
    pub(crate) fn put(&self, key: Key, frame: Vec<u8>) {
        let mut slots = self.lock();
        if let Some(Slot::Waiting(waiters)) = slots.remove(&key) {
            let mut live: Vec<_> = waiters.into_iter().filter(|w| !w.is_canceled()).collect();
            if let Some(last) = live.pop() {
                for w in live {
                    let _ = w.send(frame.clone());
                }
                let _ = last.send(frame);
                return;
            }
        }
        slots.insert(key, Slot::Ready { frame, at: Instant::now() });
        let mut held: usize = slots.values().map(|s| if let Slot::Ready { frame, .. } = s { frame.len() } else { 0 }).sum();
        while held > OUTBOX_BYTES {
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| if let Slot::Ready { at, frame } = s { Some((*at, frame.len(), k.clone())) } else { None })
                .min_by_key(|(at, _, _)| *at);
            let Some((_, len, k)) = oldest else { break };
            tracing::warn!("relay outputs past {OUTBOX_BYTES} bytes wait for collection; dropping the oldest");
            slots.remove(&k);
            held -= len;
        }
    }

    /// The frame kept for `key`, waiting at most `wait` for it: a `RelayFailed` error frame
    /// when none comes.
    pub(crate) async fn take(&self, key: Key, wait: Duration) -> Vec<u8> {
        let rx = {
            let mut slots = self.lock();
            match slots.remove(&key) {
                Some(Slot::Ready { frame, .. }) => return frame,
                Some(Slot::Waiting(mut waiters)) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    slots.insert(key.clone(), Slot::Waiting(waiters));
                    rx
                }
                None => {
                    let (tx, rx) = oneshot::channel();
                    slots.insert(key.clone(), Slot::Waiting(vec![tx]));
                    rx
                }
            }
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(frame)) => frame,
            _ => error_frame(ErrorReply {
                code: ErrorCode::RelayFailed,
                session: key.1.first().map(|e| e.session),
                message: format!("no relay for this step reached this worker within {:.1} s", wait.as_secs_f64()),
            }),
        }
    }

    /// Drops outputs older than the TTL and `Collect`s that gave up.
    pub(crate) fn expire(&self) {
        let now = Instant::now();
        self.lock().retain(|_, slot| match slot {
            Slot::Ready { at, .. } => now.duration_since(*at) < OUTBOX_TTL,
            Slot::Waiting(waiters) => {
                waiters.retain(|w| !w.is_canceled());
                !waiters.is_empty()
            }
        });
    }
}

/// Answers a `Relay`: runs it through the handler, passes a successful output on to the next
/// hop, then answers with the output (a relay not kept), or keeps it for the `Collect` and
/// answers `Relayed`.
pub(crate) async fn answer_relay(peer: PeerId, frame: Vec<u8>, handler: Arc<dyn FrameHandler>, server: &Server) -> Vec<u8> {
    let (relay, forward_frame) = match Message::decode(&frame, &server.limits) {
        Ok(Message::Relay(relay)) => match Message::Forward(relay.forward.clone()).encode() {
            Ok(f) => (RelayHead::of(&relay), f),
            Err(e) => return error_frame_for(&e, None),
        },
        Ok(other) => return super::serve::unexpected(other.kind()),
        Err(e) => return error_frame_for(&e, None),
    };
    drop(frame);
    let next = match relay.parse_next(server.info.peer_id()) {
        Ok(next) => next,
        Err(message) => {
            return error_frame(ErrorReply { code: ErrorCode::InvalidRequest, session: relay.first_session(), message })
        }
    };
    server.info.count_relay();
    let mut answer = run_handler(peer, forward_frame, handler).await;
    if let Some((first, addrs)) = next.into_iter().next() {
        if answer.get(6) == Some(&(crate::wire::Kind::ForwardResult as u8)) {
            if let Err(why) = pass_on(&answer, &relay, first, addrs, server).await {
                tracing::warn!(next = %first, "cannot pass a relay on: {why}");
                answer = error_frame(ErrorReply {
                    code: ErrorCode::RelayFailed,
                    session: relay.first_session(),
                    message: format!("ran this hop, but could not pass its output on to {first}: {why}"),
                });
            }
        }
    }
    if !relay.keep {
        return answer;
    }
    let failed = answer.get(6) == Some(&(crate::wire::Kind::Error as u8));
    let reply = if failed { answer.clone() } else { Message::Relayed.encode().unwrap_or_else(|e| error_frame_for(&e, None)) };
    server.outbox.put((relay.chain, relay.entries), answer);
    reply
}

/// Answers a `Collect` with the output it names, once there.
pub(crate) async fn answer_collect(frame: &[u8], server: &Server) -> Vec<u8> {
    match Message::decode(frame, &server.limits) {
        Ok(Message::Collect(c)) => {
            let wait = Duration::from_millis(c.wait_ms.into()).min(MAX_COLLECT_WAIT);
            server.outbox.take((c.chain, c.entries), wait).await
        }
        Ok(other) => super::serve::unexpected(other.kind()),
        Err(e) => error_frame_for(&e, None),
    }
}

/// What a relay's onward step needs once its frame is gone: the model, its entries, whether
/// it is kept, the hops after it.
struct RelayHead {
    chain: u64,
    span: crate::wire::Span,
    model: crate::wire::ModelId,
    entries: Vec<Entry>,
    keep: bool,
    next: Vec<NextHop>,
}

impl RelayHead {
    fn of(relay: &Relay<'_>) -> Self {
        RelayHead {
            chain: relay.chain,
            span: relay.forward.span,
            model: relay.forward.model.clone(),
            entries: relay.forward.entries.clone(),
            keep: relay.keep,
            next: relay.next.clone(),
        }
    }

    fn first_session(&self) -> Option<crate::wire::SessionId> {
        self.entries.first().map(|e| e.session)
    }

    /// The next hops' peers and addresses, parsed and checked: a route goes on through the
    /// layers after this hop's, each hop starting where the one before ends, through peers
    /// that are neither this node nor named twice, so a relay cannot loop; a hop's addresses
    /// may not name another peer (`/p2p/<id>`). Anything else is refused before anything runs.
    fn parse_next(&self, me: PeerId) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, String> {
        let mut end = self.span.end();
        let mut seen = vec![me];
        self.next
            .iter()
            .enumerate()
            .map(|(i, hop)| {
                let peer = PeerId::from_bytes(&hop.peer).map_err(|e| format!("next hop {i}: not a peer id ({e})"))?;
                if seen.contains(&peer) {
                    return Err(format!("next hop {i}: {peer} is on the route already"));
                }
                seen.push(peer);
                if u64::from(hop.span.first_layer) != end {
                    return Err(format!("next hop {i} starts at layer {}, the route is at layer {end}", hop.span.first_layer));
                }
                end = hop.span.end();
                let addrs = hop
                    .addrs
                    .iter()
                    .map(|a| {
                        let addr = Multiaddr::try_from(a.clone()).map_err(|e| format!("next hop {i}: not an address ({e})"))?;
                        match addr.iter().last() {
                            Some(Protocol::P2p(id)) if id != peer => Err(format!("next hop {i}: address {addr} is another peer's")),
                            _ => Ok(addr),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((peer, addrs))
            })
            .collect()
    }
}

/// Sends `answer`'s output to the relay's next hop (`peer`, dialed at `addrs` if need be) as a
/// kept relay naming the hops after it, and returns once the frame is written to its stream;
/// the next hop's own answer (`Relayed`, or its refusal, which the End node collects from it)
/// is only logged.
async fn pass_on(answer: &[u8], relay: &RelayHead, peer: PeerId, addrs: Vec<Multiaddr>, server: &Server) -> Result<(), String> {
    let result = match Message::decode(answer, &server.limits) {
        Ok(Message::ForwardResult(r)) => r,
        Ok(other) => return Err(format!("the handler answered with a {} frame", other.kind())),
        Err(e) => return Err(format!("the handler's answer does not decode: {e}")),
    };
    let onward = Message::Relay(Relay {
        chain: relay.chain,
        keep: true,
        next: relay.next[1..].to_vec(),
        forward: Forward { model: relay.model.clone(), span: relay.next[0].span, entries: result.entries, hidden: result.hidden },
    })
    .encode()
    .map_err(|e| e.to_string())?;
    let (sent_tx, sent_rx) = oneshot::channel();
    let (pool, timeout) = (server.pool.clone(), server.request_timeout);
    tokio::spawn(async move {
        let answer = tokio::time::timeout(timeout, pool.request_via(peer, &addrs, onward, Some(sent_tx))).await;
        match answer {
            Ok(Ok(frame)) if frame.get(6) == Some(&(crate::wire::Kind::Error as u8)) => {
                let why = match Message::decode(&frame, &crate::wire::Limits::unlimited()) {
                    Ok(Message::Error(e)) => format!("{}: {}", e.code, e.message),
                    _ => "an undecodable error".to_string(),
                };
                tracing::info!(%peer, "the next hop refused a relay: {why}");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::info!(%peer, "relay to the next hop failed: {e}"),
            Err(_) => tracing::info!(%peer, "relay to the next hop: no answer within {:.0} s", timeout.as_secs_f64()),
        }
    });
    match tokio::time::timeout(timeout, sent_rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(why))) => Err(why),
        Ok(Err(_)) => Err("the relay ended before it was written".to_string()),
        Err(_) => Err(format!("not written within {:.0} s", timeout.as_secs_f64())),
    }
}
