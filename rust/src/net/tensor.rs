//! Both ends of the tensor protocol on libp2p streams.
//!
//! Requesting: [`StreamPool`] keeps idle streams per peer and reuses them, so a decode step
//! costs one frame each way, with no stream negotiation and no per-request timers. A stream
//! goes back to the pool only after a clean answer; a request on a reused stream that fails
//! is retried once on a fresh one (the peer may have restarted). Bytes that are not exactly one
//! frame go on a stream of their own whose write side is then closed, so the server can tell
//! where they end.
//!
//! Serving: [`serve`] accepts inbound streams and answers each frame with the node's
//! [`FrameHandler`], inline when it says it is cheap, else on tokio's blocking pool, so a long
//! forward never stalls the node's event loop. `Info` frames the node answers itself (see
//! `info`), and `Ping` too when it has no handler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::time::Duration;

use futures::channel::oneshot;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, Stream};

use super::behaviour::InboundStreams;
use super::codec::{error_frame, error_frame_for, is_whole_frame, read_frame, write_frame, ReadError};
use super::info::{NodeInfo, Traffic};
use super::peers::PeerGate;
use super::relay::{self, Outbox};
use super::streams::Opener;
use super::serve::unexpected;
use super::FrameHandler;
use crate::error::{Error, Result};
use crate::wire::{ErrorCode, ErrorReply, FrameHeader, Kind, Limits, Message, FIXED_HEADER_LEN};

/// The handler slot, shared by the node (to set it) and the serving tasks (to call it).
pub(crate) type HandlerSlot = Arc<RwLock<Option<Arc<dyn FrameHandler>>>>;

/// Idle streams per peer, each with whether it is relayed.
type IdleStreams = HashMap<PeerId, Vec<(Stream, bool)>>;

/// Idle tensor streams per peer, and how to open more.
#[derive(Clone)]
pub(crate) struct StreamPool {
    opener: Opener,
    idle: Arc<Mutex<IdleStreams>>,
    limits: Limits,
    /// Half of it passes before each request goes out, half after its answer comes in
    /// ([`super::NodeConfig::emulated_rtt`]).
    emulated_rtt: Duration,
    /// Where bytes exchanged with each peer are counted.
    traffic: Arc<Traffic>,
}

/// Told once a request's frame is written to its stream (`Ok`), or why it never was.
pub(crate) type Sent = oneshot::Sender<std::result::Result<(), String>>;

impl StreamPool {
    pub(crate) fn new(opener: Opener, limits: Limits, emulated_rtt: Duration, traffic: Arc<Traffic>) -> Self {
        StreamPool { opener, idle: Arc::default(), limits, emulated_rtt, traffic }
    }

    /// An idle stream to `peer`; relayed ones are dropped once the peer is reachable
    /// directly, so traffic moves off the relay as soon as a hole is punched.
    fn take_idle(&self, peer: PeerId) -> Option<(Stream, bool)> {
        let direct = self.opener.is_direct(&peer);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let streams = idle.get_mut(&peer)?;
        if direct {
            streams.retain(|(_, relayed)| !relayed);
        }
        streams.pop()
    }

    fn put_idle(&self, peer: PeerId, stream: Stream, relayed: bool) {
        if relayed && self.opener.is_direct(&peer) {
            return;
        }
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_default().push((stream, relayed));
    }

    /// Forgets every idle stream (before shutdown).
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn open(&self, peer: PeerId, addrs: &[Multiaddr]) -> Result<(Stream, bool)> {
        self.opener
            .open_tagged(peer, addrs.to_vec())
            .await
            .map_err(|e| Error::Network(format!("cannot open a tensor stream to {peer}: {e}")))
    }

    /// Sends `frame` to `peer` and returns the answer frame.
    pub(crate) async fn request(&self, peer: PeerId, frame: Vec<u8>) -> Result<Vec<u8>> {
        self.request_via(peer, &[], frame, None).await
    }

    /// [`request`](Self::request), dialing `addrs` too if no connection is up, and telling
    /// `sent` once the frame is written (or why it could not be).
    pub(crate) async fn request_via(&self, peer: PeerId, addrs: &[Multiaddr], frame: Vec<u8>, mut sent: Option<Sent>) -> Result<Vec<u8>> {
        if !self.emulated_rtt.is_zero() {
            tokio::time::sleep(self.emulated_rtt / 2).await;
        }
        let answer = self.exchange_any(peer, addrs, frame, &mut sent).await;
        if let (Some(sent), Err(e)) = (sent, &answer) {
            let _ = sent.send(Err(e.to_string()));
        }
        if !self.emulated_rtt.is_zero() {
            tokio::time::sleep(self.emulated_rtt / 2).await;
        }
        answer
    }

    /// One request, on an idle stream or fresh ones (see the module documentation).
    async fn exchange_any(&self, peer: PeerId, addrs: &[Multiaddr], frame: Vec<u8>, sent: &mut Option<Sent>) -> Result<Vec<u8>> {
        let whole = is_whole_frame(&frame);
        if whole {
            if let Some(stream) = self.take_idle(peer) {
                match self.exchange(peer, stream, &frame, true, sent).await {
                    Ok(answer) => return answer,
                    Err(Unanswered(e)) => {
                        tracing::debug!(%peer, "reused tensor stream failed ({e}); retrying on a new one")
                    }
                }
            }
        }
        let mut attempt = 0;
        loop {
            let stream = self.open(peer, addrs).await?;
            match self.exchange(peer, stream, &frame, whole, sent).await {
                Err(Unanswered(e)) if attempt + 1 < OPEN_ATTEMPTS => {
                    tracing::debug!(%peer, "a new tensor stream got no answer ({e}); retrying");
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(attempt)).await;
                }
                Err(Unanswered(e)) => return Err(e),
                Ok(answer) => return answer,
            }
        }
    }

    /// One request each way on `stream`; a whole frame's stream goes back to the pool after a
    /// clean answer, other bytes are followed by closing the write side. The outer error is a
    /// stream that ended or broke before any answer (retryable on a fresh stream: the peer
    /// did not process the request), the inner result the request's.
    async fn exchange(
        &self,
        peer: PeerId,
        (mut stream, relayed): (Stream, bool),
        bytes: &[u8],
        whole: bool,
        sent: &mut Option<Sent>,
    ) -> std::result::Result<Result<Vec<u8>>, Unanswered> {
        let what = format!("request to {peer}");
        if whole {
            write_frame(&mut stream, bytes).await.map_err(|e| Unanswered(Error::Network(format!("{what}: {e}"))))?;
        } else {
            let sent = async {
                stream.write_all(bytes).await?;
                stream.close().await
            };
            // The server may answer and close before reading everything; its answer counts.
            if let Err(e) = sent.await {
                tracing::debug!(%peer, "writing a partial frame: {e}");
            }
        }
        if let Some(sent) = sent.take() {
            let _ = sent.send(Ok(()));
        }
        self.traffic.count(peer, bytes.len(), 0);
        let answer = match read_frame(&mut stream, &self.limits, None).await {
            Ok(answer) => {
                self.traffic.count(peer, 0, answer.len());
                answer
            }
            Err(e @ (ReadError::Closed | ReadError::Io(_))) => return Err(Unanswered(e.into_error(&what))),
            Err(e) => return Ok(Err(e.into_error(&what))),
        };
        // After an error answer the server may close the stream; do not reuse it.
        if whole && answer.get(6) != Some(&(Kind::Error as u8)) {
            self.put_idle(peer, stream, relayed);
        }
        Ok(Ok(answer))
    }
}

/// How often a request is tried on fresh streams that end without any answer (a connection
/// that died as the stream opened; the next try dials again). Such a stream never delivered an
/// answer, and the server only ends a stream unanswered when it could not read the request,
/// so sending again is safe.
const OPEN_ATTEMPTS: u64 = 2;

/// A request that got no answer at all (see [`StreamPool::exchange`]).
struct Unanswered(Error);

/// What serving a stream needs: the handler, the frame limits, the per-peer limits and the
/// node's description; for relays, the node's streams to other peers, its request timeout,
/// and the outputs waiting for a `Collect`.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) handler: HandlerSlot,
    pub(crate) limits: Limits,
    pub(crate) gate: Arc<PeerGate>,
    pub(crate) info: Arc<NodeInfo>,
    /// Inbound streams being served (each a task and, mid-frame, a buffer).
    pub(crate) streams: Arc<AtomicUsize>,
    pub(crate) pool: StreamPool,
    pub(crate) request_timeout: Duration,
    pub(crate) outbox: Arc<Outbox>,
}

/// Counts a stream being served for as long as it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts tensor streams and serves each on a task of its own until the runtime stops.
pub(crate) async fn serve(mut incoming: InboundStreams, server: Server) {
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(serve_stream(peer, stream, server.clone()));
    }
}

/// Calls the handler's housekeeping, and drops relay outputs nobody collected, every `period`
/// until the runtime stops.
pub(crate) async fn maintain(handler: HandlerSlot, outbox: Arc<Outbox>, period: std::time::Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        outbox.expire();
        let current = handler.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = current {
            h.maintain();
        }
    }
}

/// Answers frames on one stream until the peer closes it or a frame is refused. A peer that
/// goes away mid-frame (stream reset, connection lost, write side closed early) or stalls
/// inside a frame ends the stream's task and frees its buffer; other streams and sessions
/// carry on. A stream or request over the peer's limits is answered `Overloaded`; every error
/// answered is counted for `Info`.
async fn serve_stream(peer: PeerId, mut stream: Stream, server: Server) {
    let _counted = Counted::new(&server.streams);
    let refuse_stream = |reply: ErrorReply| {
        tracing::debug!(%peer, "refused a frame: {}", reply.message);
        server.info.count_refusal(reply.code);
        error_frame(reply)
    };
    let _slot = match server.gate.open_stream(peer) {
        Ok(slot) => slot,
        Err(reply) => {
            let _ = write_frame(&mut stream, &refuse_stream(reply)).await;
            let _ = stream.close().await;
            return;
        }
    };
    let stall = Some(server.gate.limits().stall_timeout);
    loop {
        let frame = match read_frame(&mut stream, &server.limits, stall).await {
            Ok(frame) => {
                server.info.traffic.count(peer, 0, frame.len());
                frame
            }
            Err(ReadError::Closed) => break,
            Err(ReadError::Refused(reply)) => {
                // The rest of the refused frame is unread: answer, then end the stream.
                let _ = write_frame(&mut stream, &refuse_stream(reply)).await;
                let _ = stream.close().await;
                break;
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!(%peer, "tensor stream failed: {e}");
                break;
            }
        };
        let collect = frame.get(6) == Some(&(Kind::Collect as u8));
        let answer = match server.gate.admit_request(peer) {
            Err(reply) => error_frame(reply),
            // A collect may wait minutes for its relay: give up on it when its requester
            // closes or resets the stream (an End node sends nothing more before the answer).
            Ok(()) if collect => {
                let mut probe = [0u8; 1];
                tokio::select! {
                    answer = answer(peer, frame, &server) => answer,
                    _ = futures::AsyncReadExt::read(&mut stream, &mut probe) => {
                        tracing::debug!(%peer, "a collect's requester went away before its answer");
                        break;
                    }
                }
            }
            Ok(()) => answer(peer, frame, &server).await,
        };
        if answer.get(6) == Some(&(Kind::Error as u8)) {
            if let Ok(Message::Error(reply)) = Message::decode(&answer, &Limits::unlimited()) {
                server.info.count_refusal(reply.code);
            }
        }
        if let Err(e) = write_frame(&mut stream, &answer).await {
            tracing::debug!(%peer, "cannot send an answer: {e}");
            break;
        }
        server.info.traffic.count(peer, answer.len(), 0);
    }
}

/// The answer to a whole frame: the node's own for `Info` (and `Ping` without a handler),
/// else the handler's.
async fn answer(peer: PeerId, frame: Vec<u8>, server: &Server) -> Vec<u8> {
    debug_assert!(frame.len() >= FIXED_HEADER_LEN);
    let handler = server.handler.read().unwrap_or_else(|e| e.into_inner()).clone();
    // read_frame checked the fixed header; the kind is all we need of it here.
    let kind = FrameHeader::parse(&frame, &Limits::unlimited()).map(|h| h.kind).ok();
    let node_answers = kind == Some(Kind::Info) || (handler.is_none() && kind == Some(Kind::Ping));
    if node_answers {
        return match Message::decode(&frame, &server.limits) {
            Ok(Message::Info) => server.info.reply(handler.as_deref()),
            Ok(Message::Ping(nonce)) => Message::Pong(nonce).encode().unwrap_or_else(|e| error_frame_for(&e, None)),
            Ok(other) => unexpected(other.kind()),
            Err(e) => error_frame_for(&e, None),
        };
    }
    let Some(handler) = handler else {
        return error_frame(ErrorReply {
            code: ErrorCode::InvalidRequest,
            session: None,
            message: "this node serves no layers".to_string(),
        });
    };
    match kind {
        Some(Kind::Relay) => relay::answer_relay(peer, frame, handler, server).await,
        Some(Kind::Collect) => relay::answer_collect(&frame, server).await,
        _ => run_handler(peer, frame, handler).await,
    }
}

/// The handler's answer to `frame`: inline when it says the request is cheap, else on the
/// blocking pool.
pub(crate) async fn run_handler(peer: PeerId, frame: Vec<u8>, handler: Arc<dyn FrameHandler>) -> Vec<u8> {
    if handler.inline(&frame) {
        if let Some(answer) = handler.handle_inline(peer, &frame) {
            return answer;
        }
    }
    tokio::task::spawn_blocking(move || handler.handle(peer, &frame)).await.unwrap_or_else(|e| {
        error_frame(ErrorReply {
            code: ErrorCode::Internal,
            session: None,
            message: format!("the handler failed: {e}"),
        })
    })
}
