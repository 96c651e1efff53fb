//! The client half over real nodes (TCP on 127.0.0.1): a worker serving the tiny random
//! Llama (`tests/data/tiny-llama`, 3 layers, hidden 64) answers [`forward`] with the values
//! its handler computes, refusals arrive as [`Error::Worker`] with their code, and an
//! answer that is not this request's result is refused too.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use super::{forward, forward_chain, ChainHop, Hop, SessionLimits, SpanHandler};
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
    let hop = |entries: &'static [Entry], wire: DType| Hop { model: &m, span: WHOLE, entries, wire, width_out: TINY_HIDDEN };

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
    let wrong = forward(&client, worker.peer_id(), Hop { model: &other, span: WHOLE, entries: &[Entry { session: SessionId(5), step: 0, start_pos: 0, n_tokens: 1 }], wire: DType::F32, width_out: TINY_HIDDEN }, &step, TINY_HIDDEN, TIMEOUT);
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
    let hop = Hop { model: &m, span: WHOLE, entries: &entries, wire: DType::F32, width_out: TINY_HIDDEN };
    match forward(&client, worker.peer_id(), hop, &vec![0.0; 3 * TINY_HIDDEN], TINY_HIDDEN, TIMEOUT) {
        Err(Error::Worker { code: ErrorCode::InvalidRequest, message, .. }) => {
            assert!(message.contains("shape"), "{message}");
        }
        other => panic!("expected a refusal of the answer, got {other:?}"),
    }
}

/// A worker node serving layer `layer` of the tiny Llama alone.
fn one_layer_worker(layer: usize, dir: &TempDir) -> Node {
    let span = Arc::new(tiny_llama(layer, 1, None));
    let handler = Arc::new(SpanHandler::new(span, Arc::new(ThreadPool::new(1)), model(), Limits::default(), SessionLimits::default()));
    let mut c = config(dir, Transport::Tcp, vec![]);
    c.handler = Some(handler);
    Node::start(c).unwrap()
}

#[test]
fn a_chained_route_gives_every_hops_output_as_hop_by_hop_calls_do() {
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new()).collect();
    let workers: Vec<Node> = (0..TINY_LAYERS).map(|l| one_layer_worker(l, &dirs[l])).collect();
    let client = Node::start(config(&dirs[3], Transport::Tcp, vec![])).unwrap();
    for w in &workers {
        client.dial(w.listen_addrs().unwrap()[0].clone()).unwrap();
    }
    // The workers never met: each learns the next one's address from the relay.
    let route: Vec<ChainHop> = workers
        .iter()
        .enumerate()
        .map(|(l, w)| ChainHop { peer: w.peer_id(), addrs: w.listen_addrs().unwrap(), span: Span { first_layer: l as u32, layer_count: 1 }, width_out: TINY_HIDDEN })
        .collect();
    let m = model();
    let mut rng = TestRng::new(5);
    let (prompt, step) = (rng.gaussians(4 * TINY_HIDDEN), rng.gaussians(TINY_HIDDEN));
    // Session 1 chained, session 2 hop by hop, same inputs: the same outputs at every hop.
    let star = |entries: &[Entry], x: &[f32]| -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = Vec::new();
        for (hop, w) in route.iter().zip(&workers) {
            let input = outs.last().map_or(x, |o| o.as_slice());
            let h = Hop { model: &m, span: hop.span, entries, wire: DType::F32, width_out: TINY_HIDDEN };
            let out = forward(&client, w.peer_id(), h, input, TINY_HIDDEN, TIMEOUT).unwrap();
            outs.push(out);
        }
        outs
    };
    for (i, (start, x)) in [(0u32, &prompt), (4, &step)].into_iter().enumerate() {
        let n = (x.len() / TINY_HIDDEN) as u32;
        let chained = forward_chain(&client, &route, &m, &[entry(1, i as u64, start, n)], DType::F32, x, TINY_HIDDEN, TIMEOUT).unwrap();
        assert!(chained.failure.is_none(), "{:?}", chained.failure);
        assert_eq!(chained.outputs, star(&[entry(2, i as u64, start, n)], x), "step {i}");
    }
    for w in &workers {
        assert!(w.describe()["relays"].as_u64().unwrap() >= 2);
    }

    // A stale step (older than one that ran) is refused, not run over the newer cache.
    let stale = forward(&client, workers[0].peer_id(), Hop { model: &m, span: route[0].span, entries: &[entry(1, 0, 0, 4)], wire: DType::F32, width_out: TINY_HIDDEN }, &prompt, TINY_HIDDEN, TIMEOUT);
    assert!(matches!(stale, Err(Error::Worker { code: ErrorCode::StepMismatch, ref message, .. }) if message.contains("older")), "{stale:?}");

    // A relay that would loop back or skip layers is refused before anything runs.
    let relay_to = |next: Vec<crate::wire::NextHop>| {
        let frame = Message::Relay(crate::wire::Relay {
            chain: 5,
            keep: false,
            next,
            forward: crate::wire::Forward {
                model: m.clone(),
                span: route[0].span,
                entries: vec![entry(3, 0, 0, 1)],
                hidden: Tensor::from_f32(&step, Shape::matrix(1, TINY_HIDDEN as u32), DType::F32).unwrap(),
            },
        })
        .encode()
        .unwrap();
        match Message::decode(&client.request(workers[0].peer_id(), frame, TIMEOUT).unwrap(), &Limits::default()).unwrap() {
            Message::Error(e) => (e.code, e.message),
            other => panic!("expected a refusal, got {:?}", other.kind()),
        }
    };
    let hop = |w: &Node, first_layer: u32| crate::wire::NextHop { peer: w.peer_id().to_bytes(), addrs: vec![], span: Span { first_layer, layer_count: 1 } };
    let (code, message) = relay_to(vec![hop(&workers[1], 1), hop(&workers[0], 2)]);
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(message.contains("on the route already"), "{message}");
    let (code, message) = relay_to(vec![hop(&workers[2], 2)]);
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(message.contains("starts at layer 2, the route is at layer 1"), "{message}");

    // A Collect whose relay never comes is answered RelayFailed once its wait is over.
    let collect = Message::Collect(crate::wire::Collect { chain: 1, entries: vec![entry(9, 0, 0, 1)], wait_ms: 200 }).encode().unwrap();
    let answer = client.request(workers[1].peer_id(), collect, TIMEOUT).unwrap();
    assert!(matches!(Message::decode(&answer, &Limits::default()), Ok(Message::Error(e)) if e.code == ErrorCode::RelayFailed));

    // The last worker gone: the second cannot pass its output on, says so, and what the first
    // gave is kept.
    workers[2].shutdown();
    let broken = forward_chain(&client, &route, &m, &[entry(1, 2, 5, 1)], DType::F32, &step, TINY_HIDDEN, TIMEOUT).unwrap();
    assert_eq!(broken.outputs.len(), 1);
    match broken.failure {
        Some((1, Error::Worker { code: ErrorCode::RelayFailed, peer, .. })) => assert_eq!(peer, workers[1].peer_id().to_string()),
        other => panic!("expected hop 1 to report the broken relay, got {other:?}"),
    }
}
