//! Nodes on 127.0.0.1 with port 0, real sockets, over TCP and over QUIC: identity files,
//! bootstrap, provider records, echo round trips, refused and malformed frames, vanished peers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::span::{SessionLimits, SpanHandler};
use crate::error::Error;
use crate::wire::{
    DType, Entry, ErrorCode, Forward, Limits, Message, ModelId, SessionId, Shape, Span, Tensor, FIXED_HEADER_LEN,
};

/// A fresh directory under the system temp dir, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshpy-net-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn config(dir: &TempDir, transport: Transport, bootstrap: Vec<Multiaddr>) -> NodeConfig {
    let mut c = NodeConfig::new(&dir.0);
    c.transport = transport;
    c.bootstrap = bootstrap;
    c.request_timeout = Duration::from_secs(10);
    c.query_timeout = Duration::from_secs(10);
    c.handler = Some(Arc::new(EchoHandler::new(Limits::default())));
    c
}

fn forward_frame(hidden: &[f32], dtype: DType) -> Vec<u8> {
    let rows = (hidden.len() / 8) as u32;
    Message::Forward(Forward {
        model: ModelId { hash: [7; 32], name: "echo-test".into() },
        span: Span { first_layer: 0, layer_count: 4 },
        entries: vec![Entry { session: SessionId(42), step: 0, start_pos: 0, n_tokens: rows }],
        hidden: Tensor::from_f32(hidden, Shape::matrix(rows, 8), dtype).unwrap(),
    })
    .encode()
    .unwrap()
}

fn error_code(frame: &[u8]) -> ErrorCode {
    match Message::decode(frame, &Limits::default()).unwrap() {
        Message::Error(e) => e.code,
        other => panic!("expected an error frame, got {:?}", other.kind()),
    }
}

#[test]
fn identity_is_created_once_with_owner_only_permissions() {
    let dir = TempDir::new();
    let a = identity::load_or_create(&dir.0).unwrap();
    let b = identity::load_or_create(&dir.0).unwrap();
    assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(identity::key_path(&dir.0)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn corrupt_identity_is_a_clear_error() {
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(identity::key_path(&dir.0), b"not a key").unwrap();
    match identity::load_or_create(&dir.0) {
        Err(Error::Identity { path, .. }) => assert_eq!(path, identity::key_path(&dir.0)),
        other => panic!("expected an identity error, got {:?}", other.map(|k| k.public().to_peer_id())),
    }
    // The corrupt file is left for the user to inspect, not overwritten.
    assert_eq!(std::fs::read(identity::key_path(&dir.0)).unwrap(), b"not a key");
}

/// Bootstrap, provide and find a key, echo round trips, over one transport.
fn mesh_round_trip(transport: Transport) {
    let (da, db, dc) = (TempDir::new(), TempDir::new(), TempDir::new());
    let a = Node::start(config(&da, transport, vec![])).unwrap();
    let a_addrs = a.listen_addrs().unwrap();
    assert!(!a_addrs.is_empty());
    for addr in &a_addrs {
        let s = addr.to_string();
        assert!(s.starts_with("/ip4/127.0.0.1/"), "{s}");
        assert!(s.ends_with(&format!("/p2p/{}", a.peer_id())), "{s}");
        assert!(!s.contains("/tcp/0/") && !s.contains("/udp/0/"), "port 0 must be resolved: {s}");
    }
    let b = Node::start(config(&db, transport, a_addrs.clone())).unwrap();
    let c = Node::start(config(&dc, transport, a_addrs.clone())).unwrap();
    b.bootstrap().unwrap();
    c.bootstrap().unwrap();
    assert!(b.connected_peers().unwrap().contains(&a.peer_id()));

    let key = layer_key("smollm2@abc", 3);
    assert!(c.get_providers(&key).unwrap().is_empty());
    b.start_providing(&key).unwrap();
    let providers = c.get_providers(&key).unwrap();
    assert_eq!(providers.len(), 1, "{providers:?}");
    assert_eq!(providers[0].0, b.peer_id());
    assert!(!providers[0].1.is_empty(), "a provider comes with its addresses");
    // The provider finds itself too.
    assert_eq!(b.get_providers(&key).unwrap()[0].0, b.peer_id());

    // c may never have connected to b: the request dials it from the provider's addresses.
    let hidden: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
    for dtype in [DType::BF16, DType::F32] {
        let frame = forward_frame(&hidden, dtype);
        let reply = c.request(b.peer_id(), frame, None).unwrap();
        match Message::decode(&reply, &Limits::default()).unwrap() {
            Message::ForwardResult(r) => {
                assert_eq!(r.entries[0].session, SessionId(42));
                assert_eq!(r.hidden.dtype(), dtype);
                assert_eq!(r.hidden.to_f32(), hidden, "these values are exact in bf16");
            }
            other => panic!("expected a forward result, got {:?}", other.kind()),
        }
    }
    let pong = c.request(b.peer_id(), Message::Ping(99).encode().unwrap(), None).unwrap();
    assert_eq!(Message::decode(&pong, &Limits::default()).unwrap(), Message::Pong(99));
    for node in [&a, &b, &c] {
        node.shutdown();
    }
    assert!(matches!(c.listen_addrs(), Err(Error::Network(_))));
}

#[test]
fn mesh_round_trip_tcp() {
    mesh_round_trip(Transport::Tcp);
}

#[test]
fn mesh_round_trip_quic() {
    mesh_round_trip(Transport::Quic);
}

/// Oversized, random and truncated frames get error replies; the node keeps serving.
fn bad_frames(transport: Transport) {
    let (da, db) = (TempDir::new(), TempDir::new());
    let mut ca = config(&da, transport, vec![]);
    ca.limits = Limits { max_frame_bytes: 4096, ..Limits::default() };
    let a = Node::start(ca).unwrap();
    let b = Node::start(config(&db, transport, vec![])).unwrap();
    let a_id = b.dial(a.listen_addrs().unwrap()[0].clone()).unwrap();
    assert_eq!(a_id, a.peer_id());
    let good = forward_frame(&[0.5; 8], DType::BF16);

    // A header announcing a 1 TiB payload, then nothing: refused from the 24 header bytes
    // alone (the node cannot have allocated the terabyte it announces).
    let mut huge = good[..FIXED_HEADER_LEN].to_vec();
    huge[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let reply = b.request(a.peer_id(), huge, None).unwrap();
    assert_eq!(error_code(&reply), ErrorCode::FrameTooLarge);

    // A well-formed frame over the node's 4 KiB limit.
    let big = forward_frame(&vec![0.5; 8 * 512], DType::F32);
    match b.request(a.peer_id(), big, None) {
        Ok(reply) => assert_eq!(error_code(&reply), ErrorCode::FrameTooLarge),
        // The worker may also reset the stream it refused to read; either way, no answer body.
        Err(Error::Network(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
    }

    // Garbage, a short stream, and a frame cut short.
    let reply = b.request(a.peer_id(), b"definitely not a frame, but long enough".to_vec(), None).unwrap();
    assert_eq!(error_code(&reply), ErrorCode::MalformedFrame);
    let reply = b.request(a.peer_id(), b"MSHP".to_vec(), None).unwrap();
    assert_eq!(error_code(&reply), ErrorCode::MalformedFrame);
    let reply = b.request(a.peer_id(), good[..good.len() - 3].to_vec(), None).unwrap();
    assert_eq!(error_code(&reply), ErrorCode::MalformedFrame);
    // A whole frame whose body lies: a model name length past the section (the handler's
    // decoder refuses it).
    let mut lying = good.clone();
    lying[FIXED_HEADER_LEN + 32] = 0xff;
    let reply = b.request(a.peer_id(), lying, None).unwrap();
    assert!(matches!(error_code(&reply), ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge));

    // Still serving.
    let reply = b.request(a.peer_id(), good.clone(), None).unwrap();
    assert!(matches!(Message::decode(&reply, &Limits::default()).unwrap(), Message::ForwardResult(_)));
}

#[test]
fn bad_frames_tcp() {
    bad_frames(Transport::Tcp);
}

#[test]
fn bad_frames_quic() {
    bad_frames(Transport::Quic);
}

/// A request to a peer that shut down fails within its timeout instead of hanging.
fn vanished_peer(transport: Transport) {
    let (da, db) = (TempDir::new(), TempDir::new());
    let a = Node::start(config(&da, transport, vec![])).unwrap();
    let b = Node::start(config(&db, transport, vec![])).unwrap();
    b.dial(a.listen_addrs().unwrap()[0].clone()).unwrap();
    let ping = Message::Ping(1).encode().unwrap();
    b.request(a.peer_id(), ping.clone(), None).unwrap();
    a.shutdown();
    let start = Instant::now();
    let err = b.request(a.peer_id(), ping, Some(Duration::from_secs(3))).unwrap_err();
    assert!(matches!(err, Error::Network(_) | Error::Timeout(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    // A peer nobody knows an address for fails at once.
    let stranger = PeerId::random();
    let err = b.request(stranger, Message::Ping(2).encode().unwrap(), Some(Duration::from_secs(3))).unwrap_err();
    assert!(matches!(err, Error::Network(_)), "{err}");
}

#[test]
fn vanished_peer_tcp() {
    vanished_peer(Transport::Tcp);
}

#[test]
fn vanished_peer_quic() {
    vanished_peer(Transport::Quic);
}

#[test]
fn node_without_handler_refuses_forwards_answers_info_and_ping_and_both_transports_listen() {
    let (da, db) = (TempDir::new(), TempDir::new());
    let mut ca = config(&da, Transport::Both, vec![]);
    ca.handler = None;
    ca.info = serde_json::json!({ "version": "0.1.0", "mode": "ignored: the handler's wins" })
        .as_object()
        .unwrap()
        .clone();
    let a = Node::start(ca).unwrap();
    let addrs = a.listen_addrs().unwrap();
    assert!(addrs.iter().any(|a| a.to_string().contains("/tcp/")));
    assert!(addrs.iter().any(|a| a.to_string().contains("/quic-v1/")));
    let b = Node::start(config(&db, Transport::Quic, vec![])).unwrap();
    let quic = addrs.iter().find(|a| a.to_string().contains("/quic-v1/")).unwrap();
    b.dial(quic.clone()).unwrap();
    let reply = b.request(a.peer_id(), forward_frame(&[0.5; 8], DType::BF16), None).unwrap();
    assert_eq!(error_code(&reply), ErrorCode::InvalidRequest);
    let reply = b.request(a.peer_id(), Message::Ping(5).encode().unwrap(), None).unwrap();
    assert_eq!(Message::decode(&reply, &Limits::default()).unwrap(), Message::Pong(5));
    let mut info = b.info(a.peer_id(), None).unwrap();
    let listed: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    // Traffic: a counted the frames b sent it and its answers (the Info reply itself is
    // counted once written, after this copy of the description was made).
    let traffic = info.as_object_mut().unwrap().remove("traffic").unwrap();
    let with_b = &traffic[b.peer_id().to_string()];
    assert!(with_b["received"].as_u64().unwrap() > 0 && with_b["sent"].as_u64().unwrap() > 0, "{traffic}");
    assert_eq!(traffic.as_object().unwrap().len(), 1);
    assert_eq!(
        info,
        serde_json::json!({
            "mode": "none", "version": "0.1.0", "peer_id": a.peer_id().to_string(), "listen_addrs": listed,
            "relay": 1, "relays": 0, "refusals": {"invalid_request": 1},
        })
    );
    let mut now = a.describe();
    let later = now.as_object_mut().unwrap().remove("traffic").unwrap();
    assert!(later[b.peer_id().to_string()]["sent"].as_u64() > with_b["sent"].as_u64(), "the Info reply is counted");
    assert_eq!(now, info);
    // An Info frame with bytes it should not have is refused, and a reply kind is no request.
    let mut long_info = Message::Info.encode().unwrap();
    long_info[8] = 8;
    long_info.extend([0u8; 8]);
    assert_eq!(error_code(&b.request(a.peer_id(), long_info, None).unwrap()), ErrorCode::MalformedFrame);
    let pong = Message::Pong(1).encode().unwrap();
    assert_eq!(error_code(&b.request(a.peer_id(), pong, None).unwrap()), ErrorCode::InvalidRequest);
    assert_eq!(a.session_count(), 0);
    assert!("udp".parse::<Transport>().is_err());
}

#[test]
fn info_merges_static_fields_under_the_handlers_and_follows_set_handler() {
    let (da, db) = (TempDir::new(), TempDir::new());
    let mut ca = config(&da, Transport::Tcp, vec![]);
    ca.info = serde_json::json!({ "device": "cpu", "threads": 2 }).as_object().unwrap().clone();
    let a = Node::start(ca).unwrap();
    let b = Node::start(config(&db, Transport::Tcp, vec![])).unwrap();
    b.dial(a.listen_addrs().unwrap()[0].clone()).unwrap();
    let info = b.info(a.peer_id(), None).unwrap();
    assert_eq!((info["mode"].as_str(), info["device"].as_str(), info["threads"].as_u64()), (Some("echo"), Some("cpu"), Some(2)));
    assert_eq!(info["peer_id"], a.peer_id().to_string());
    a.set_info(serde_json::json!({ "threads": 4, "layers_nbytes": 123 }).as_object().unwrap().clone());
    a.set_handler(None);
    let info = b.info(a.peer_id(), None).unwrap();
    assert_eq!((info["mode"].as_str(), info["device"].as_str(), info["threads"].as_u64()), (Some("none"), Some("cpu"), Some(4)));
    assert_eq!(info["layers_nbytes"], 123);
    // A peer nobody knows an address for.
    assert!(matches!(b.info(PeerId::random(), Some(Duration::from_secs(2))), Err(Error::Network(_))));
}

/// Many threads share one node's streams to one worker: every answer matches its request.
fn concurrent_requests(transport: Transport) {
    let (da, db) = (TempDir::new(), TempDir::new());
    let a = Node::start(config(&da, transport, vec![])).unwrap();
    let b = Node::start(config(&db, transport, vec![])).unwrap();
    b.dial(a.listen_addrs().unwrap()[0].clone()).unwrap();
    let peer = a.peer_id();
    std::thread::scope(|scope| {
        for t in 0..24u64 {
            let handle = b.handle();
            scope.spawn(move || {
                for i in 0..40u64 {
                    let nonce = t << 32 | i;
                    let reply = handle.request(peer, Message::Ping(nonce).encode().unwrap(), None).unwrap();
                    assert_eq!(Message::decode(&reply, &Limits::default()).unwrap(), Message::Pong(nonce));
                }
            });
        }
    });
}

#[test]
fn concurrent_requests_tcp() {
    concurrent_requests(Transport::Tcp);
}

#[test]
fn concurrent_requests_quic() {
    concurrent_requests(Transport::Quic);
}

/// Polls `f` every 100 ms until it holds or `limit` passes; returns whether it held.
pub(crate) fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With a 2 s provider TTL: a live provider stays listed past the TTL, in a third node's store
/// too (it re-announces every 0.5 s); one that stops providing, and one that dies without a
/// word, drop out within it.
#[test]
fn provider_records_expire_unless_announced_again() {
    let ttl = Duration::from_secs(2);
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new()).collect();
    let start = |dir: &TempDir, bootstrap: Vec<Multiaddr>| {
        let mut c = config(dir, Transport::Tcp, bootstrap);
        c.provider_ttl = ttl;
        Node::start(c).unwrap()
    };
    let a = start(&dirs[0], vec![]);
    let boot = a.listen_addrs().unwrap();
    let (live, quitter, crasher) = (start(&dirs[1], boot.clone()), start(&dirs[2], boot.clone()), start(&dirs[3], boot));
    for n in [&live, &quitter, &crasher] {
        n.bootstrap().unwrap();
    }
    let key = layer_key("ttl-test", 0);
    for n in [&live, &quitter, &crasher] {
        n.start_providing(&key).unwrap();
    }
    let providers = |node: &Node| -> Vec<PeerId> { node.get_providers(&key).unwrap().into_iter().map(|p| p.0).collect() };
    let mut all = vec![live.peer_id(), quitter.peer_id(), crasher.peer_id()];
    all.sort_by_key(|p| p.to_bytes());
    assert_eq!(providers(&a), all);

    quitter.stop_providing(&key).unwrap();
    assert!(!providers(&quitter).contains(&quitter.peer_id()), "the local record goes at once");
    crasher.shutdown();
    // Within the TTL (plus a query's time) both are gone everywhere; the live one stays.
    assert!(
        eventually(ttl * 3, || providers(&a) == vec![live.peer_id()]),
        "providers after the TTL: {:?}",
        providers(&a)
    );
    std::thread::sleep(ttl + ttl / 2);
    assert_eq!(providers(&a), vec![live.peer_id()]);
    assert_eq!(providers(&quitter), vec![live.peer_id()]);
    // More than a TTL after the first announcement, the bootstrap node's own store still
    // holds the live provider's record: it was announced again.
    assert_eq!(a.stored_providers(&key).unwrap(), vec![live.peer_id()], "a live provider re-announces");
}

/// Forty keys looked up at once: each key's providers, in key order, and no slower than a
/// few single lookups.
#[test]
fn many_provider_lookups_run_at_once() {
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new()).collect();
    let a = Node::start(config(&dirs[0], Transport::Tcp, vec![])).unwrap();
    let boot = a.listen_addrs().unwrap();
    let nodes: Vec<Node> = dirs[1..].iter().map(|d| Node::start(config(d, Transport::Tcp, boot.clone())).unwrap()).collect();
    for n in &nodes {
        n.bootstrap().unwrap();
    }
    let (b, c, d) = (&nodes[0], &nodes[1], &nodes[2]);
    let keys: Vec<Vec<u8>> = (0..40).map(|i| layer_key("many", i)).collect();
    for (i, key) in keys.iter().enumerate() {
        if i % 2 == 0 {
            b.start_providing(key).unwrap();
        }
        if i % 3 == 0 {
            c.start_providing(key).unwrap();
        }
    }
    let start = Instant::now();
    let single = d.get_providers(&keys[0]).unwrap();
    let one = start.elapsed();
    let start = Instant::now();
    let all = d.get_providers_many(keys.clone()).unwrap();
    let many = start.elapsed();
    assert_eq!(all.len(), keys.len());
    assert_eq!(all[0], single);
    for (i, providers) in all.iter().enumerate() {
        let mut want: Vec<PeerId> = [(i % 2 == 0, b.peer_id()), (i % 3 == 0, c.peer_id())]
            .into_iter()
            .filter_map(|(has, p)| has.then_some(p))
            .collect();
        want.sort_by_key(|p| p.to_bytes());
        assert_eq!(providers.iter().map(|p| p.0).collect::<Vec<_>>(), want, "key {i}");
        assert!(providers.iter().all(|p| !p.1.is_empty()), "key {i}: addresses");
    }
    assert!(many < one * 10 + Duration::from_millis(500), "40 lookups took {many:?}, one {one:?}");
    assert_eq!(d.get_providers_many(Vec::new()).unwrap(), Vec::<Providers>::new());
}

/// A bare libp2p peer for tests: our swarm, driven on a runtime of its own, with no node
/// around it, so a test can write any bytes on a tensor stream and vanish at any moment.
pub(crate) struct RawPeer {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) opener: streams::Opener,
    blob_opener: streams::Opener,
    swarm: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl RawPeer {
    /// A peer that knows `target`'s address `addr`.
    pub(crate) fn new(transport: Transport, target: PeerId, addr: &Multiaddr) -> RawPeer {
        use futures::StreamExt;
        let dir = TempDir::new();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let keypair = identity::load_or_create(&dir.0).unwrap();
        let config = config(&dir, transport, vec![]);
        let (mut swarm, [(opener, _incoming), (blob_opener, _blob_incoming)]) =
            runtime.block_on(async { behaviour::build_swarm(keypair, &config) }).unwrap();
        let mut base = addr.clone();
        base.pop();
        // Kademlia hands the address out for dials by peer id (reconnections).
        swarm.behaviour_mut().kad.add_address(&target, base);
        let addr = addr.clone();
        let swarm = runtime.spawn(async move {
            swarm.dial(addr).unwrap();
            loop {
                swarm.select_next_some().await;
            }
        });
        RawPeer { runtime, opener, blob_opener, swarm, _dir: dir }
    }

    /// A new tensor stream to `peer` with `bytes` written on it.
    pub(crate) fn stream_with(&self, peer: PeerId, bytes: &[u8]) -> libp2p::Stream {
        self.open_with(&self.opener, peer, bytes)
    }

    /// A new blob stream to `peer` with `bytes` written on it.
    pub(crate) fn blob_stream_with(&self, peer: PeerId, bytes: &[u8]) -> libp2p::Stream {
        self.open_with(&self.blob_opener, peer, bytes)
    }

    fn open_with(&self, opener: &streams::Opener, peer: PeerId, bytes: &[u8]) -> libp2p::Stream {
        use futures::AsyncWriteExt;
        self.runtime.block_on(async {
            let mut stream = opener.open(peer, Vec::new()).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            stream.flush().await.unwrap();
            stream
        })
    }

    /// Everything the worker sends on `stream` until it closes it (after closing this side
    /// first when `close`).
    pub(crate) fn reply(&self, stream: &mut libp2p::Stream, close: bool) -> Vec<u8> {
        use futures::{AsyncReadExt, AsyncWriteExt};
        self.runtime.block_on(async {
            if close {
                stream.close().await.unwrap();
            }
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply).await;
            reply
        })
    }

    /// Ends the peer's process, as far as the network can tell: the swarm and its connections
    /// are dropped without a goodbye.
    fn vanish(self) {
        self.swarm.abort();
        self.runtime.shutdown_background();
    }
}

/// Peers that go away mid-frame: the worker (a span worker over the tiny model) answers or
/// drops the stream, frees what it held, and keeps serving another peer's session, and new
/// sessions.
fn peer_vanishing_mid_frame(transport: Transport) {
    let (dw, dc) = (TempDir::new(), TempDir::new());
    let model = crate::wire::ModelId { hash: [3; 32], name: "tiny".into() };
    let span = Arc::new(crate::model::tests::tiny_llama(0, 3, None));
    let pool = Arc::new(crate::compute::ThreadPool::new(1));
    let mut cw = config(&dw, transport, vec![]);
    cw.handler = Some(Arc::new(SpanHandler::new(span, pool, model.clone(), Limits::default(), SessionLimits::default())));
    let worker = Node::start(cw).unwrap();
    let client = Node::start(config(&dc, transport, vec![])).unwrap();
    let addr = worker.listen_addrs().unwrap()[0].clone();
    client.dial(addr.clone()).unwrap();
    let hidden = 64;
    let step = |session: u128, start: u32, rows: u32| -> Vec<u8> {
        let values: Vec<f32> = (0..rows * hidden).map(|i| ((i * 7 + start) % 13) as f32 * 0.1 - 0.6).collect();
        Message::Forward(Forward {
            model: model.clone(),
            span: Span { first_layer: 0, layer_count: 3 },
            entries: vec![Entry { session: SessionId(session), step: 0, start_pos: start, n_tokens: rows }],
            hidden: Tensor::from_f32(&values, Shape::matrix(rows, hidden), DType::F32).unwrap(),
        })
        .encode()
        .unwrap()
    };
    let run = |session: u128, start: u32, rows: u32| -> Vec<f32> {
        let reply = client.request(worker.peer_id(), step(session, start, rows), None).unwrap();
        match Message::decode(&reply, &Limits::default()).unwrap() {
            Message::ForwardResult(r) => r.hidden.to_f32(),
            other => panic!("expected a forward result, got {other:?}"),
        }
    };
    // Session 1 starts; session 2 will do the same steps later, as the reference.
    let mut want = vec![run(1, 0, 4)];
    let baseline = worker.inbound_streams();
    assert!(baseline >= 1, "the client's stream is open");
    let streams_back = || eventually(Duration::from_secs(15), || worker.inbound_streams() == baseline);

    // A Forward of 200 rows (about 51 KB) of which only the header and 1000 bytes arrive.
    let big = step(9, 0, 200);
    let cut = &big[..FIXED_HEADER_LEN + 1000];

    // 1. The peer closes its write side: the frame is short, the worker says so.
    let raw = RawPeer::new(transport, worker.peer_id(), &addr);
    let mut stream = raw.stream_with(worker.peer_id(), cut);
    let reply = raw.reply(&mut stream, true);
    match Message::decode(&reply, &Limits::default()).unwrap() {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::MalformedFrame);
            assert!(e.message.contains(&format!("ended after {} of the {} bytes", cut.len(), big.len())), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(streams_back(), "{} streams, {baseline} before", worker.inbound_streams());
    want.push(run(1, 4, 1));

    // 2. The peer drops the stream (a reset) mid-frame.
    let stream = raw.stream_with(worker.peer_id(), cut);
    assert!(eventually(Duration::from_secs(5), || worker.inbound_streams() == baseline + 1));
    drop(stream);
    assert!(streams_back(), "{} streams, {baseline} before", worker.inbound_streams());
    want.push(run(1, 5, 1));

    // 3. The whole peer vanishes mid-frame, with a second stream waiting before its header.
    let _stream = raw.stream_with(worker.peer_id(), cut);
    let _idle = raw.stream_with(worker.peer_id(), &[]);
    assert!(eventually(Duration::from_secs(5), || worker.inbound_streams() == baseline + 2));
    raw.vanish();
    // The worker serves on while the dead peer's streams linger ...
    want.push(run(1, 6, 1));
    // ... until the connection is found dead: at once over TCP (the socket closes), over QUIC
    // at its idle timeout (5 s: nothing is sent when a process dies).
    assert!(streams_back(), "{} streams, {baseline} before", worker.inbound_streams());

    // Session 1 went on as if nothing happened: session 2 now takes the same steps.
    let again: Vec<Vec<f32>> = [(0, 4), (4, 1), (5, 1), (6, 1)].iter().map(|&(s, n)| run(2, s, n)).collect();
    assert_eq!(again, want);
    assert_eq!(worker.session_count(), 2, "the partial frames started no session");
}

#[test]
fn peer_vanishing_mid_frame_tcp() {
    peer_vanishing_mid_frame(Transport::Tcp);
}

#[test]
fn peer_vanishing_mid_frame_quic() {
    peer_vanishing_mid_frame(Transport::Quic);
}

/// `read_frame` over a byte stream: frames bigger than its read chunk come back whole; a frame
/// cut short anywhere says how much of it arrived; the next frame on the stream is read after
/// the first.
#[test]
fn read_frame_reads_in_chunks_and_names_truncation() {
    use futures::executor::block_on;
    use futures::io::Cursor;
    let rows = (3 * codec::READ_CHUNK / (8 * 4) + 5) as u32; // a bit over 3 chunks of f32
    let big = Message::Forward(Forward {
        model: ModelId { hash: [1; 32], name: "m".into() },
        span: Span { first_layer: 0, layer_count: 1 },
        entries: vec![Entry { session: SessionId(1), step: 0, start_pos: 0, n_tokens: rows }],
        hidden: Tensor::from_f32(&vec![0.25; rows as usize * 8], Shape::matrix(rows, 8), DType::F32).unwrap(),
    })
    .encode()
    .unwrap();
    assert!(big.len() > 3 * codec::READ_CHUNK);
    let ping = Message::Ping(3).encode().unwrap();
    let mut both = Cursor::new([big.clone(), ping.clone()].concat());
    assert_eq!(block_on(codec::read_frame(&mut both, &Limits::default(), None)).unwrap(), big);
    assert_eq!(block_on(codec::read_frame(&mut both, &Limits::default(), None)).unwrap(), ping);
    assert!(matches!(block_on(codec::read_frame(&mut both, &Limits::default(), None)), Err(codec::ReadError::Closed)));
    for cut in [FIXED_HEADER_LEN + 1, codec::READ_CHUNK, codec::READ_CHUNK + FIXED_HEADER_LEN, big.len() - 1] {
        match block_on(codec::read_frame(&mut Cursor::new(&big[..cut]), &Limits::default(), None)) {
            Err(codec::ReadError::Refused(r)) => {
                assert_eq!(r.code, ErrorCode::MalformedFrame);
                assert!(r.message.contains(&format!("after {cut} of the {} bytes", big.len())), "{}", r.message);
            }
            other => panic!("cut at {cut}: {:?}", other.map(|f| f.len())),
        }
    }
}

#[test]
fn a_network_key_admits_only_the_nodes_holding_it() {
    let keys = TempDir::new();
    std::fs::create_dir_all(&keys.0).unwrap();
    let (mine, theirs) = (keys.0.join("mesh.key"), keys.0.join("other.key"));
    let key = NetworkKey::generate(&mine).unwrap();
    let other = NetworkKey::generate(&theirs).unwrap();
    assert_ne!(key.fingerprint(), other.fingerprint());
    assert_eq!(NetworkKey::load(&mine).unwrap().fingerprint(), key.fingerprint());
    // Never over an existing file; a file that is no key says how to make one.
    assert!(matches!(NetworkKey::generate(&mine), Err(Error::InvalidArgument(m)) if m.contains("not overwriting")));
    std::fs::write(keys.0.join("bad.key"), "not a key").unwrap();
    assert!(matches!(NetworkKey::load(&keys.0.join("bad.key")), Err(Error::InvalidArgument(m)) if m.contains("meshpy keygen")));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&mine).unwrap().permissions().mode() & 0o777, 0o600);
    }

    let dirs: Vec<TempDir> = (0..5).map(|_| TempDir::new()).collect();
    let keyed = |dir: &TempDir, k: Option<NetworkKey>, transport: Transport| {
        let mut c = config(dir, transport, vec![]);
        c.network_key = k;
        Node::start(c)
    };
    // "both" with a key listens on TCP alone; "quic" with a key is refused, saying why.
    let a = keyed(&dirs[0], Some(key), Transport::Both).unwrap();
    let addrs = a.listen_addrs().unwrap();
    assert!(!addrs.is_empty() && addrs.iter().all(|a| a.to_string().contains("/tcp/")), "{addrs:?}");
    match keyed(&dirs[4], Some(key), Transport::Quic) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("QUIC"), "{m}"),
        other => panic!("expected QUIC with a key refused, got {:?}", other.map(|n| n.peer_id())),
    }
    let member = keyed(&dirs[1], Some(key), Transport::Tcp).unwrap();
    let outsider = keyed(&dirs[2], None, Transport::Tcp).unwrap();
    let stranger = keyed(&dirs[3], Some(other), Transport::Tcp).unwrap();
    // The member connects and is answered.
    assert_eq!(member.dial(addrs[0].clone()).unwrap(), a.peer_id());
    let reply = member.request(a.peer_id(), Message::Ping(9).encode().unwrap(), None).unwrap();
    assert_eq!(Message::decode(&reply, &Limits::default()).unwrap(), Message::Pong(9));
    // Without the key, or with another, the connection never completes: no dial, no request.
    for node in [&outsider, &stranger] {
        assert!(node.dial(addrs[0].clone()).is_err());
        assert!(node.request(a.peer_id(), Message::Ping(1).encode().unwrap(), Some(Duration::from_secs(3))).is_err());
    }
    // Nor can the keyed node reach an open one.
    let open_addr = outsider.listen_addrs().unwrap()[0].clone();
    assert!(a.dial(open_addr).is_err());
    assert!(!a.connected_peers().unwrap().contains(&outsider.peer_id()));
}

#[test]
fn an_allow_list_admits_only_its_peers_both_ways() {
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new()).collect();
    let friend = Node::start(config(&dirs[1], Transport::Tcp, vec![])).unwrap();
    let stranger = Node::start(config(&dirs[2], Transport::Tcp, vec![])).unwrap();
    let mut c = config(&dirs[0], Transport::Tcp, vec![]);
    c.allow_peers = Some(vec![friend.peer_id()]);
    let guarded = Node::start(c).unwrap();
    let addr = guarded.listen_addrs().unwrap()[0].clone();
    assert_eq!(friend.dial(addr.clone()).unwrap(), guarded.peer_id());
    let reply = friend.request(guarded.peer_id(), Message::Ping(3).encode().unwrap(), None).unwrap();
    assert_eq!(Message::decode(&reply, &Limits::default()).unwrap(), Message::Pong(3));
    // The stranger's handshake completes, then the connection is denied: nothing is answered.
    let _ = stranger.dial(addr);
    assert!(stranger.request(guarded.peer_id(), Message::Ping(4).encode().unwrap(), Some(Duration::from_secs(3))).is_err());
    // Nor does the guarded node connect out to it.
    assert!(guarded.dial(stranger.listen_addrs().unwrap()[0].clone()).is_err());
    assert!(!guarded.connected_peers().unwrap().contains(&stranger.peer_id()));
}
