//! The server half of the span protocol: a worker serving a span of layers. [`SpanHandler`] answers `Forward` frames by running a
//! [`DecoderSpan`] on the CPU, entirely in Rust, with one KV cache per session.
//!
//! A worker loaded with layers `a..b` serves any contiguous sub-range `s..e` of them
//! (`a <= s < e <= b`), so a client can route a session through part of a worker's span.
//! Sessions start with a `Forward` whose start position is 0, which also fixes the session's
//! layers (its cache holds `e - s` layers); they live until `CloseSession`, until they stay
//! unused for the idle timeout, or until the worker drops. KV memory is accounted per position
//! actually held ([`KvCache::held_bytes`]: every position of a global layer, the bounded
//! window of a sliding-window layer), against a budget: a request is admitted when its tokens
//! fit as if every layer grew by all of them (the most a step can add), and after the pass
//! the session is accounted at what it really holds. A request that does not fit is refused
//! with `CannotHoldSession`, so the client picks another provider. Each peer may also start
//! at most `sessions_per_peer` sessions and hold `kv_bytes_per_peer` with them; past either
//! its requests are refused `Overloaded`. A session counts against the peer that started it,
//! the requester the worker can authenticate: on a chained route that is the previous
//! worker, so a per-peer KV share must leave room for every session relayed through it.
//! Every refused request leaves every cache as it was.
//!
//! Requests are idempotent: an entry whose start position is below the session's cache length
//! is a retry (the client lost an answer, or replays a step), so the cache is cut back to that
//! position, its KV bytes given back, and the tokens run again; a start past the length is a
//! gap, refused with `StepMismatch`, and so is a retry further back than the sliding-window
//! layers still hold (at least the last step can always be retried). The budget check before
//! a request still counts all its tokens as new. Steps never go back: a request whose step is
//! older than the last one run is stale (a chained route's relay the End node overtook by
//! retrying) and refused with `StepMismatch`, so it cannot cut a newer cache back.
//!
//! A worker that is leaving hands its sessions over ([`SpanHandler::hand_over`]): for each, it
//! holds the session's requests back (`SessionMoving`: ask again shortly), sends the cache's
//! state to another provider of the session's layers in a `Handover` frame with its SHA-256,
//! and once that worker has checked and loaded it (`HandoverAck`), answers every later request
//! for the session `SessionMoved`, naming the new worker: the End node sends the same step
//! there and replays nothing. A hand-over that fails leaves the session here as it was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use sha2::{Digest, Sha256};

use super::batcher::{Batcher, Claim, Job};
use crate::net::{error_frame, error_frame_for, unexpected, FrameHandler, Handed, SendFrame};
use crate::error::Error;
use super::backend::{CpuSpan, SpanBackend};
use crate::compute::ThreadPool;
use crate::model::{DecoderSpan, KvCache, SeqChunk};
use crate::wire::{
    DType, Entry, ErrorCode, ErrorReply, ForkSession, Forward, ForwardResult, Handover, Limits, Message, ModelId, SessionId, Shape, Span,
    Tensor,
};

/// Largest request frame a [`SpanHandler`] answers on the node's event loop: 64 KiB is a few
/// tokens of hidden states (16 of a 1024-wide model in f32, 4 of a 4096-wide one).
const INLINE_FRAME_BYTES: usize = 64 << 10;

/// How many sessions, how long, and how much KV memory a [`SpanHandler`] allows.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// KV cache bytes all sessions together may hold.
    pub kv_budget_bytes: u64,
    /// A session unused this long is dropped.
    pub idle_timeout: Duration,
    /// Most positions one session may reach (capped by the model's context).
    pub max_positions: usize,
    /// Most sessions one peer may hold here at once.
    pub sessions_per_peer: usize,
    /// Most KV bytes one peer's sessions may hold together (the budget caps it too).
    pub kv_bytes_per_peer: u64,
}

impl Default for SessionLimits {
    /// 512 MiB of KV cache, 5 minutes of idleness, the model's whole context, 1024 sessions
    /// per peer (on a chained route every session relayed through a worker counts against
    /// it), and no KV share per peer below the budget.
    fn default() -> Self {
        SessionLimits {
            kv_budget_bytes: 512 << 20,
            idle_timeout: Duration::from_secs(300),
            max_positions: usize::MAX,
            sessions_per_peer: 1024,
            kv_bytes_per_peer: u64::MAX,
        }
    }
}

/// One session's state on this worker.
struct Session {
    /// Keys and values of the session's layers (see [`Held::span`]).
    cache: KvCache,
    last_used: Instant,
    /// The step of the last request that ran: an older one is stale (a relay overtaken by
    /// the End node's own retry) and is refused rather than allowed to cut the cache back.
    step: u64,
}

/// A session in the table: the layers it runs (fixed when it starts), the peer that started
/// it (its limits count the session), the KV bytes it held after its last request, and its
/// state.
struct Held {
    span: Span,
    owner: PeerId,
    bytes: u64,
    session: Arc<Mutex<Session>>,
}

/// A session handed over (or being handed over) to another worker.
enum Moved {
    /// Its state is on its way: its requests are answered `SessionMoving`.
    Moving,
    /// Held by `to` now: its requests are answered `SessionMoved`. `told`: its `owner` (the
    /// End node) was answered so itself (a previous worker relaying a step to this one does
    /// not count: the End node may not have collected that answer yet); `at`: when it moved
    /// (markers go after the idle timeout).
    To { to: PeerId, owner: PeerId, told: bool, at: Instant },
}

/// Every session, and the KV bytes they hold or have reserved for requests in flight (in
/// all, and reserved per requesting peer); sessions handed over, and how many came and went.
#[derive(Default)]
struct Table {
    sessions: HashMap<SessionId, Held>,
    used_bytes: u64,
    reserved: HashMap<PeerId, u64>,
    moved: HashMap<SessionId, Moved>,
    handed_over: u64,
    taken_over: u64,
}

impl Table {
    /// The refusal for `peer`'s request on `session` when it moved or is moving away; marks
    /// the End node told when it is the one asking.
    fn moved_refusal(&mut self, session: SessionId, peer: PeerId) -> Option<Refusal> {
        match self.moved.get_mut(&session)? {
            Moved::Moving => Some(refuse(
                ErrorCode::SessionMoving,
                Some(session),
                format!("session {session} is being handed to another worker; ask again shortly"),
            )),
            Moved::To { to, owner, told, .. } => {
                *told |= *owner == peer;
                Some(Box::new(ErrorReply::moved(session, &to.to_string())))
            }
        }
    }

    /// The sessions `peer` started here, and the KV bytes they hold plus what its requests in
    /// flight have reserved.
    fn owned_by(&self, peer: PeerId) -> (usize, u64) {
        let (n, held) = self.sessions.values().filter(|h| h.owner == peer).fold((0usize, 0u64), |(n, b), h| (n + 1, b + h.bytes));
        (n, held + self.reserved.get(&peer).copied().unwrap_or(0))
    }

    /// Gives back `bytes` of `peer`'s reservations.
    fn unreserve(&mut self, peer: PeerId, bytes: u64) {
        if let Some(r) = self.reserved.get_mut(&peer) {
            *r = r.saturating_sub(bytes);
            if *r == 0 {
                self.reserved.remove(&peer);
            }
        }
    }
}

/// The sessions of one request, in entry order, each marked when this request created it.
type Admitted = Vec<(Arc<Mutex<Session>>, bool)>;

/// A `Forward` that passed the checks and admission, owned, waiting for its batch.
struct Queued {
    entries: Vec<Entry>,
    span: Span,
    /// The rows, in f32; the answer goes back in `dtype` with `shape`.
    hidden: Vec<f32>,
    dtype: DType,
    shape: Shape,
    sessions: Admitted,
    total_tokens: u64,
    /// Who sent it (its reservation counts against this peer).
    peer: PeerId,
}

/// A queued request's sessions, locked for its batch's span call: their guards in entry
/// order, the sessions a retry cut back (index, length before), and the KV bytes they held.
struct Locked<'a> {
    guards: Vec<MutexGuard<'a, Session>>,
    cut: Vec<(usize, usize)>,
    held_before: i64,
}

/// How sessions have shared span calls: for `Info` ("span_calls", "span_entries": session
/// entries run, "largest_batch": most entries in one call). Entries of one request and of
/// requests batched together count alike.
#[derive(Default)]
struct BatchStats {
    calls: u64,
    entries: u64,
    largest: usize,
    /// Time spent in span calls ("span_seconds").
    busy: std::time::Duration,
}

impl BatchStats {
    fn record(&mut self, entries: usize, took: std::time::Duration) {
        self.calls += 1;
        self.entries += entries as u64;
        self.largest = self.largest.max(entries);
        self.busy += took;
    }
}

/// A refusal: the reply to send, as an error code, maybe a session, and a message.
type Refusal = Box<ErrorReply>;

fn refuse(code: ErrorCode, session: Option<SessionId>, message: String) -> Refusal {
    Box::new(ErrorReply { code, session, message })
}

fn internal(message: &str) -> Refusal {
    refuse(ErrorCode::Internal, None, message.to_string())
}

/// Serves `Forward` requests for one span of one model from a session table; see the module
/// documentation for the session rules.
pub struct SpanHandler {
    span: Arc<dyn SpanBackend>,
    model: ModelId,
    limits: Limits,
    session_limits: SessionLimits,
    table: Mutex<Table>,
    batches: Batcher<Queued>,
    stats: Mutex<BatchStats>,
    /// Set when the worker is leaving: new sessions are refused (`CannotHoldSession`, so the
    /// End node starts them elsewhere), held ones carry on.
    draining: std::sync::atomic::AtomicBool,
    /// A test adversary ([`LIAR_ENV`]): the share of requests whose output it corrupts.
    liar: Option<f64>,
}

/// Environment variable that turns a worker into a liar for tests of `--verify`: a number in
/// (0, 1], the share of requests (picked by session and step) whose output rows it negates
/// before answering. Read when a handler is made; never set it outside tests.
pub const LIAR_ENV: &str = "MESHPY_TEST_LIAR";

/// Whether the liar corrupts the answer for `session` at `step`: a fixed hash of the two
/// against `rate`, so a test can tell in advance and a replay of the step lies alike.
fn lies(rate: f64, session: SessionId, step: u64) -> bool {
    // splitmix64's finalizer over the session's halves and the step.
    let mut z = (session.0 as u64) ^ ((session.0 >> 64) as u64).rotate_left(32) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < rate
}

impl SpanHandler {
    /// A handler running `span` on the CPU with `pool` for requests naming `model`, decoding
    /// frames within `limits`.
    pub fn new(span: Arc<DecoderSpan>, pool: Arc<ThreadPool>, model: ModelId, limits: Limits, session_limits: SessionLimits) -> Self {
        Self::with_backend(Arc::new(CpuSpan { span, pool }), model, limits, session_limits)
    }

    /// [`Self::new`] for a span computed by `span`, whichever backend.
    pub fn with_backend(span: Arc<dyn SpanBackend>, model: ModelId, limits: Limits, session_limits: SessionLimits) -> Self {
        SpanHandler {
            span,
            model,
            limits,
            session_limits,
            table: Mutex::new(Table::default()),
            batches: Batcher::default(),
            stats: Mutex::new(BatchStats::default()),
            draining: Default::default(),
            liar: std::env::var(LIAR_ENV).ok().and_then(|v| v.parse::<f64>().ok()).filter(|r| *r > 0.0).inspect(|r| {
                tracing::warn!("{LIAR_ENV}={r}: this worker corrupts that share of its outputs (a test adversary)")
            }),
        }
    }

    /// Whether a batch is running or requests wait for one.
    pub fn busy(&self) -> bool {
        self.batches.busy()
    }

    /// The layers served.
    pub fn span(&self) -> Span {
        Span { first_layer: self.span.first_layer() as u32, layer_count: self.span.n_layers() as u32 }
    }

    /// KV cache bytes the sessions hold ([`KvCache::held_bytes`] summed), plus reservations of
    /// requests in flight.
    pub fn used_kv_bytes(&self) -> u64 {
        self.lock_table().used_bytes
    }

    /// Drops sessions idle for longer than the idle timeout; returns how many. Runs before
    /// every request and, through [`FrameHandler::maintain`], about once a second.
    pub fn expire_idle(&self) -> usize {
        let now = Instant::now();
        let mut table = self.lock_table();
        let idle = self.session_limits.idle_timeout;
        let mut expired = Vec::new();
        for (id, held) in &table.sessions {
            // A session busy with a request is in use, not idle.
            if let Ok(s) = held.session.try_lock() {
                if now.duration_since(s.last_used) > idle {
                    expired.push((*id, held_bytes(&s.cache)));
                }
            }
        }
        for (id, bytes) in &expired {
            table.sessions.remove(id);
            table.used_bytes = table.used_bytes.saturating_sub(*bytes);
            tracing::info!(session = %id, "session expired after {:.0} s idle", idle.as_secs_f64());
        }
        table.moved.retain(|_, m| !matches!(m, Moved::To { at, .. } if now.duration_since(*at) > idle));
        expired.len()
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// KV bytes one more position of a session running `span` costs at most (all its layers;
    /// sliding-window layers give theirs back once they drop old positions).
    fn bytes_per_position(&self, span: Span) -> u64 {
        let first = (span.first_layer - self.span.first_layer() as u32) as usize;
        self.span.kv_bytes_per_position(first..first + span.layer_count as usize) as u64
    }

    fn max_positions(&self) -> usize {
        self.session_limits.max_positions.min(self.span.config().max_positions)
    }

    /// Runs a decoded `Forward`: checks it, admits its sessions, and queues it for the next
    /// batch (see `batcher`), or runs it alone under `claim`; the response frame, a
    /// refusal's included.
    fn forward(&self, peer: PeerId, req: Forward<'_>, claim: Option<Claim<'_, Queued>>) -> Vec<u8> {
        let queued = match self.check_and_admit(peer, &req) {
            Ok(queued) => queued,
            Err(refusal) => {
                tracing::debug!(%peer, "refused a forward: {}", refusal.message);
                return error_frame(*refusal);
            }
        };
        let crashed = || error_frame(*internal("the batch this request was in failed"));
        match claim {
            Some(claim) => claim.run(queued, |batch| self.run_batch(batch), &crashed),
            None => self.batches.submit(queued, |batch| self.run_batch(batch), &crashed),
        }
    }

    /// Refuses a request for another model, or for layers outside this worker's.
    fn check_served(&self, model: &ModelId, span: Span, session: Option<SessionId>) -> Result<(), Refusal> {
        if model.hash != self.model.hash {
            return Err(refuse(ErrorCode::WrongModel, session, format!("this worker serves {}, not {model}", self.model)));
        }
        let mine = self.span();
        if !mine.contains(span) {
            return Err(refuse(
                ErrorCode::WrongSpan,
                session,
                format!(
                    "this worker serves layers {}..{}, the request asks for {}..{}",
                    mine.first_layer,
                    mine.end(),
                    span.first_layer,
                    span.end()
                ),
            ));
        }
        Ok(())
    }

    /// The checks a request passes alone (model, layers, width), then admission; the
    /// request, owned, ready to queue.
    fn check_and_admit(&self, peer: PeerId, req: &Forward<'_>) -> Result<Queued, Refusal> {
        let first_session = req.entries.first().map(|e| e.session);
        self.check_served(&req.model, req.span, first_session)?;
        let mine = self.span();
        // The rows entering the asked layers: hidden states, and for Gemma 4 per-layer inputs
        // and carried keys and values (`DecoderConfig::row_width`).
        let first = (req.span.first_layer - mine.first_layer) as usize;
        let width = self.span.row_width(first);
        let shape = req.hidden.shape();
        if shape.dims().last().copied() != Some(width as u32) {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                first_session,
                format!("hidden states of shape {:?}; rows entering layer {} of this model are {width} wide", shape.dims(), req.span.first_layer),
            ));
        }
        // The answer's rows are as wide as those leaving the asked layers.
        let mut dims = shape.dims().to_vec();
        *dims.last_mut().expect("checked above") = self.span.row_width(first + req.span.layer_count as usize) as u32;
        let shape = Shape::new(&dims).map_err(|e| internal(&e.to_string()))?;
        let view = req.hidden.as_view().ok_or_else(|| internal("a decoded tensor is not a view"))?;
        let total_tokens: u64 = req.entries.iter().map(|e| u64::from(e.n_tokens)).sum();
        let sessions = self.admit(peer, &req.entries, req.span, total_tokens)?;
        Ok(Queued {
            entries: req.entries.clone(),
            span: req.span,
            hidden: view.to_f32(),
            dtype: view.dtype(),
            shape,
            sessions,
            total_tokens,
            peer,
        })
    }

    /// Runs one batch of queued requests and answers each: those whose sessions pass the
    /// position checks run together, one span call per distinct layer range (a session's
    /// rows are independent of the other rows of a call, so each answer equals the request's
    /// answer alone).
    fn run_batch(&self, batch: &[Arc<Job<Queued>>]) {
        let mut ready = Vec::with_capacity(batch.len());
        for job in batch {
            match self.lock_sessions(&job.input) {
                Ok(locked) => ready.push((job.as_ref(), locked)),
                Err(refusal) => {
                    let q = &job.input;
                    self.release(q);
                    job.answer(error_frame(*refusal));
                }
            }
        }
        while let Some(span) = ready.first().map(|(job, _)| job.input.span) {
            let (group, rest) = ready.into_iter().partition(|(job, _)| job.input.span == span);
            self.run_group(span, group);
            ready = rest;
        }
    }

    /// One span call over every request of `group` (all on layers `span`), then each
    /// request's accounting and answer.
    fn run_group(&self, span: Span, mut group: Vec<(&Job<Queued>, Locked<'_>)>) {
        let entries = group.iter().map(|(job, _)| job.input.entries.len()).sum();
        let started = std::time::Instant::now();
        let mut hidden: Vec<f32> = group.iter().flat_map(|(job, _)| job.input.hidden.iter().copied()).collect();
        let first = (span.first_layer - self.span.first_layer() as u32) as usize;
        let result = {
            let mut seqs: Vec<SeqChunk> = group
                .iter_mut()
                .flat_map(|(job, locked)| locked.guards.iter_mut().zip(&job.input.entries))
                .map(|(g, e)| SeqChunk { cache: &mut g.cache, n_tokens: e.n_tokens as usize })
                .collect();
            self.span.forward_layers(&mut hidden, &mut seqs, first..first + span.layer_count as usize)
        };
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).record(entries, started.elapsed());
        if let Err(err) = result {
            for (job, mut locked) in group {
                for &(i, len) in &locked.cut {
                    locked.guards[i].cache.restore_len(len);
                }
                drop(locked);
                let q = &job.input;
                self.release(q);
                job.answer(error_frame(ErrorReply::from_error(&err, q.entries.first().map(|e| e.session))));
            }
            return;
        }
        let now = Instant::now();
        let mut rows = hidden.as_slice();
        let width_out = self.span.row_width(first + span.layer_count as usize);
        for (job, mut locked) in group {
            let q = &job.input;
            let (mine, rest) = rows.split_at(q.total_tokens as usize * width_out);
            rows = rest;
            let held: Vec<u64> = locked.guards.iter().map(|g| held_bytes(&g.cache)).collect();
            let grown = held.iter().sum::<u64>() as i64 - locked.held_before;
            for (g, e) in locked.guards.iter_mut().zip(&q.entries) {
                g.last_used = now;
                g.step = e.step;
            }
            drop(locked);
            // Account the sessions at what they hold now: the reservation counted every token
            // on every layer, a retry gave positions back, sliding layers dropped some.
            let reserved = q.total_tokens * self.bytes_per_position(q.span);
            {
                let mut table = self.lock_table();
                table.used_bytes = (table.used_bytes as i128 - reserved as i128 + grown as i128).max(0) as u64;
                table.unreserve(q.peer, reserved);
                for (e, bytes) in q.entries.iter().zip(held) {
                    if let Some(h) = table.sessions.get_mut(&e.session) {
                        h.bytes = bytes;
                    }
                }
            }
            // The caches have advanced: from here on the reservation is spent, whatever happens.
            let lied: Vec<f32>;
            let mine = match self.liar {
                Some(rate) if q.entries.iter().any(|e| lies(rate, e.session, e.step)) => {
                    lied = mine.iter().map(|v| -v).collect();
                    &lied[..]
                }
                _ => mine,
            };
            let frame = Tensor::from_f32(mine, q.shape, q.dtype)
                .and_then(|t| Message::ForwardResult(ForwardResult { entries: q.entries.clone(), hidden: t }).encode())
                .unwrap_or_else(|err| error_frame(ErrorReply::from_error(&err, None)));
            job.answer(frame);
        }
    }

    /// Finds or creates each entry's session (running `span`, started by `peer`) and reserves
    /// KV bytes for the request's tokens, within the budget and `peer`'s limits.
    fn admit(&self, peer: PeerId, entries: &[Entry], span: Span, total_tokens: u64) -> Result<Admitted, Refusal> {
        self.expire_idle();
        let bpp = self.bytes_per_position(span);
        let mut table = self.lock_table();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if let Some(refusal) = table.moved_refusal(e.session, peer) {
                return Err(refusal);
            }
            match table.sessions.get(&e.session) {
                Some(held) if held.span != span => {
                    return Err(refuse(
                        ErrorCode::WrongSpan,
                        Some(e.session),
                        format!(
                            "session {} runs layers {}..{} here, the request asks for {}..{}; a session keeps the layers it started with",
                            e.session,
                            held.span.first_layer,
                            held.span.end(),
                            span.first_layer,
                            span.end()
                        ),
                    ))
                }
                Some(held) => out.push((Arc::clone(&held.session), false)),
                None if e.start_pos == 0 && self.draining.load(std::sync::atomic::Ordering::Relaxed) => {
                    return Err(refuse(
                        ErrorCode::CannotHoldSession,
                        Some(e.session),
                        format!("cannot start session {}: this worker is leaving", e.session),
                    ))
                }
                None if e.start_pos == 0 => {
                    let first = (span.first_layer - self.span.first_layer() as u32) as usize;
                    let layers = first..first + span.layer_count as usize;
                    let cache = self.span.new_cache_for(layers, self.max_positions());
                    out.push((Arc::new(Mutex::new(Session { cache, last_used: Instant::now(), step: e.step })), true));
                }
                None => {
                    return Err(refuse(
                        ErrorCode::UnknownSession,
                        Some(e.session),
                        format!(
                            "session {} is not held here (expired, closed or never started); start it again at position 0",
                            e.session
                        ),
                    ))
                }
            }
        }
        let needed = total_tokens * bpp;
        let (owned, owned_bytes) = table.owned_by(peer);
        let new = out.iter().filter(|(_, new)| *new).count();
        let limits = &self.session_limits;
        if new > 0 && owned + new > limits.sessions_per_peer {
            return Err(refuse(
                ErrorCode::Overloaded,
                Some(entries[0].session),
                format!("{peer} holds {owned} sessions here; one peer may hold {}", limits.sessions_per_peer),
            ));
        }
        if owned_bytes + needed > limits.kv_bytes_per_peer {
            return Err(refuse(
                ErrorCode::Overloaded,
                Some(entries[0].session),
                format!(
                    "{peer}'s sessions hold {owned_bytes} KV bytes here; {needed} more would pass the {} one peer may hold",
                    limits.kv_bytes_per_peer
                ),
            ));
        }
        if table.used_bytes + needed > self.session_limits.kv_budget_bytes {
            let e = entries.iter().zip(&out).find(|(_, (_, new))| *new).map_or(entries[0], |(e, _)| *e);
            return Err(refuse(
                ErrorCode::CannotHoldSession,
                Some(e.session),
                format!(
                    "cannot hold session {}: {} more KV bytes would pass the budget ({} of {} bytes in use)",
                    e.session, needed, table.used_bytes, self.session_limits.kv_budget_bytes
                ),
            ));
        }
        table.used_bytes += needed;
        *table.reserved.entry(peer).or_default() += needed;
        for (e, (s, new)) in entries.iter().zip(&out) {
            if *new {
                table.sessions.insert(e.session, Held { span, owner: peer, bytes: 0, session: Arc::clone(s) });
                tracing::info!(session = %e.session, "new session on layers {}..{}", span.first_layer, span.end());
            }
        }
        Ok(out)
    }

    /// Gives back a failed request's reservation and forgets the sessions it created.
    fn release(&self, q: &Queued) {
        let mut table = self.lock_table();
        let reserved = q.total_tokens * self.bytes_per_position(q.span);
        table.used_bytes = table.used_bytes.saturating_sub(reserved);
        table.unreserve(q.peer, reserved);
        for (e, (s, new)) in q.entries.iter().zip(&q.sessions) {
            if *new && table.sessions.get(&e.session).is_some_and(|t| Arc::ptr_eq(&t.session, s)) {
                table.sessions.remove(&e.session);
            }
        }
    }

    /// Locks each of the request's sessions and checks its positions against the cache, then
    /// cuts retried sessions back to their start position (undone by the caller if the pass
    /// fails). A refusal leaves every cache as it was.
    fn lock_sessions<'a>(&self, q: &'a Queued) -> Result<Locked<'a>, Refusal> {
        let mut guards = Vec::with_capacity(q.sessions.len());
        for (e, (s, _)) in q.entries.iter().zip(&q.sessions) {
            // Two requests for one session at once is a client bug; refuse rather than wait. A
            // session handed over since this request was admitted (the hand-over holds its lock
            // while the state travels) is refused as moving or moved.
            let guard = s.try_lock();
            if let Some(refusal) = self.lock_table().moved_refusal(e.session, q.peer) {
                return Err(refusal);
            }
            let guard = guard.map_err(|_| {
                refuse(ErrorCode::StepMismatch, Some(e.session), format!("session {} is busy with another request", e.session))
            })?;
            if e.step < guard.step {
                return Err(refuse(
                    ErrorCode::StepMismatch,
                    Some(e.session),
                    format!("session {}: step {} is older than step {}, which already ran", e.session, e.step, guard.step),
                ));
            }
            let (len, start) = (guard.cache.len(), e.start_pos as usize);
            if start > len {
                return Err(refuse(
                    ErrorCode::StepMismatch,
                    Some(e.session),
                    format!("session {}: start position {start} but the cache holds {len} positions", e.session),
                ));
            }
            let needed = start + e.n_tokens as usize;
            if needed > guard.cache.max_len() {
                let err = Error::ContextOverflow { needed, limit: guard.cache.max_len() };
                return Err(Box::new(ErrorReply::from_error(&err, Some(e.session))));
            }
            // A retry further back than the sliding-window layers still hold.
            if let Err(err) = guard.cache.check_truncate(start) {
                return Err(refuse(ErrorCode::StepMismatch, Some(e.session), format!("session {}: {err}", e.session)));
            }
            guards.push(guard);
        }
        let held_before: i64 = guards.iter().map(|g| g.cache.held_bytes() as i64).sum();
        // Every check passed: cut retried sessions back.
        let mut cut = Vec::new();
        let mut failed = None;
        for (i, (g, e)) in guards.iter_mut().zip(&q.entries).enumerate() {
            let len = g.cache.len();
            if (e.start_pos as usize) < len {
                tracing::debug!(session = %e.session, "retry: rewinding from {len} to {} positions", e.start_pos);
                if let Err(err) = g.cache.truncate(e.start_pos as usize) {
                    failed = Some(err);
                    break;
                }
                cut.push((i, len));
            }
        }
        if let Some(err) = failed {
            for &(i, len) in &cut {
                guards[i].cache.restore_len(len);
            }
            return Err(internal(&err.to_string()));
        }
        Ok(Locked { guards, cut, held_before })
    }

    /// Closes `ids`; returns those that were held.
    fn close(&self, peer: PeerId, ids: &[SessionId]) -> Vec<SessionId> {
        let mut closed = Vec::new();
        for id in ids {
            // A session handed over: its End node is done with it (the new worker's copy
            // expires idle unless the End node closes it there too).
            if let Some(Moved::To { owner, told, .. }) = self.lock_table().moved.get_mut(id) {
                *told |= *owner == peer;
            }
            let removed = self.lock_table().sessions.remove(id);
            if let Some(held) = removed {
                // Wait for a request in flight on it, then give its positions back.
                let bytes = held_bytes(&held.session.lock().unwrap_or_else(|e| e.into_inner()).cache);
                let mut table = self.lock_table();
                table.used_bytes = table.used_bytes.saturating_sub(bytes);
                closed.push(*id);
                tracing::info!(session = %id, "session closed");
            }
        }
        closed
    }
}

impl SpanHandler {
    /// Hands each session held to the first of `targets` serving its layers that takes it
    /// (see the module documentation); what became of each.
    pub fn hand_over(&self, targets: &[(PeerId, Span)], send: SendFrame<'_>) -> Vec<Handed> {
        let held: Vec<(SessionId, Span, PeerId, Arc<Mutex<Session>>)> =
            self.lock_table().sessions.iter().map(|(id, h)| (*id, h.span, h.owner, Arc::clone(&h.session))).collect();
        held.into_iter().map(|(id, span, owner, session)| self.hand_over_one(id, span, owner, &session, targets, send)).collect()
    }

    fn hand_over_one(
        &self,
        id: SessionId,
        span: Span,
        owner: PeerId,
        session: &Arc<Mutex<Session>>,
        targets: &[(PeerId, Span)],
        send: SendFrame<'_>,
    ) -> Handed {
        let started = Instant::now();
        let mut handed = Handed { session: id, to: Err(String::new()), positions: 0, bytes: 0, seconds: 0.0 };
        let takers: Vec<PeerId> = targets.iter().filter(|(_, t)| t.contains(span)).map(|(p, _)| *p).collect();
        if takers.is_empty() {
            handed.to = Err(format!("no other worker serves layers {}..{}", span.first_layer, span.end()));
            return handed;
        }
        // From here its requests are held back; then wait for one running to finish.
        self.lock_table().moved.insert(id, Moved::Moving);
        let guard = session.lock().unwrap_or_else(|e| e.into_inner());
        let still_held = self.lock_table().sessions.get(&id).is_some_and(|h| Arc::ptr_eq(&h.session, session));
        if !still_held {
            self.lock_table().moved.remove(&id); // closed or expired meanwhile
            handed.to = Err("closed before it could move".to_string());
            return handed;
        }
        let state = match self.span.export_state(&guard.cache) {
            Ok(state) => state,
            Err(e) => {
                self.lock_table().moved.remove(&id);
                handed.to = Err(format!("its state could not be read: {e}"));
                return handed;
            }
        };
        (handed.positions, handed.bytes) = (guard.cache.len(), state.len());
        let frame = Message::Handover(Handover {
            model: self.model.clone(),
            span,
            session: id,
            step: guard.step,
            owner: owner.to_bytes(),
            digest: Sha256::digest(&state).into(),
            state: &state,
        })
        .encode();
        let mut why = Vec::new();
        match frame {
            Err(e) => why.push(e.to_string()),
            // One frame carries the whole state (a 4096-position session of 16 layers of an 8B
            // model in f16 is 256 MiB, the default limit): a larger one stays, for replay.
            Ok(frame) if frame.len() as u64 > self.limits.max_frame_bytes => {
                why.push(format!("its state of {} bytes is over the {}-byte frame limit", frame.len(), self.limits.max_frame_bytes))
            }
            Ok(frame) => {
                for peer in takers {
                    match offer(send, peer, frame.clone(), id) {
                        Ok(()) => {
                            handed.to = Ok(peer);
                            break;
                        }
                        Err(refused) => why.push(format!("{peer}: {refused}")),
                    }
                }
            }
        }
        let mut table = self.lock_table();
        match handed.to {
            Ok(to) => {
                if let Some(h) = table.sessions.remove(&id) {
                    table.used_bytes = table.used_bytes.saturating_sub(h.bytes);
                }
                table.moved.insert(id, Moved::To { to, owner, told: false, at: Instant::now() });
                table.handed_over += 1;
                tracing::info!(session = %id, "handed over to {to}: {} positions, {} bytes", handed.positions, handed.bytes);
            }
            Err(_) => {
                table.moved.remove(&id);
                handed.to = Err(why.join("; "));
            }
        }
        drop(table);
        drop(guard);
        handed.seconds = started.elapsed().as_secs_f64();
        handed
    }

    /// Takes over a session another worker hands over: checks it (model, layers, digest, the
    /// state against these layers' cache) and holds it within the budget and its owner's
    /// limits; the `HandoverAck`, or a refusal that leaves nothing behind.
    fn take_over(&self, h: Handover<'_>) -> Result<Vec<u8>, Refusal> {
        let session = Some(h.session);
        self.check_served(&h.model, h.span, session)?;
        let mine = self.span();
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(refuse(ErrorCode::CannotHoldSession, session, "this worker is leaving too".to_string()));
        }
        let owner = PeerId::from_bytes(&h.owner)
            .map_err(|e| refuse(ErrorCode::InvalidRequest, session, format!("the session's owner is not a peer id ({e})")))?;
        let digest: [u8; 32] = Sha256::digest(h.state).into();
        if digest != h.digest {
            return Err(refuse(ErrorCode::InvalidRequest, session, "the KV state does not match its digest (damaged on the way)".to_string()));
        }
        let first = (h.span.first_layer - mine.first_layer) as usize;
        let mut cache = self.span.new_cache_for(first..first + h.span.layer_count as usize, self.max_positions());
        self.span.import_state(&mut cache, h.state).map_err(|e| refuse(ErrorCode::InvalidRequest, session, e.to_string()))?;
        let positions = cache.len();
        let mut table = self.hold(h.session, h.span, owner, Session { cache, last_used: Instant::now(), step: h.step })?;
        table.moved.remove(&h.session); // it may come back to a worker it once left
        table.taken_over += 1;
        drop(table);
        tracing::info!(session = %h.session, "took over a session on layers {}..{}: {positions} positions", h.span.first_layer, h.span.end());
        Message::HandoverAck(h.session).encode().map_err(|e| internal(&e.to_string()))
    }

    /// Holds a whole session made elsewhere (taken over, forked) as `id`, counted against
    /// `owner`, when the id is free, the owner's limits and the budget allow its bytes; the
    /// table, still locked, or the refusal (nothing held).
    fn hold(&self, id: SessionId, span: Span, owner: PeerId, state: Session) -> Result<MutexGuard<'_, Table>, Refusal> {
        let session = Some(id);
        let bytes = held_bytes(&state.cache);
        let mut table = self.lock_table();
        if table.sessions.contains_key(&id) {
            return Err(refuse(ErrorCode::InvalidRequest, session, format!("session {id} is held here already")));
        }
        let limits = &self.session_limits;
        let (owned, owned_bytes) = table.owned_by(owner);
        if owned + 1 > limits.sessions_per_peer || owned_bytes + bytes > limits.kv_bytes_per_peer {
            return Err(refuse(ErrorCode::Overloaded, session, format!("{owner} is at its session or KV limit here")));
        }
        if table.used_bytes + bytes > limits.kv_budget_bytes {
            return Err(refuse(
                ErrorCode::CannotHoldSession,
                session,
                format!("cannot hold session {id}: its {bytes} KV bytes would pass the budget ({} of {} bytes in use)", table.used_bytes, limits.kv_budget_bytes),
            ));
        }
        table.used_bytes += bytes;
        table.sessions.insert(id, Held { span, owner, bytes, session: Arc::new(Mutex::new(state)) });
        Ok(table)
    }

    /// Starts session `f.target` as a copy of session `f.source`'s first `f.positions`
    /// positions (its layers, its owner, its last step), within the budget and the owner's
    /// limits: generations sharing a prompt prefill it once. Any peer knowing the source's id
    /// may ask, as for closing it (ids are the End node's secrets; on a chained route the
    /// owner is the previous worker, not the End node). The `ForkSessionAck`, or a refusal
    /// that leaves nothing behind.
    fn fork(&self, f: ForkSession) -> Result<Vec<u8>, Refusal> {
        let target = Some(f.target);
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(refuse(ErrorCode::CannotHoldSession, target, "this worker is leaving".to_string()));
        }
        let (source, span, owner) = {
            let table = self.lock_table();
            let held = table.sessions.get(&f.source).ok_or_else(|| {
                refuse(ErrorCode::UnknownSession, Some(f.source), format!("session {} is not held here", f.source))
            })?;
            (Arc::clone(&held.session), held.span, held.owner)
        };
        // Waits for a request in flight on the source; the copy holds what it left.
        let (cache, step) = {
            let guard = source.lock().unwrap_or_else(|e| e.into_inner());
            if f.positions as usize > guard.cache.len() {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    target,
                    format!("session {} holds {} positions, not {}", f.source, guard.cache.len(), f.positions),
                ));
            }
            let cache = self.span.fork(&guard.cache, f.positions as usize).map_err(|e| refuse(ErrorCode::StepMismatch, target, e.to_string()))?;
            (cache, guard.step)
        };
        drop(self.hold(f.target, span, owner, Session { cache, last_used: Instant::now(), step })?);
        tracing::debug!(session = %f.target, "forked from session {} at {} positions", f.source, f.positions);
        Message::ForkSessionAck(f.target).encode().map_err(|e| internal(&e.to_string()))
    }
}

/// Sends a `Handover` frame for session `id` to `peer`: Ok once it holds the session, else
/// its refusal or what went wrong on the way.
fn offer(send: SendFrame<'_>, peer: PeerId, frame: Vec<u8>, id: SessionId) -> Result<(), String> {
    let answer = send(peer, frame).map_err(|e| e.to_string())?;
    match Message::decode(&answer, &Limits::unlimited()).map_err(|e| e.to_string())? {
        Message::HandoverAck(got) if got == id => Ok(()),
        Message::Error(e) => Err(format!("{}: {}", e.code, e.message)),
        other => Err(format!("answered a {} frame", other.kind())),
    }
}

/// KV bytes a session's cache is accounted for: the positions its layers hold.
fn held_bytes(cache: &KvCache) -> u64 {
    cache.held_bytes() as u64
}

impl FrameHandler for SpanHandler {
    /// Decode-sized requests of a lone session run inline: a step of a few tokens takes about
    /// a millisecond per ten layers of a small model, and the hops to the blocking pool and
    /// back cost about a tenth of that (benches/bench_mesh.py). With several sessions, or a
    /// batch running, requests go to the blocking pool, where those that arrive together
    /// batch (inline ones would run one by one on the event loop). Prefill chunks always go
    /// to the pool.
    fn inline(&self, request: &[u8]) -> bool {
        self.span.runs_inline() && request.len() <= INLINE_FRAME_BYTES && self.lock_table().sessions.len() <= 1 && !self.busy()
    }

    /// A `Forward` runs on the event loop only if it can run alone at once: with a batch
    /// running or queued it would have to wait, so it goes to the blocking pool.
    fn handle_inline(&self, peer: PeerId, request: &[u8]) -> Option<Vec<u8>> {
        let claim = self.batches.claim_idle()?;
        match Message::decode(request, &self.limits) {
            Ok(Message::Forward(f)) => Some(self.forward(peer, f, Some(claim))),
            _ => {
                drop(claim);
                Some(self.handle(peer, request))
            }
        }
    }

    fn handle(&self, peer: PeerId, request: &[u8]) -> Vec<u8> {
        let message = match Message::decode(request, &self.limits) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%peer, "malformed request: {e}");
                return error_frame_for(&e, None);
            }
        };
        match message {
            Message::Forward(f) => self.forward(peer, f, None),
            Message::CloseSession(ids) => {
                let closed = self.close(peer, &ids);
                Message::CloseSessionAck(closed).encode().unwrap_or_else(|e| error_frame_for(&e, None))
            }
            Message::Ping(nonce) => Message::Pong(nonce).encode().unwrap_or_else(|e| error_frame_for(&e, None)),
            Message::Handover(h) => self.take_over(h).unwrap_or_else(|refusal| {
                tracing::info!(%peer, "refused a hand-over: {}", refusal.message);
                error_frame(*refusal)
            }),
            Message::ForkSession(f) => self.fork(f).unwrap_or_else(|refusal| {
                tracing::debug!(%peer, "refused a fork: {}", refusal.message);
                error_frame(*refusal)
            }),
            other => unexpected(other.kind()),
        }
    }

    fn session_count(&self) -> usize {
        self.lock_table().sessions.len()
    }

    fn maintain(&self) {
        self.expire_idle();
    }

    fn drain(&self) {
        if !self.draining.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("leaving: no new sessions; {} held ones carry on", self.session_count());
        }
    }

    fn hand_over(&self, targets: &[(PeerId, Span)], send: SendFrame<'_>) -> Vec<Handed> {
        SpanHandler::hand_over(self, targets, send)
    }

    fn moves_untold(&self) -> usize {
        self.lock_table().moved.values().filter(|m| matches!(m, Moved::To { told: false, .. })).count()
    }

    /// `{"mode": "span", "device" (where the layers run: "cpu", "torch-cpu", "cuda:0 NVIDIA
    /// ..."), "model_name", "model_hash" (hex), "first_layer", "n_layers",
    /// "sessions", "kv_used_bytes", "draining", "kv_budget_bytes", "max_positions", "hidden",
    /// "span_calls", "span_entries", "largest_batch", "span_seconds" (how sessions have
    /// shared span calls so far), "handed_over", "taken_over"}` (sessions moved away to other
    /// workers and here from them, with their KV caches).
    fn info(&self) -> serde_json::Value {
        let (sessions, used, handed_over, taken_over) = {
            let table = self.lock_table();
            (table.sessions.len(), table.used_bytes, table.handed_over, table.taken_over)
        };
        let hash: String = self.model.hash.iter().map(|b| format!("{b:02x}")).collect();
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "mode": "span",
            "device": self.span.device(),
            "span_calls": stats.calls,
            "span_entries": stats.entries,
            "largest_batch": stats.largest,
            "span_seconds": stats.busy.as_secs_f64(),
            "model_name": self.model.name,
            "model_hash": hash,
            "first_layer": self.span.first_layer(),
            "n_layers": self.span.n_layers(),
            "sessions": sessions,
            "kv_used_bytes": used,
            "draining": self.draining.load(std::sync::atomic::Ordering::Relaxed),
            "kv_budget_bytes": self.session_limits.kv_budget_bytes,
            "max_positions": self.max_positions(),
            "hidden": self.span.config().hidden,
            "handed_over": handed_over,
            "taken_over": taken_over,
        })
    }
}
