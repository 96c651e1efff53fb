//! A live span worker under hostile peers, on 127.0.0.1 with real sockets: per-peer limits
//! (sessions, KV bytes, requests per second, streams at once) refuse with `Overloaded` and are
//! counted in `Info`; a frame that stalls is refused and its buffer freed; and 100,000 random
//! and mutated frames, with raw garbage on the TCP port, leave a real session's outputs
//! unchanged, every stream answered or closed, and memory bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

use super::tests::{config, eventually, RawPeer, TempDir};
use super::*;
use crate::span::{SessionLimits, SpanHandler};
use crate::wire::tests_fuzz::FrameFuzzer;
use crate::wire::{
    DType, Entry, ErrorCode, Forward, Limits, Message, ModelId, SessionId, Shape, Span, Tensor, FIXED_HEADER_LEN,
};

/// The tiny model's width, and the model id its worker serves.
const HIDDEN: u32 = 64;

/// KV bytes of one position of a session on all 3 layers: keys and values, 32 wide, f32.
const PER_POSITION: u64 = 3 * 2 * 32 * 4;

fn tiny_model() -> ModelId {
    ModelId { hash: [3; 32], name: "tiny".into() }
}

/// A worker node over the tiny model's 3 layers with `session_limits` and `peer_limits`.
fn worker(dir: &TempDir, transport: Transport, session_limits: SessionLimits, peer_limits: PeerLimits) -> (Node, Arc<SpanHandler>) {
    let span = Arc::new(crate::model::tests::tiny_llama(0, 3, None));
    let pool = Arc::new(crate::compute::ThreadPool::new(1));
    let handler = Arc::new(SpanHandler::new(span, pool, tiny_model(), Limits::default(), session_limits));
    let mut c = config(dir, transport, vec![]);
    c.handler = Some(handler.clone());
    c.peer_limits = peer_limits;
    (Node::start(c).unwrap(), handler)
}

/// A `Forward` of `rows` rows for `session` from position `start`.
fn step(session: u128, start: u32, rows: u32) -> Vec<u8> {
    let values: Vec<f32> = (0..rows * HIDDEN).map(|i| ((i * 7 + start) % 13) as f32 * 0.1 - 0.6).collect();
    Message::Forward(Forward {
        model: tiny_model(),
        span: Span { first_layer: 0, layer_count: 3 },
        entries: vec![Entry { session: SessionId(session), step: u64::from(start), start_pos: start, n_tokens: rows }],
        hidden: Tensor::from_f32(&values, Shape::matrix(rows, HIDDEN), DType::F32).unwrap(),
    })
    .encode()
    .unwrap()
}

/// The output rows of a `ForwardResult` frame, or the error code of an `Error` one.
fn outcome(frame: &[u8]) -> Result<Vec<f32>, (ErrorCode, String)> {
    match Message::decode(frame, &Limits::default()).unwrap() {
        Message::ForwardResult(r) => Ok(r.hidden.to_f32()),
        Message::Error(e) => Err((e.code, e.message)),
        other => panic!("expected a forward result or an error, got {:?}", other.kind()),
    }
}

/// `Info`'s count of refusals with `code` on `node`.
fn refusals(node: &Node, code: &str) -> u64 {
    node.describe()["refusals"][code].as_u64().unwrap_or(0)
}

#[test]
fn per_peer_limits_refuse_overloaded_and_are_counted() {
    let (dw, da, db) = (TempDir::new(), TempDir::new(), TempDir::new());
    // Room for 2 sessions of one peer, 12 positions of KV per peer, 40 requests per second.
    let per_position = PER_POSITION;
    let sessions = SessionLimits { sessions_per_peer: 2, kv_bytes_per_peer: 12 * per_position, ..SessionLimits::default() };
    let peers = PeerLimits { requests_per_second: 40.0, ..PeerLimits::default() };
    let (worker, _handler) = worker(&dw, Transport::Tcp, sessions, peers);
    let addr = worker.listen_addrs().unwrap()[0].clone();
    let (a, b) = (Node::start(config(&da, Transport::Tcp, vec![])).unwrap(), Node::start(config(&db, Transport::Tcp, vec![])).unwrap());
    a.dial(addr.clone()).unwrap();
    b.dial(addr.clone()).unwrap();
    let run = |node: &Node, frame: Vec<u8>| outcome(&node.request(worker.peer_id(), frame, None).unwrap());

    // Sessions per peer: a's third session is refused, b's first is not.
    run(&a, step(1, 0, 4)).unwrap();
    run(&a, step(2, 0, 4)).unwrap();
    let (code, message) = run(&a, step(3, 0, 1)).unwrap_err();
    assert_eq!(code, ErrorCode::Overloaded, "{message}");
    assert!(message.contains("holds 2 sessions here; one peer may hold 2"), "{message}");
    run(&b, step(3, 0, 4)).unwrap();
    // KV bytes per peer: a's two sessions hold 8 positions; 5 more would pass its 12.
    let (code, message) = run(&a, step(1, 4, 5)).unwrap_err();
    assert_eq!(code, ErrorCode::Overloaded, "{message}");
    assert!(message.contains("one peer may hold"), "{message}");
    run(&a, step(1, 4, 4)).unwrap();
    assert_eq!(refusals(&worker, "overloaded"), 2);

    // Requests per second: a burst of 100 pings gets about 40 through (one second's worth,
    // plus what refills meanwhile), the rest refused; b is not affected.
    std::thread::sleep(Duration::from_millis(1100));
    let ping = Message::Ping(7).encode().unwrap();
    let start = Instant::now();
    let answered: Vec<bool> = (0..100)
        .map(|_| a.request(worker.peer_id(), ping.clone(), None).unwrap())
        .map(|reply| match Message::decode(&reply, &Limits::default()).unwrap() {
            Message::Pong(7) => true,
            Message::Error(e) if e.code == ErrorCode::Overloaded && e.message.contains("requests per second") => false,
            other => panic!("expected a pong or an overloaded error, got {other:?}"),
        })
        .collect();
    let passed = answered.iter().filter(|ok| **ok).count();
    let allowed = 40.0 + 40.0 * start.elapsed().as_secs_f64();
    assert!(passed >= 40 && passed as f64 <= allowed + 1.0, "{passed} of 100 passed; at most {allowed:.0} allowed");
    assert_eq!(Message::decode(&b.request(worker.peer_id(), ping, None).unwrap(), &Limits::default()).unwrap(), Message::Pong(7));
    assert_eq!(refusals(&worker, "overloaded"), 2 + (100 - passed) as u64);

    // Streams at once: a raw peer's fourth open stream is refused at once.
    let dn = TempDir::new();
    let peers = PeerLimits { max_streams: 3, ..PeerLimits::default() };
    let (worker, _handler) = self::worker(&dn, Transport::Tcp, SessionLimits::default(), peers);
    let raw = RawPeer::new(Transport::Tcp, worker.peer_id(), &worker.listen_addrs().unwrap()[0]);
    let held: Vec<_> = (0..3).map(|_| raw.stream_with(worker.peer_id(), &[])).collect();
    let mut fourth = raw.stream_with(worker.peer_id(), &[]);
    let reply = raw.reply(&mut fourth, false);
    let (code, message) = outcome(&reply).unwrap_err();
    assert_eq!(code, ErrorCode::Overloaded);
    assert!(message.contains("tensor streams open here"), "{message}");
    drop(held);
}

/// A frame that stops arriving mid-way is refused after the stall timeout, its stream closed
/// and its buffer freed; the peer's other streams and sessions carry on.
#[test]
fn a_stalled_frame_is_refused_and_its_stream_freed() {
    let (dw, dc) = (TempDir::new(), TempDir::new());
    let peers = PeerLimits { stall_timeout: Duration::from_millis(300), ..PeerLimits::default() };
    let (worker, _handler) = worker(&dw, Transport::Tcp, SessionLimits::default(), peers);
    let addr = worker.listen_addrs().unwrap()[0].clone();
    let client = Node::start(config(&dc, Transport::Tcp, vec![])).unwrap();
    client.dial(addr.clone()).unwrap();
    outcome(&client.request(worker.peer_id(), step(1, 0, 2), None).unwrap()).unwrap();
    let baseline = worker.inbound_streams();
    let raw = RawPeer::new(Transport::Tcp, worker.peer_id(), &addr);
    let big = step(9, 0, 200);
    for cut in [5, FIXED_HEADER_LEN + 1000] {
        let started = Instant::now();
        let mut stream = raw.stream_with(worker.peer_id(), &big[..cut]);
        let reply = raw.reply(&mut stream, false);
        let (code, message) = outcome(&reply).unwrap_err();
        assert_eq!(code, ErrorCode::MalformedFrame);
        assert!(message.contains(&format!("stalled: {cut} of its")), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        drop(stream);
        assert!(eventually(Duration::from_secs(5), || worker.inbound_streams() == baseline));
    }
    // A frame that keeps coming, a byte every 150 ms, too slowly for its length: refused at
    // its deadline (0.3 s plus its length at 64 KiB/s), though it never paused for 0.3 s.
    let mut stream = raw.stream_with(worker.peer_id(), &big[..FIXED_HEADER_LEN]);
    raw.runtime.block_on(async {
        for i in 0..25 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let _ = stream.write_all(&big[FIXED_HEADER_LEN + i..FIXED_HEADER_LEN + i + 1]).await;
            let _ = stream.flush().await;
        }
    });
    let reply = raw.reply(&mut stream, false);
    let (code, message) = outcome(&reply).unwrap_err();
    assert_eq!(code, ErrorCode::MalformedFrame);
    assert!(message.contains("stalled"), "{message}");
    drop(stream);
    assert!(eventually(Duration::from_secs(5), || worker.inbound_streams() == baseline));
    // An idle stream (no byte of a frame yet) is not a stall: it stays open.
    let _idle = raw.stream_with(worker.peer_id(), &[]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(worker.inbound_streams(), baseline + 1);
    outcome(&client.request(worker.peer_id(), step(1, 2, 1), None).unwrap()).unwrap();
    assert_eq!(refusals(&worker, "malformed_frame"), 3);
}

/// Resident memory of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// 100,000 hostile frames (see [`FrameFuzzer`]: most are this worker's own `Forward`s,
/// mutated) on streams of their own, 32 at a time, plus 200 raw TCP connections writing
/// garbage, while a real session takes its steps: every stream is answered or closed, the
/// session's outputs equal a run of the same steps without the noise, the worker still
/// serves, the hostile peer's sessions stay within its limits, and memory stays bounded.
#[test]
fn a_live_worker_survives_100000_hostile_frames_while_a_session_runs() {
    const FRAMES: usize = 100_000;
    let (dw, dc) = (TempDir::new(), TempDir::new());
    let per_position = PER_POSITION;
    let sessions = SessionLimits {
        kv_budget_bytes: 4096 * per_position,
        sessions_per_peer: 64,
        kv_bytes_per_peer: 1024 * per_position,
        ..SessionLimits::default()
    };
    // No rate limit, so every frame reaches the decoder and the handler.
    let peers = PeerLimits { requests_per_second: 0.0, ..PeerLimits::default() };
    let (worker, handler) = worker(&dw, Transport::Tcp, sessions, peers);
    let addr = worker.listen_addrs().unwrap()[0].clone();
    let client = Node::start(config(&dc, Transport::Tcp, vec![])).unwrap();
    client.dial(addr.clone()).unwrap();
    let steps: Vec<(u32, u32)> = std::iter::once((0, 6)).chain((6..40).map(|p| (p, 1))).collect();
    let run = |session: u128, (start, rows): (u32, u32)| outcome(&client.request(worker.peer_id(), step(session, start, rows), None).unwrap()).unwrap();
    let want: Vec<Vec<f32>> = steps.iter().map(|&s| run(1, s)).collect();
    let baseline_streams = worker.inbound_streams();
    let rss_before = rss_bytes();

    // Targets: this worker's Forwards (new sessions, retries, gaps), closes and pings.
    let mut targets: Vec<Vec<u8>> = (0..8u32).map(|i| step(1000 + u128::from(i), [0, 0, 3, 50][i as usize % 4], 1 + i % 5)).collect();
    targets.push(Message::CloseSession(vec![SessionId(1000), SessionId(1001)]).encode().unwrap());
    targets.push(Message::Ping(5).encode().unwrap());
    let mut fuzzer = FrameFuzzer::new(targets, 12);
    let raw = RawPeer::new(Transport::Tcp, worker.peer_id(), &addr);
    let target = worker.peer_id();
    let session_thread = std::thread::scope(|scope| {
        let session = scope.spawn(|| {
            steps
                .iter()
                .map(|&s| {
                    std::thread::sleep(Duration::from_millis(50));
                    run(2, s)
                })
                .collect::<Vec<_>>()
        });
        let started = Instant::now();
        let (answered, closed) = raw.runtime.block_on(async {
            let opener = raw.opener.clone();
            let results = futures::stream::iter((0..FRAMES).map(|_| fuzzer.next_frame()))
                .map(|frame| {
                    let opener = opener.clone();
                    async move {
                        let mut stream = opener.open(target, Vec::new()).await.expect("a stream opens");
                        // Write may fail once the worker refused and closed: fine.
                        let _ = stream.write_all(&frame).await;
                        let _ = stream.close().await;
                        let mut reply = Vec::new();
                        let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut reply)).await;
                        assert!(read.is_ok(), "a stream hung");
                        !reply.is_empty()
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<bool>>()
                .await;
            let answered = results.iter().filter(|a| **a).count();
            (answered, results.len() - answered)
        });
        eprintln!("{FRAMES} hostile frames in {:.1} s: {answered} answered, {closed} closed unanswered", started.elapsed().as_secs_f64());
        // Raw garbage on the TCP port, below libp2p: each connection fails its handshake.
        let socket_addr = match addr.iter().collect::<Vec<_>>()[..] {
            [libp2p::multiaddr::Protocol::Ip4(ip), libp2p::multiaddr::Protocol::Tcp(port), ..] => std::net::SocketAddr::from((ip, port)),
            _ => panic!("a TCP address: {addr}"),
        };
        let mut rng = crate::test_rng::TestRng::new(99);
        for i in 0..200 {
            use std::io::Write;
            let mut tcp = std::net::TcpStream::connect(socket_addr).unwrap();
            let mut garbage = rng.bytes(1 + i * 37 % 4000);
            if i % 2 == 0 {
                // A valid multistream-select opening, then garbage.
                garbage.splice(0..0, b"\x13/multistream/1.0.0\n".iter().copied());
            }
            let _ = tcp.write_all(&garbage);
        }
        session.join().unwrap()
    });
    assert_eq!(session_thread, want, "the session's outputs changed under the noise");
    // The worker serves on, the hostile peer's sessions stayed within its limits, its streams
    // end, and memory stayed bounded.
    assert_eq!(run(3, (0, 6)), want[0]);
    assert!(handler.session_count() <= 3 + 64, "{} sessions", handler.session_count());
    assert!(handler.used_kv_bytes() <= 2 * 40 * per_position + 1024 * per_position, "{} KV bytes", handler.used_kv_bytes());
    drop(raw);
    assert!(eventually(Duration::from_secs(10), || worker.inbound_streams() <= baseline_streams));
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!("resident memory grew {} MiB", grown >> 20);
    assert!(grown < 256 << 20, "resident memory grew {} MiB", grown >> 20);
    let info = worker.describe();
    eprintln!("refusals: {}", info["refusals"]);
    assert!(refusals(&worker, "malformed_frame") > 1000, "{}", info["refusals"]);
}
