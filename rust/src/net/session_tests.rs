//! [`SpanHandler`] without a network: frames in, frames out, over the tiny random Llama of
//! `tests/data/tiny-llama` (3 layers, hidden 64, 2 KV heads of 16: 256 KV bytes per position
//! and layer).

use std::sync::Arc;

use libp2p::PeerId;

use super::{FrameHandler, SessionLimits, SpanHandler};
use crate::compute::ThreadPool;
use crate::model::tests::{tiny_llama, TINY_HIDDEN, TINY_LAYERS};
use crate::test_rng::TestRng;
use crate::wire::{DType, Entry, ErrorCode, Forward, Limits, Message, ModelId, SessionId, Shape, Span, Tensor};

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
    let reply = h.handle(PeerId::random(), frame);
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
