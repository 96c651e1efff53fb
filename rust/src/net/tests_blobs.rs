//! The blob protocol between two real nodes: listing, reading bytes and file ranges, and the
//! refusals (unknown items, reads past the end or too large, malformed requests, a peer over
//! its stream or request limits).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use super::blobs::{Blob, MAX_READ, STREAMS_PER_PEER};
use super::tests::{config, RawPeer, TempDir};
use super::*;

fn pair(limits: PeerLimits) -> (TempDir, TempDir, Node, Node) {
    let (da, db) = (TempDir::new(), TempDir::new());
    let mut ca = config(&da, Transport::Tcp, vec![]);
    ca.peer_limits = limits;
    let a = Node::start(ca).unwrap();
    let b = Node::start(config(&db, Transport::Tcp, vec![])).unwrap();
    b.dial(a.listen_addrs().unwrap()[0].clone()).unwrap();
    (da, db, a, b)
}

fn read(node: &Node, peer: PeerId, model: &str, item: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let body = serde_json::json!({"op": "read", "model": model, "item": item, "offset": offset, "len": len});
    node.blob_request(peer, vec![], body.to_string().into_bytes(), None)
}

#[test]
fn a_node_serves_the_ranges_it_seeds_and_refuses_the_rest() {
    let (da, _db, a, b) = pair(PeerLimits::default());
    let path = da.0.join("weights.bin");
    let content: Vec<u8> = (0..(MAX_READ as usize + 1000)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::create_dir_all(&da.0).unwrap();
    std::fs::File::create(&path).unwrap().write_all(&content).unwrap();
    let file = Arc::new(std::fs::File::open(&path).unwrap());
    let mut items = BTreeMap::new();
    items.insert("manifest".to_string(), Blob::Bytes(Arc::from(&b"{\"x\": 1}"[..])));
    items.insert("tensor/t".to_string(), Blob::File { file, offset: 100, len: MAX_READ + 500 });
    a.seeds().set("m@1".to_string(), items);

    let listing = b.blob_request(a.peer_id(), vec![], br#"{"op":"list"}"#.to_vec(), None).unwrap();
    let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listing["models"]["m@1"]["manifest"], 8);
    assert_eq!(listing["models"]["m@1"]["tensor/t"], MAX_READ + 500);

    assert_eq!(read(&b, a.peer_id(), "m@1", "manifest", 2, 3).unwrap(), b"x\":");
    // A whole maximal read, then the last bytes of the item.
    assert_eq!(read(&b, a.peer_id(), "m@1", "tensor/t", 0, MAX_READ).unwrap(), &content[100..100 + MAX_READ as usize]);
    let tail = read(&b, a.peer_id(), "m@1", "tensor/t", MAX_READ, 500).unwrap();
    assert_eq!(tail, &content[100 + MAX_READ as usize..100 + MAX_READ as usize + 500]);

    let refused = |r: Result<Vec<u8>>, why: &str| {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(why), "{e} does not say {why:?}");
    };
    refused(read(&b, a.peer_id(), "m@1", "tensor/t", MAX_READ, 501), "past the end");
    refused(read(&b, a.peer_id(), "m@1", "tensor/t", u64::MAX, 2), "past the end");
    refused(read(&b, a.peer_id(), "m@1", "tensor/t", 0, MAX_READ + 1), "at most");
    refused(read(&b, a.peer_id(), "m@1", "tensor/u", 0, 1), "not served here");
    refused(read(&b, a.peer_id(), "m@2", "manifest", 0, 1), "not served here");
    refused(b.blob_request(a.peer_id(), vec![], b"nonsense".to_vec(), None), "not a blob request");
    refused(b.blob_request(a.peer_id(), vec![], br#"{"op":"read","model":"m@1"}"#.to_vec(), None), "needs");

    a.seeds().remove("m@1");
    refused(read(&b, a.peer_id(), "m@1", "manifest", 0, 1), "not served here");
    // The node still serves after every refusal.
    let listing = b.blob_request(a.peer_id(), vec![], br#"{"op":"list"}"#.to_vec(), None).unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&listing).unwrap()["models"], serde_json::json!({}));
}

#[test]
fn a_peer_over_its_request_rate_is_refused() {
    let limits = PeerLimits { requests_per_second: 5.0, ..PeerLimits::default() };
    let (_da, _db, a, b) = pair(limits);
    let mut items = BTreeMap::new();
    items.insert("x".to_string(), Blob::Bytes(Arc::from(&b"abc"[..])));
    a.seeds().set("m".to_string(), items);
    let outcomes: Vec<_> = (0..20).map(|_| read(&b, a.peer_id(), "m", "x", 0, 3)).collect();
    assert!(outcomes.iter().filter(|o| o.is_ok()).count() >= 5);
    let refused = outcomes.iter().filter_map(|o| o.as_ref().err()).collect::<Vec<_>>();
    assert!(!refused.is_empty(), "20 requests at once passed a 5-per-second limit");
    assert!(refused.iter().all(|e| e.to_string().contains("requests per second")), "{refused:?}");
}

#[test]
fn a_peer_that_leaves_its_answers_unread_holds_no_more_than_its_streams() {
    let (_da, _db, a, _b) = pair(PeerLimits::default());
    let big: Vec<u8> = vec![7u8; MAX_READ as usize];
    let mut items = BTreeMap::new();
    items.insert("big".to_string(), Blob::Bytes(Arc::from(&big[..])));
    a.seeds().set("m".to_string(), items);
    let raw = RawPeer::new(Transport::Tcp, a.peer_id(), &a.listen_addrs().unwrap()[0]);
    let request = serde_json::json!({"op": "read", "model": "m", "item": "big", "offset": 0, "len": MAX_READ}).to_string();
    let mut framed = (request.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(request.as_bytes());
    // Each stream's 4 MiB answer waits on this peer, which never reads it.
    let held: Vec<_> = (0..STREAMS_PER_PEER).map(|_| raw.blob_stream_with(a.peer_id(), &framed)).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut one_more = raw.blob_stream_with(a.peer_id(), &framed);
    let reply = raw.reply(&mut one_more, false);
    assert_eq!(reply.get(4), Some(&1u8), "the stream past the limit was served");
    let message = String::from_utf8_lossy(&reply[5..]);
    assert!(message.contains("blob streams open here"), "{message}");
    drop(held);
}

#[test]
fn garbage_on_blob_streams_is_refused_and_the_node_serves_on() {
    let limits = PeerLimits { stall_timeout: std::time::Duration::from_millis(500), ..PeerLimits::default() };
    let (_da, _db, a, b) = pair(limits);
    let mut items = BTreeMap::new();
    items.insert("x".to_string(), Blob::Bytes(Arc::from(&b"abc"[..])));
    a.seeds().set("m".to_string(), items);
    let raw = RawPeer::new(Transport::Tcp, a.peer_id(), &a.listen_addrs().unwrap()[0]);
    let mut rng = crate::test_rng::TestRng::new(7);
    for i in 0..300u32 {
        // Random lengths (most far over the limit), random bodies, bodies cut short.
        let len = match i % 3 {
            0 => rng.next_u64() as u32,
            1 => (rng.next_u64() % 64) as u32,
            _ => 16 << 10,
        };
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend((0..(rng.next_u64() % 200)).map(|_| rng.next_u64() as u8));
        let mut stream = raw.blob_stream_with(a.peer_id(), &bytes);
        let reply = raw.reply(&mut stream, true);
        // Either a refusal with its reason, or nothing (the stream closed on a cut body).
        assert!(reply.is_empty() || reply.get(4) == Some(&1u8), "garbage {i} was served: {reply:?}");
    }
    assert_eq!(read(&b, a.peer_id(), "m", "x", 0, 3).unwrap(), b"abc");
}
