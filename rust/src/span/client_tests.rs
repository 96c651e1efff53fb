//! The client half over real nodes (TCP on 127.0.0.1): a worker serving the tiny random
//! Llama (`tests/data/tiny-llama`, 3 layers, hidden 64) answers [`forward`] with the values
//! its handler computes, refusals arrive as [`Error::Worker`] with their code, and an
//! answer that is not this request's result is refused too.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use super::{forward, Hop, SessionLimits, SpanHandler};
use crate::compute::ThreadPool;
use crate::error::Error;
use crate::model::tests::{tiny_llama, TINY_HIDDEN, TINY_LAYERS};
use crate::net::tests::{config, TempDir};
use crate::net::{FrameHandler, Node, Transport};
use crate::test_rng::TestRng;
use crate::wire::{DType, Entry, ErrorCode, ForwardResult, Limits, Message, ModelId, SessionId, Shape, Span, Tensor};

fn model() -> ModelId {
    ModelId { hash: [3; 32], name: "tiny".into() }
}

/// A worker node serving `handler`, a client node connected to it, and their directories.
fn pair(handler: Arc<dyn FrameHandler>) -> (Node, Node, [TempDir; 2]) {
    let dirs = [TempDir::new(), TempDir::new()];
    let mut cw = config(&dirs[0], Transport::Tcp, vec![]);
    cw.handler = Some(handler);
    let worker = Node::start(cw).unwrap();
    let client = Node::start(config(&dirs[1], Transport::Tcp, vec![])).unwrap();
    client.dial(worker.listen_addrs().unwrap()[0].clone()).unwrap();
    (worker, client, dirs)
}

fn entry(session: u128, step: u64, start_pos: u32, n_tokens: u32) -> Entry {
    Entry { session: SessionId(session), step, start_pos, n_tokens }
}

const WHOLE: Span = Span { first_layer: 0, layer_count: TINY_LAYERS as u32 };
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(10));

#[test]
fn a_hop_returns_what_the_worker_computes_and_refusals_carry_their_code() {
    let span = Arc::new(tiny_llama(0, TINY_LAYERS, None));
    let handler = Arc::new(SpanHandler::new(span, Arc::new(ThreadPool::new(1)), model(), Limits::default(), SessionLimits::default()));
    let (worker, client, _dirs) = pair(handler.clone());
    let mut rng = TestRng::new(11);
    let (prompt, step) = (rng.gaussians(5 * TINY_HIDDEN), rng.gaussians(TINY_HIDDEN));
    let m = model();
    let hop = |entries: &'static [Entry], wire: DType| Hop { model: &m, span: WHOLE, entries, wire };

    // Session 1 through the network; session 2, the same inputs, straight into the handler.
    let got = [
        forward(&client, worker.peer_id(), hop(&[Entry { session: SessionId(1), step: 0, start_pos: 0, n_tokens: 5 }], DType::F32), &prompt, TINY_HIDDEN, TIMEOUT).unwrap(),
        forward(&client, worker.peer_id(), hop(&[Entry { session: SessionId(1), step: 1, start_pos: 5, n_tokens: 1 }], DType::F32), &step, TINY_HIDDEN, TIMEOUT).unwrap(),
    ];
    let direct = |start: u32, rows: &[f32]| -> Vec<f32> {
        let n = (rows.len() / TINY_HIDDEN) as u32;
        let frame = Message::Forward(crate::wire::Forward {
            model: model(),
            span: WHOLE,
            entries: vec![entry(2, u64::from(start > 0), start, n)],
            hidden: Tensor::from_f32(rows, Shape::matrix(n, TINY_HIDDEN as u32), DType::F32).unwrap(),
        })
        .encode()
        .unwrap();
        match Message::decode(&handler.handle(PeerId::random(), &frame), &Limits::default()).unwrap() {
            Message::ForwardResult(r) => r.hidden.to_f32(),
            other => panic!("expected a result, got {:?}", other.kind()),
        }
    };
    assert_eq!(got, [direct(0, &prompt), direct(5, &step)], "the hop's answer is the handler's, bit for bit");

    // bf16 on the wire: the worker answers in bf16 too, decoded back to f32.
    let bf16 = forward(&client, worker.peer_id(), hop(&[Entry { session: SessionId(3), step: 0, start_pos: 0, n_tokens: 5 }], DType::BF16), &prompt, TINY_HIDDEN, TIMEOUT).unwrap();
    assert_eq!(bf16.len(), prompt.len());
    assert!(bf16.iter().zip(&got[0]).all(|(a, b)| (a - b).abs() <= 0.05 * (1.0 + b.abs())), "bf16 hop close to f32");

    let refusal = |e: Error| match e {
        Error::Worker { peer, code, .. } => {
            assert_eq!(peer, worker.peer_id().to_string());
            code
        }
        other => panic!("expected a worker refusal, got {other}"),
    };
    // A gap (position 9 of a session holding 6): step_mismatch, which another provider may fix.
    let gap = forward(&client, worker.peer_id(), hop(&[Entry { session: SessionId(1), step: 2, start_pos: 9, n_tokens: 1 }], DType::F32), &step, TINY_HIDDEN, TIMEOUT);
    let code = refusal(gap.unwrap_err());
    assert_eq!(code, ErrorCode::StepMismatch);
    assert!(code.recoverable());
    // Another model: wrong_model, which no provider of these layers can fix.
    let other = ModelId { hash: [4; 32], name: "other".into() };
    let wrong = forward(&client, worker.peer_id(), Hop { model: &other, span: WHOLE, entries: &[Entry { session: SessionId(5), step: 0, start_pos: 0, n_tokens: 1 }], wire: DType::F32 }, &step, TINY_HIDDEN, TIMEOUT);
    let code = refusal(wrong.unwrap_err());
    assert_eq!(code, ErrorCode::WrongModel);
    assert!(!code.recoverable());
    // Rows that do not match the entries never leave the client.
    let bad = forward(&client, worker.peer_id(), hop(&[Entry { session: SessionId(6), step: 0, start_pos: 0, n_tokens: 2 }], DType::F32), &step, TINY_HIDDEN, TIMEOUT);
    assert!(matches!(bad, Err(Error::Shape(_))), "{bad:?}");
    assert_eq!(handler.session_count(), 3, "sessions 1, 2 and 3 only");
}

/// A peer that answers every forward with rows one value wider than asked, under the same
/// entries.
struct WideAnswers;

impl FrameHandler for WideAnswers {
    fn handle(&self, _peer: PeerId, request: &[u8]) -> Vec<u8> {
        let Ok(Message::Forward(f)) = Message::decode(request, &Limits::default()) else { panic!("a forward") };
        let dims = f.hidden.shape();
        let (rows, width) = (dims.dims()[0], dims.dims()[1] + 1);
        let values = vec![0.5f32; (rows * width) as usize];
        let hidden = Tensor::from_f32(&values, Shape::matrix(rows, width), DType::F32).unwrap();
        Message::ForwardResult(ForwardResult { entries: f.entries, hidden }).encode().unwrap()
    }

    fn info(&self) -> serde_json::Value {
        serde_json::json!({ "mode": "wide" })
    }
}

#[test]
fn an_answer_of_another_shape_is_refused_as_the_peers_fault() {
    let (worker, client, _dirs) = pair(Arc::new(WideAnswers));
    let m = model();
    let entries = [entry(1, 0, 0, 3)];
    let hop = Hop { model: &m, span: WHOLE, entries: &entries, wire: DType::F32 };
    match forward(&client, worker.peer_id(), hop, &vec![0.0; 3 * TINY_HIDDEN], TINY_HIDDEN, TIMEOUT) {
        Err(Error::Worker { code: ErrorCode::InvalidRequest, message, .. }) => {
            assert!(message.contains("shape"), "{message}");
        }
        other => panic!("expected a refusal of the answer, got {other:?}"),
    }
}
