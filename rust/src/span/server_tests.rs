//! [`SpanHandler`] without a network: frames in, frames out, over the tiny random Llama of
//! `tests/data/tiny-llama` (3 layers, hidden 64, 2 KV heads of 16: 256 KV bytes per position
//! and layer).

use std::sync::Arc;

use libp2p::PeerId;

use super::{SessionLimits, SpanHandler};
use crate::net::FrameHandler;
use crate::compute::ThreadPool;
use crate::model::tests::{tiny_gemma3, tiny_llama, TINY_HIDDEN, TINY_LAYERS};
use crate::model::KvCache;
use crate::quant::GgmlType;
use crate::test_rng::TestRng;
use crate::wire::{DType, Entry, ErrorCode, ForkSession, Forward, Limits, Message, ModelId, SessionId, Shape, Span, Tensor};

/// KV bytes of one position in one layer of the tiny model: keys and values, 32 floats each.
const BYTES_PER_POSITION_LAYER: u64 = 2 * 32 * 4;

fn model() -> ModelId {
    ModelId { hash: [3; 32], name: "tiny".into() }
}

fn handler(limits: SessionLimits) -> SpanHandler {
    let span = Arc::new(tiny_llama(0, TINY_LAYERS, None));
    SpanHandler::new(span, Arc::new(ThreadPool::new(2)), model(), Limits::default(), limits)
}

/// A `Forward` of one session's rows through layers `first .. first + count`, f32 on the wire.
fn forward(session: u128, start: u32, first: u32, count: u32, hidden: &[f32]) -> Vec<u8> {
    let rows = (hidden.len() / TINY_HIDDEN) as u32;
    Message::Forward(Forward {
        model: model(),
        span: Span { first_layer: first, layer_count: count },
        entries: vec![Entry { session: SessionId(session), step: 0, start_pos: start, n_tokens: rows }],
        hidden: Tensor::from_f32(hidden, Shape::matrix(rows, TINY_HIDDEN as u32), DType::F32).unwrap(),
    })
    .encode()
    .unwrap()
}

/// The handler's answer: the output rows, or the error's code and message.
fn ask(h: &SpanHandler, frame: &[u8]) -> Result<Vec<f32>, (ErrorCode, String)> {
    ask_from(h, PeerId::random(), frame)
}

/// [`ask`] from `peer`.
fn ask_from(h: &SpanHandler, peer: PeerId, frame: &[u8]) -> Result<Vec<f32>, (ErrorCode, String)> {
    let reply = h.handle(peer, frame);
    match Message::decode(&reply, &Limits::default()).unwrap() {
        Message::ForwardResult(r) => Ok(r.hidden.to_f32()),
        Message::Error(e) => Err((e.code, e.message)),
        other => panic!("unexpected {:?}", other.kind()),
    }
}

fn code(answer: Result<Vec<f32>, (ErrorCode, String)>) -> ErrorCode {
    answer.expect_err("expected a refusal").0
}

#[test]
fn sub_spans_chain_to_the_whole_span_and_sessions_keep_their_layers() {
    let h = handler(SessionLimits::default());
    let mut rng = TestRng::new(5);
    let prompt = rng.gaussians(4 * TINY_HIDDEN);
    let steps: Vec<Vec<f32>> = (0..3).map(|_| rng.gaussians(TINY_HIDDEN)).collect();
    // Session 1 through all three layers; sessions 2, 3, 4 through 0..1, 1..2, 2..3.
    let mut pos = 0;
    for x in std::iter::once(&prompt).chain(&steps) {
        let whole = ask(&h, &forward(1, pos, 0, 3, x)).unwrap();
        let mut y = x.clone();
        for (session, first) in [(2, 0), (3, 1), (4, 2)] {
            y = ask(&h, &forward(session, pos, first, 1, &y)).unwrap();
        }
        assert_eq!(y, whole, "position {pos}");
        pos += (x.len() / TINY_HIDDEN) as u32;
    }
    assert_eq!(h.session_count(), 4);
    // 7 positions: 3 layers for session 1, 1 layer for each other.
    assert_eq!(h.used_kv_bytes(), 7 * (3 + 1 + 1 + 1) * BYTES_PER_POSITION_LAYER);

    // Outside 0..3, the message names both spans; a session asking for other layers than it
    // started with, or a new session over other layers, is refused the same way.
    let x = &steps[0];
    let (c, message) = ask(&h, &forward(9, 0, 2, 2, x)).unwrap_err();
    assert_eq!(c, ErrorCode::WrongSpan);
    assert!(message.contains("serves layers 0..3") && message.contains("asks for 2..4"), "{message}");
    let (c, message) = ask(&h, &forward(2, pos, 0, 3, x)).unwrap_err();
    assert_eq!(c, ErrorCode::WrongSpan);
    assert!(message.contains("runs layers 0..1") && message.contains("asks for 0..3"), "{message}");
    assert_eq!(code(ask(&h, &forward(3, 0, 0, 2, x))), ErrorCode::WrongSpan, "even restarting at 0");
    assert_eq!(h.session_count(), 4, "refusals create no session");
    assert_eq!(h.used_kv_bytes(), 7 * 6 * BYTES_PER_POSITION_LAYER, "refusals hold no bytes");
    let closed = h.handle(PeerId::random(), &Message::CloseSession(vec![SessionId(1), SessionId(3)]).encode().unwrap());
    assert_eq!(
        Message::decode(&closed, &Limits::default()).unwrap(),
        Message::CloseSessionAck(vec![SessionId(1), SessionId(3)])
    );
    assert_eq!(h.used_kv_bytes(), 7 * 2 * BYTES_PER_POSITION_LAYER);
}

#[test]
fn the_budget_counts_each_session_at_its_own_layer_count() {
    // Room for 10 positions of 3 layers, i.e. 30 of 1 layer.
    let limits = SessionLimits { kv_budget_bytes: 30 * BYTES_PER_POSITION_LAYER, ..SessionLimits::default() };
    let h = handler(limits);
    let x = TestRng::new(1).gaussians(12 * TINY_HIDDEN);
    assert_eq!(code(ask(&h, &forward(1, 0, 0, 3, &x))), ErrorCode::CannotHoldSession);
    ask(&h, &forward(2, 0, 1, 1, &x)).unwrap();
    ask(&h, &forward(3, 0, 2, 1, &x[..6 * TINY_HIDDEN])).unwrap();
    assert_eq!(h.used_kv_bytes(), 18 * BYTES_PER_POSITION_LAYER);
    assert_eq!(code(ask(&h, &forward(4, 0, 0, 3, &x[..5 * TINY_HIDDEN]))), ErrorCode::CannotHoldSession);
    ask(&h, &forward(4, 0, 0, 3, &x[..4 * TINY_HIDDEN])).unwrap();
    assert_eq!(h.used_kv_bytes(), 30 * BYTES_PER_POSITION_LAYER);
}

#[test]
fn an_f16_cache_is_admitted_at_its_own_size() {
    // Quantized weights keep f16 keys and values: 2 bytes a value, so the budget of 10 f32
    // positions of 3 layers holds 20, and admission counts them so (not as f32).
    let span = Arc::new(tiny_llama(0, TINY_LAYERS, Some(GgmlType::Q8_0)));
    assert_eq!(span.kv_dtype(), crate::model::KvDtype::F16);
    let limits = SessionLimits { kv_budget_bytes: 30 * BYTES_PER_POSITION_LAYER, ..SessionLimits::default() };
    let h = SpanHandler::new(span, Arc::new(ThreadPool::new(2)), model(), Limits::default(), limits);
    let x = TestRng::new(1).gaussians(21 * TINY_HIDDEN);
    assert_eq!(code(ask(&h, &forward(1, 0, 0, 3, &x))), ErrorCode::CannotHoldSession);
    ask(&h, &forward(2, 0, 0, 3, &x[..20 * TINY_HIDDEN])).unwrap();
    assert_eq!(h.used_kv_bytes(), 30 * BYTES_PER_POSITION_LAYER);
}

/// A `Forward` of several sessions' rows `(session, start, rows)` through all three layers.
fn batch(entries: &[(u128, u32, u32)], rng: &mut TestRng) -> Vec<u8> {
    let rows: u32 = entries.iter().map(|e| e.2).sum();
    let hidden = rng.gaussians(rows as usize * TINY_HIDDEN);
    Message::Forward(Forward {
        model: model(),
        span: Span { first_layer: 0, layer_count: TINY_LAYERS as u32 },
        entries: entries
            .iter()
            .map(|&(s, start_pos, n_tokens)| Entry { session: SessionId(s), step: 0, start_pos, n_tokens })
            .collect(),
        hidden: Tensor::from_f32(&hidden, Shape::matrix(rows, TINY_HIDDEN as u32), DType::F32).unwrap(),
    })
    .encode()
    .unwrap()
}

#[test]
fn a_repeated_step_gives_the_same_answer_and_the_session_continues() {
    let h = handler(SessionLimits::default());
    let per_position = TINY_LAYERS as u64 * BYTES_PER_POSITION_LAYER;
    let mut rng = TestRng::new(9);
    let prompt = rng.gaussians(4 * TINY_HIDDEN);
    let steps: Vec<Vec<f32>> = (0..3).map(|_| rng.gaussians(TINY_HIDDEN)).collect();
    // Session 2 never retries: the reference.
    let want: Vec<Vec<f32>> = std::iter::once(ask(&h, &forward(2, 0, 0, 3, &prompt)).unwrap())
        .chain(steps.iter().enumerate().map(|(i, x)| ask(&h, &forward(2, 4 + i as u32, 0, 3, x)).unwrap()))
        .collect();
    assert_eq!(h.used_kv_bytes(), 7 * per_position);

    // Session 1: the prefill twice, then each decode step twice.
    assert_eq!(ask(&h, &forward(1, 0, 0, 3, &prompt)).unwrap(), want[0]);
    assert_eq!(ask(&h, &forward(1, 0, 0, 3, &prompt)).unwrap(), want[0], "a repeated prefill");
    assert_eq!(h.used_kv_bytes(), 11 * per_position, "a retry holds no extra bytes");
    for (i, x) in steps.iter().enumerate() {
        let pos = 4 + i as u32;
        assert_eq!(ask(&h, &forward(1, pos, 0, 3, x)).unwrap(), want[i + 1]);
        assert_eq!(ask(&h, &forward(1, pos, 0, 3, x)).unwrap(), want[i + 1], "step at {pos} repeated");
        assert_eq!(h.used_kv_bytes(), (7 + pos as u64 + 1) * per_position);
    }
    // Back two steps: the session replays them.
    assert_eq!(ask(&h, &forward(1, 5, 0, 3, &steps[1])).unwrap(), want[2]);
    assert_eq!(h.used_kv_bytes(), (7 + 6) * per_position);
    assert_eq!(ask(&h, &forward(1, 6, 0, 3, &steps[2])).unwrap(), want[3]);
    assert_eq!(h.used_kv_bytes(), 14 * per_position);
    // A gap is not a retry.
    let (c, message) = ask(&h, &forward(1, 8, 0, 3, &steps[0])).unwrap_err();
    assert_eq!(c, ErrorCode::StepMismatch);
    assert!(message.contains("start position 8 but the cache holds 7 positions"), "{message}");
}

#[test]
fn a_refused_retry_leaves_every_cache_as_it_was() {
    let limits = SessionLimits { max_positions: 8, ..SessionLimits::default() };
    let h = handler(limits);
    let per_position = TINY_LAYERS as u64 * BYTES_PER_POSITION_LAYER;
    let mut rng = TestRng::new(4);
    ask(&h, &batch(&[(1, 0, 6)], &mut rng)).unwrap();
    ask(&h, &batch(&[(2, 0, 3)], &mut rng)).unwrap();
    assert_eq!(h.used_kv_bytes(), 9 * per_position);
    // One entry a retry, the other a gap: the whole request is refused, nothing is cut back.
    let refusal = ask(&h, &batch(&[(1, 2, 1), (2, 5, 1)], &mut rng)).unwrap_err();
    assert_eq!(refusal.0, ErrorCode::StepMismatch, "{}", refusal.1);
    // A retry that would pass the session's context.
    assert_eq!(code(ask(&h, &batch(&[(1, 2, 7)], &mut rng))), ErrorCode::ContextOverflow);
    assert_eq!(h.used_kv_bytes(), 9 * per_position, "refusals hold no bytes");
    // Both sessions are where they were: they continue at 6 and 3.
    ask(&h, &batch(&[(1, 6, 1), (2, 3, 1)], &mut rng)).unwrap();
    assert_eq!(h.used_kv_bytes(), 11 * per_position);
    // And a batch with one retry and one next step runs both.
    ask(&h, &batch(&[(1, 7, 1), (2, 1, 2)], &mut rng)).unwrap();
    assert_eq!(h.used_kv_bytes(), (8 + 3) * per_position);
}

#[test]
fn info_describes_the_span_and_its_load() {
    let limits = SessionLimits { kv_budget_bytes: 1 << 20, max_positions: 100, ..SessionLimits::default() };
    let h = handler(limits);
    ask(&h, &forward(1, 0, 1, 2, &TestRng::new(2).gaussians(3 * TINY_HIDDEN))).unwrap();
    let mut info = h.info();
    let seconds = info.as_object_mut().unwrap().remove("span_seconds").unwrap();
    assert!(seconds.as_f64().unwrap() > 0.0, "the span call's time: {seconds}");
    assert_eq!(
        info,
        serde_json::json!({
            "device": "cpu",
            "mode": "span",
            "span_calls": 1,
            "span_entries": 1,
            "largest_batch": 1,
            "model_name": "tiny",
            "model_hash": "03".repeat(32),
            "first_layer": 0,
            "n_layers": 3,
            "sessions": 1,
            "kv_used_bytes": 3 * 2 * BYTES_PER_POSITION_LAYER,
            "draining": false,
            "kv_budget_bytes": 1 << 20,
            "max_positions": 100,
            "hidden": TINY_HIDDEN,
            "handed_over": 0,
            "taken_over": 0,
        })
    );
}

#[test]
fn sliding_window_layers_let_a_budget_hold_a_longer_session() {
    // Tiny Gemma 3: layers 0 and 1 slide over 4 positions, layer 2 is global; KV heads of 2 x 32.
    let span = Arc::new(tiny_gemma3(0, TINY_LAYERS));
    let per_layer = 2 * 64 * 4;
    let w = span.config().sliding_window;
    // Room for 40 positions of all three layers: 120 layer-positions.
    let limits = SessionLimits { kv_budget_bytes: 120 * per_layer, ..SessionLimits::default() };
    let h = SpanHandler::new(span, Arc::new(ThreadPool::new(2)), model(), Limits::default(), limits);
    let mut rng = TestRng::new(8);
    let total = 80;
    let xs: Vec<Vec<f32>> = (0..total).map(|_| rng.gaussians(TINY_HIDDEN)).collect();
    let mut last = Vec::new();
    for (p, x) in xs.iter().enumerate() {
        last = ask(&h, &forward(1, p as u32, 0, 3, x)).unwrap_or_else(|e| panic!("position {p}: {e:?}"));
        // The global layer holds every position, each sliding layer a bounded window.
        let held = h.used_kv_bytes() / per_layer;
        assert!(held <= (p as u64 + 1) + 2 * KvCache::sliding_rows_bound(w, 1) as u64, "position {p}: {held}");
    }
    assert!(h.used_kv_bytes() < 120 * per_layer);
    // The last step retried: same answer, same bytes; a rewind past the windows is refused.
    let used = h.used_kv_bytes();
    assert_eq!(ask(&h, &forward(1, total as u32 - 1, 0, 3, &xs[total - 1])).unwrap(), last);
    assert_eq!(h.used_kv_bytes(), used);
    let (c, message) = ask(&h, &forward(1, 2, 0, 3, &xs[2])).unwrap_err();
    assert_eq!(c, ErrorCode::StepMismatch);
    assert!(message.contains("cannot rewind"), "{message}");
    assert_eq!(h.used_kv_bytes(), used);
    // The session goes on; starting it over at 0 (a client rebuilding it) works too.
    ask(&h, &forward(1, total as u32, 0, 3, &xs[0])).unwrap();
    let first = ask(&h, &forward(2, 0, 0, 3, &xs[0])).unwrap();
    assert_eq!(ask(&h, &forward(1, 0, 0, 3, &xs[0])).unwrap(), first);
    assert_eq!(h.used_kv_bytes(), 2 * 3 * per_layer);
    // Closing it gives every byte back.
    let closed = Message::CloseSession(vec![SessionId(1)]).encode().unwrap();
    h.handle(PeerId::random(), &closed);
    assert_eq!(h.used_kv_bytes(), 3 * per_layer);
}

#[test]
fn requests_arriving_while_a_batch_runs_share_the_next_span_call_with_their_own_answers() {
    let whole = |start: u32, rows: &[f32], s: u128| forward(s, start, 0, TINY_LAYERS as u32, rows);
    let mut rng = TestRng::new(21);
    let prompts: Vec<Vec<f32>> = (0..4).map(|_| rng.gaussians(3 * TINY_HIDDEN)).collect();
    let steps: Vec<Vec<f32>> = (0..4).map(|_| rng.gaussians(TINY_HIDDEN)).collect();
    // Each session alone, on a handler of its own: the reference answers.
    let alone = handler(SessionLimits::default());
    let want: Vec<Vec<f32>> = (0..4)
        .map(|i| {
            ask(&alone, &whole(0, &prompts[i], 10 + i as u128)).unwrap();
            ask(&alone, &whole(3, &steps[i], 10 + i as u128)).unwrap()
        })
        .collect();

    let h = handler(SessionLimits::default());
    for (i, p) in prompts.iter().enumerate() {
        ask(&h, &whole(0, p, 10 + i as u128)).unwrap();
    }
    // A long batch (16 sessions x 250 positions) keeps the pool busy while the four decode
    // steps arrive; they queue and run as one call once it ends.
    let blocker = batch(&(0..16).map(|s| (100 + s, 0, 250)).collect::<Vec<_>>(), &mut rng);
    let got = std::thread::scope(|scope| {
        let long = scope.spawn(|| ask(&h, &blocker).unwrap());
        while !h.busy() {
            std::thread::yield_now();
        }
        let steps: Vec<_> = (0..4).map(|i| {
            let (h, frame) = (&h, whole(3, &steps[i], 10 + i as u128));
            scope.spawn(move || ask(h, &frame).unwrap())
        }).collect();
        long.join().unwrap();
        steps.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(got, want, "each session's answer is its answer alone, bit for bit");
    let info = h.info();
    let (calls, entries) = (info["span_calls"].as_u64().unwrap(), info["span_entries"].as_u64().unwrap());
    assert_eq!(entries, 4 + 16 + 4, "four prefills, the blocker's 16 sessions, four steps");
    assert!(calls < 4 + 1 + 4, "the four steps shared span calls: {info}");
}

#[test]
fn a_draining_worker_refuses_new_sessions_and_serves_held_ones() {
    let h = handler(SessionLimits::default());
    let mut rng = TestRng::new(4);
    let (prompt, step) = (rng.gaussians(3 * TINY_HIDDEN), rng.gaussians(TINY_HIDDEN));
    let layers = TINY_LAYERS as u32;
    ask(&h, &forward(1, 0, 0, layers, &prompt)).unwrap();
    h.drain();
    assert_eq!(h.info()["draining"], true);
    // A new session: refused with a code that sends the End node elsewhere.
    let (refused, message) = ask(&h, &forward(2, 0, 0, layers, &prompt)).unwrap_err();
    assert_eq!(refused, ErrorCode::CannotHoldSession);
    assert!(refused.recoverable() && message.contains("leaving"), "{message}");
    // The held one carries on.
    assert_eq!(ask(&h, &forward(1, 3, 0, layers, &step)).unwrap().len(), TINY_HIDDEN);
    assert_eq!(h.session_count(), 1);
}

/// `h`'s answer to a frame, decoded (any kind).
fn reply(h: &SpanHandler, peer: PeerId, frame: &[u8]) -> Message<'static> {
    let answer = h.handle(peer, frame);
    match Message::decode(&answer, &Limits::default()).unwrap() {
        Message::HandoverAck(id) => Message::HandoverAck(id),
        Message::ForkSessionAck(id) => Message::ForkSessionAck(id),
        Message::Error(e) => Message::Error(e),
        other => panic!("unexpected {:?}", other.kind()),
    }
}

fn info_count(h: &SpanHandler, key: &str) -> u64 {
    h.info()[key].as_u64().unwrap()
}

#[test]
fn a_session_handed_over_goes_on_at_the_other_worker_with_the_same_outputs() {
    let (a, b, reference) = (handler(SessionLimits::default()), handler(SessionLimits::default()), handler(SessionLimits::default()));
    let (peer_a, peer_b, elsewhere, end_node) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
    let mut rng = TestRng::new(9);
    let prompt = rng.gaussians(5 * TINY_HIDDEN);
    let steps: Vec<Vec<f32>> = (0..4).map(|_| rng.gaussians(TINY_HIDDEN)).collect();
    // Session 7 on layers 1..3 of `a` (and of the reference), started by `end_node`: the
    // prompt and one step.
    for (start, x) in [(0, &prompt), (5, &steps[0])] {
        let (got, want) = (ask_from(&a, end_node, &forward(7, start, 1, 2, x)), ask(&reference, &forward(7, start, 1, 2, x)));
        assert_eq!(got.unwrap(), want.unwrap());
    }
    let held = a.used_kv_bytes();
    // `a` leaves: a worker serving only layer 0 cannot take it; `b` serves 0..3 and does.
    // While the state travels, `a` holds the session's requests back.
    let handed = a.hand_over(&[(elsewhere, Span { first_layer: 0, layer_count: 1 }), (peer_b, Span { first_layer: 0, layer_count: 3 })], &|peer, frame| {
        assert_eq!(peer, peer_b);
        assert_eq!(code(ask(&a, &forward(7, 6, 1, 2, &steps[1]))), ErrorCode::SessionMoving);
        Ok(b.handle(peer_a, &frame))
    });
    assert_eq!(handed.len(), 1);
    assert_eq!((handed[0].session, handed[0].to.as_ref().ok(), handed[0].positions), (SessionId(7), Some(&peer_b), 6));
    assert_eq!(handed[0].bytes as u64, 14 + 2 * 16 + held, "the state: its header and the held positions");
    assert_eq!((a.session_count(), a.used_kv_bytes(), a.moves_untold()), (0, 0, 1));
    assert_eq!((b.session_count(), b.used_kv_bytes()), (1, held));
    // `a` now names `b`; a worker relaying the session's step here is told too, but the End
    // node counts as told only once it asks itself.
    for (peer, untold) in [(PeerId::random(), 1), (end_node, 0)] {
        let answer = a.handle(peer, &forward(7, 6, 1, 2, &steps[1]));
        let Message::Error(e) = Message::decode(&answer, &Limits::default()).unwrap() else { panic!("not an error") };
        assert_eq!((e.code, e.moved_to()), (ErrorCode::SessionMoved, Some(peer_b.to_string().as_str())));
        assert_eq!(a.moves_untold(), untold);
    }
    // `b` goes on from position 6 with the reference's outputs, a retry of a step included.
    let mut start = 6;
    for x in &steps[1..] {
        assert_eq!(ask(&b, &forward(7, start, 1, 2, x)).unwrap(), ask(&reference, &forward(7, start, 1, 2, x)).unwrap());
        start += 1;
    }
    assert_eq!(ask(&b, &forward(7, start - 1, 1, 2, &steps[3])).unwrap(), ask(&reference, &forward(7, start - 1, 1, 2, &steps[3])).unwrap());
    assert_eq!((info_count(&a, "handed_over"), info_count(&b, "taken_over")), (1, 1));
}

#[test]
fn a_hand_over_refused_or_lost_leaves_the_session_where_it_was() {
    let a = handler(SessionLimits::default());
    let reference = handler(SessionLimits::default());
    let full = handler(SessionLimits { kv_budget_bytes: BYTES_PER_POSITION_LAYER, ..SessionLimits::default() });
    let other_model = SpanHandler::new(
        Arc::new(tiny_llama(0, TINY_LAYERS, None)),
        Arc::new(ThreadPool::new(1)),
        ModelId { hash: [4; 32], name: "other".into() },
        Limits::default(),
        SessionLimits::default(),
    );
    let taker = handler(SessionLimits::default());
    let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
    let whole = Span { first_layer: 0, layer_count: 3 };
    let mut rng = TestRng::new(3);
    let prompt = rng.gaussians(4 * TINY_HIDDEN);
    let step = rng.gaussians(TINY_HIDDEN);
    ask(&a, &forward(1, 0, 0, 3, &prompt)).unwrap();
    ask(&reference, &forward(1, 0, 0, 3, &prompt)).unwrap();
    let held = a.used_kv_bytes();
    // Nobody else serves the layers.
    let handed = a.hand_over(&[], &|_, _| panic!("nothing to send to"));
    assert!(handed[0].to.as_ref().unwrap_err().contains("no other worker serves layers 0..3"));
    // A full worker, another model's, a state damaged on the way, a peer that vanished: each
    // refuses or fails, and the session stays, whole.
    let handed = a.hand_over(&[(peers[0], whole), (peers[1], whole), (peers[2], whole), (peers[3], whole)], &|peer, mut frame| {
        if peer == peers[0] {
            Ok(full.handle(peers[4], &frame))
        } else if peer == peers[1] {
            Ok(other_model.handle(peers[4], &frame))
        } else if peer == peers[2] {
            *frame.last_mut().unwrap() ^= 1; // the state is the payload, at the end
            Ok(taker.handle(peers[4], &frame))
        } else {
            Err(crate::error::Error::Network(format!("{peer} is gone")))
        }
    });
    let why = handed[0].to.as_ref().unwrap_err();
    for expected in ["cannot_hold_session", "wrong_model", "does not match its digest", "is gone"] {
        assert!(why.contains(expected), "{expected} in {why}");
    }
    assert_eq!((a.session_count(), a.used_kv_bytes(), a.moves_untold()), (1, held, 0));
    assert_eq!((full.session_count(), other_model.session_count(), taker.session_count()), (0, 0, 0));
    assert_eq!(ask(&a, &forward(1, 4, 0, 3, &step)).unwrap(), ask(&reference, &forward(1, 4, 0, 3, &step)).unwrap());
    // A hand-over of a session the taker holds already is refused; a sound one is taken.
    let state = {
        let handed = a.hand_over(&[(peers[2], whole)], &|_, frame| {
            let first = reply(&taker, peers[4], &frame);
            assert_eq!(first, Message::HandoverAck(SessionId(1)));
            let Message::Error(again) = reply(&taker, peers[4], &frame) else { panic!("taken twice") };
            assert!(again.message.contains("held here already"), "{}", again.message);
            Ok(taker.handle(peers[4], &Message::HandoverAck(SessionId(1)).encode().unwrap()).len().to_le_bytes().to_vec())
        });
        handed[0].to.clone()
    };
    // The taker's ack was lost (the answer did not decode): the session stays at `a` too.
    assert!(state.is_err());
    assert_eq!(a.session_count(), 1);
}

fn fork(h: &SpanHandler, source: u128, target: u128, positions: u32) -> Result<(), (ErrorCode, String)> {
    let frame = Message::ForkSession(ForkSession { source: SessionId(source), target: SessionId(target), positions }).encode().unwrap();
    match reply(h, PeerId::random(), &frame) {
        Message::ForkSessionAck(id) if id == SessionId(target) => Ok(()),
        Message::Error(e) => Err((e.code, e.message)),
        other => panic!("unexpected {:?}", other.kind()),
    }
}

#[test]
fn a_forked_session_goes_on_from_the_copied_prefix_as_the_source_would() {
    let limits = SessionLimits { kv_budget_bytes: 24 * TINY_LAYERS as u64 * BYTES_PER_POSITION_LAYER, ..SessionLimits::default() };
    let h = handler(limits);
    let per_position = TINY_LAYERS as u64 * BYTES_PER_POSITION_LAYER;
    let mut rng = TestRng::new(21);
    let prompt = rng.gaussians(6 * TINY_HIDDEN);
    let (a, b) = (rng.gaussians(TINY_HIDDEN), rng.gaussians(TINY_HIDDEN));
    let layers = TINY_LAYERS as u32;
    ask(&h, &forward(1, 0, 0, layers, &prompt)).unwrap();
    ask(&h, &forward(1, 6, 0, layers, &a)).unwrap();
    // Session 2: the first 6 positions of session 1 (the prompt), then its own step.
    fork(&h, 1, 2, 6).unwrap();
    assert_eq!((h.session_count(), h.used_kv_bytes()), (2, 13 * per_position));
    let forked = ask(&h, &forward(2, 6, 0, layers, &b)).unwrap();
    // The same step on a session that ran the prompt itself.
    ask(&h, &forward(3, 0, 0, layers, &prompt)).unwrap();
    assert_eq!(ask(&h, &forward(3, 6, 0, layers, &b)).unwrap(), forked);
    // The source is untouched: its next step continues from its own 7 positions.
    ask(&h, &forward(1, 7, 0, layers, &b)).unwrap();
    // Refusals leave nothing behind: an unknown source, too many positions, a taken id, no room.
    let before = (h.session_count(), h.used_kv_bytes());
    assert_eq!(fork(&h, 9, 4, 1).unwrap_err().0, ErrorCode::UnknownSession);
    assert_eq!(fork(&h, 1, 4, 9).unwrap_err().0, ErrorCode::InvalidRequest);
    assert_eq!(fork(&h, 1, 2, 3).unwrap_err().0, ErrorCode::InvalidRequest);
    assert_eq!(fork(&h, 1, 4, 8).unwrap_err().0, ErrorCode::CannotHoldSession);
    assert_eq!((h.session_count(), h.used_kv_bytes()), before);
    // Forking into itself is not a frame at all.
    assert!(Message::ForkSession(ForkSession { source: SessionId(1), target: SessionId(1), positions: 1 }).encode().is_err());
}
