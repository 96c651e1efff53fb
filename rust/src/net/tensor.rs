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
//! forward never stalls the node's event loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use libp2p_stream::{Control, IncomingStreams};

use super::codec::{error_frame, is_whole_frame, read_frame, write_frame, ReadError, PROTOCOL};
use super::FrameHandler;
use crate::error::{Error, Result};
use crate::wire::{ErrorCode, ErrorReply, Kind, Limits, FIXED_HEADER_LEN};

/// The handler slot, shared by the node (to set it) and the serving tasks (to call it).
pub(crate) type HandlerSlot = Arc<RwLock<Option<Arc<dyn FrameHandler>>>>;

/// Idle tensor streams per peer, and how to open more.
#[derive(Clone)]
pub(crate) struct StreamPool {
    control: Control,
    idle: Arc<Mutex<HashMap<PeerId, Vec<Stream>>>>,
    limits: Limits,
}

impl StreamPool {
    pub(crate) fn new(control: Control, limits: Limits) -> Self {
        StreamPool { control, idle: Arc::default(), limits }
    }

    fn take_idle(&self, peer: PeerId) -> Option<Stream> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&peer)?.pop()
    }

    fn put_idle(&self, peer: PeerId, stream: Stream) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_default().push(stream);
    }

    /// Forgets every idle stream (before shutdown).
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn open(&self, peer: PeerId) -> Result<Stream> {
        let mut control = self.control.clone();
        control
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(|e| Error::Network(format!("cannot open a tensor stream to {peer}: {e}")))
    }

    /// Sends `frame` to `peer` and returns the answer frame.
    pub(crate) async fn request(&self, peer: PeerId, frame: Vec<u8>) -> Result<Vec<u8>> {
        if !is_whole_frame(&frame) {
            return self.request_once(peer, &frame).await;
        }
        if let Some(stream) = self.take_idle(peer) {
            match self.exchange(peer, stream, &frame).await {
                Ok(answer) => return Ok(answer),
                Err(e) => tracing::debug!(%peer, "reused tensor stream failed ({e}); retrying on a new one"),
            }
        }
        let stream = self.open(peer).await?;
        self.exchange(peer, stream, &frame).await
    }

    /// One frame each way on `stream`, which goes back to the pool after a clean answer.
    async fn exchange(&self, peer: PeerId, mut stream: Stream, frame: &[u8]) -> Result<Vec<u8>> {
        let what = format!("request to {peer}");
        write_frame(&mut stream, frame).await.map_err(|e| Error::Network(format!("{what}: {e}")))?;
        let answer = read_frame(&mut stream, &self.limits).await.map_err(|e| e.into_error(&what))?;
        // After an error answer the server may close the stream; do not reuse it.
        if answer.get(6) != Some(&(Kind::Error as u8)) {
            self.put_idle(peer, stream);
        }
        Ok(answer)
    }

    /// Sends bytes that are not one whole frame on a fresh stream and closes its write side.
    async fn request_once(&self, peer: PeerId, bytes: &[u8]) -> Result<Vec<u8>> {
        let what = format!("request to {peer}");
        let mut stream = self.open(peer).await?;
        let sent = async {
            stream.write_all(bytes).await?;
            stream.close().await
        };
        // The server may answer and close before reading everything; its answer still counts.
        if let Err(e) = sent.await {
            tracing::debug!(%peer, "writing a partial frame: {e}");
        }
        read_frame(&mut stream, &self.limits).await.map_err(|e| e.into_error(&what))
    }
}

/// Accepts tensor streams and serves each on a task of its own until the runtime stops.
pub(crate) async fn serve(mut incoming: IncomingStreams, handler: HandlerSlot, limits: Limits) {
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(serve_stream(peer, stream, Arc::clone(&handler), limits));
    }
}

/// Calls the handler's housekeeping every `period` until the runtime stops.
pub(crate) async fn maintain(handler: HandlerSlot, period: std::time::Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let current = handler.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = current {
            h.maintain();
        }
    }
}

/// Answers frames on one stream until the peer closes it or a frame is refused.
async fn serve_stream(peer: PeerId, mut stream: Stream, handler: HandlerSlot, limits: Limits) {
    loop {
        let frame = match read_frame(&mut stream, &limits).await {
            Ok(frame) => frame,
            Err(ReadError::Closed) => break,
            Err(ReadError::Refused(reply)) => {
                tracing::debug!(%peer, "refused a frame: {}", reply.message);
                // The rest of the refused frame is unread: answer, then end the stream.
                let _ = write_frame(&mut stream, &error_frame(reply)).await;
                let _ = stream.close().await;
                break;
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!(%peer, "tensor stream failed: {e}");
                break;
            }
        };
        let answer = answer(peer, frame, &handler).await;
        if let Err(e) = write_frame(&mut stream, &answer).await {
            tracing::debug!(%peer, "cannot send an answer: {e}");
            break;
        }
    }
}

/// The handler's answer to a whole frame.
async fn answer(peer: PeerId, frame: Vec<u8>, handler: &HandlerSlot) -> Vec<u8> {
    debug_assert!(frame.len() >= FIXED_HEADER_LEN);
    let handler = handler.read().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(handler) = handler else {
        return error_frame(ErrorReply {
            code: ErrorCode::InvalidRequest,
            session: None,
            message: "this node serves no layers".to_string(),
        });
    };
    if handler.inline() {
        return handler.handle(peer, &frame);
    }
    tokio::task::spawn_blocking(move || handler.handle(peer, &frame)).await.unwrap_or_else(|e| {
        error_frame(ErrorReply {
            code: ErrorCode::Internal,
            session: None,
            message: format!("the handler failed: {e}"),
        })
    })
}
