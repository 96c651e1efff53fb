//! The blob protocol "/meshpy/blobs/1": a node serves byte ranges of the model files it holds
//! (a whole file, or the tensors a store holds of one), so another node fetches only what it
//! needs, from whoever has it. Python says what to serve ([`Seeds`]: per model id, named items,
//! each some bytes in memory or a range of an open file) and runs the fetching policy (which
//! peers, checking every tensor against the model's manifest: `meshpy.mesh.fetch`); this
//! module moves bytes and enforces limits.
//!
//! One request per stream: a u32 (little-endian) length and a JSON object, either
//! `{"op": "list"}` (every model served here, with each item's length) or `{"op": "read",
//! "model", "item", "offset", "len"}`. The answer is a u32 length, a status byte (0: the bytes
//! follow; 1: an error message follows, UTF-8), then the payload. Requests are at most
//! [`MAX_REQUEST`] bytes and reads at most [`MAX_READ`]; one peer may have [`STREAMS_PER_PEER`]
//! streams open at once, the node serves [`READS_IN_FLIGHT`] reads at once for all peers, and
//! requests per second and stalls are bounded by the node's [`super::PeerLimits`] (a fetch of
//! many small tensors sends hundreds of requests a second): blob streams are counted apart from
//! tensor streams, so a large download never crowds out inference.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};

use super::behaviour::InboundStreams;
use super::peers::PeerGate;
use super::streams::Opener;
use crate::error::{Error, Result};

/// The blob protocol's name.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshpy/blobs/1");
/// The most bytes one read may ask for: large enough that a fast link stays busy, small enough
/// that a lost answer costs little and many peers' reads fit in memory at once.
pub const MAX_READ: u64 = 4 << 20;
/// Blob streams one peer may have open at once: with reads of at most [`MAX_READ`], a peer
/// holds at most 64 MiB of this node's memory (a fetching node reads a few tensors at once).
pub const STREAMS_PER_PEER: usize = 16;
/// Reads in flight on one node, all peers together: at most 256 MiB of answers held at once,
/// however many peers ask (a read waits for a permit up to the stall timeout, then is refused).
pub const READS_IN_FLIGHT: usize = 64;
/// The most bytes of one request (a JSON object naming a range).
pub const MAX_REQUEST: usize = 16 << 10;
/// The most bytes of one answer: a read's bytes, or a list (names and lengths of every item
/// of every model served).
const MAX_ANSWER: usize = MAX_READ as usize + (4 << 20);

/// Environment variable that turns a node into a corrupting seeder for tests: every tensor
/// range it serves has one byte flipped. Read when the node starts; never set it outside tests.
pub const CORRUPT_ENV: &str = "MESHPY_TEST_CORRUPT_BLOBS";

const OK: u8 = 0;
const FAILED: u8 = 1;

/// Where one item's bytes come from.
pub enum Blob {
    /// Bytes held in memory (a manifest).
    Bytes(Arc<[u8]>),
    /// `len` bytes of an open file from `offset` (a tensor, a GGUF's metadata).
    File { file: Arc<File>, offset: u64, len: u64 },
}

impl Blob {
    /// The item's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Blob::Bytes(b) => b.len() as u64,
            Blob::File { len, .. } => *len,
        }
    }

    /// Whether the item is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` bytes from `offset`, which the caller checked lie within the item.
    fn read(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        match self {
            Blob::Bytes(b) => Ok(b[offset as usize..(offset + len) as usize].to_vec()),
            Blob::File { file, offset: base, .. } => {
                let mut out = vec![0u8; len as usize];
                file.read_exact_at(&mut out, base + offset)?;
                Ok(out)
            }
        }
    }
}

/// What a node serves: per model id, its items by name.
#[derive(Default)]
pub struct Seeds {
    models: RwLock<BTreeMap<String, BTreeMap<String, Arc<Blob>>>>,
}

impl Seeds {
    /// Serves `items` as model `model` from now on, replacing what was served under that id.
    pub fn set(&self, model: String, items: BTreeMap<String, Blob>) {
        let items = items.into_iter().map(|(name, blob)| (name, Arc::new(blob))).collect();
        self.models.write().unwrap_or_else(|e| e.into_inner()).insert(model, items);
    }

    /// Stops serving `model`.
    pub fn remove(&self, model: &str) {
        self.models.write().unwrap_or_else(|e| e.into_inner()).remove(model);
    }

    /// `{"models": {model id: {item: length}}}`.
    pub fn list(&self) -> serde_json::Value {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let listing: BTreeMap<&str, BTreeMap<&str, u64>> = models
            .iter()
            .map(|(model, items)| (model.as_str(), items.iter().map(|(name, blob)| (name.as_str(), blob.len())).collect()))
            .collect();
        serde_json::json!({ "models": listing })
    }

    fn get(&self, model: &str, item: &str) -> std::result::Result<Arc<Blob>, String> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let items = models.get(model).ok_or_else(|| format!("model {model:?} is not served here"))?;
        items.get(item).cloned().ok_or_else(|| format!("item {item:?} of model {model:?} is not served here"))
    }
}

/// A request (see the module documentation for its JSON).
enum Request {
    List,
    Read { model: String, item: String, offset: u64, len: u64 },
}

impl Request {
    fn parse(body: &[u8]) -> std::result::Result<Request, String> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not a blob request: {e}"))?;
        let field = |key: &str| value.get(key).ok_or_else(|| format!("a blob request needs {key:?}"));
        let text = |key: &str| field(key)?.as_str().map(str::to_string).ok_or_else(|| format!("{key:?} must be a string"));
        let number = |key: &str| field(key)?.as_u64().ok_or_else(|| format!("{key:?} must be a whole number"));
        match value.get("op").and_then(|op| op.as_str()) {
            Some("list") => Ok(Request::List),
            Some("read") => Ok(Request::Read { model: text("model")?, item: text("item")?, offset: number("offset")?, len: number("len")? }),
            _ => Err("a blob request's \"op\" must be \"list\" or \"read\"".to_string()),
        }
    }
}

/// Accepts inbound blob streams and answers each on a task of its own.
pub(crate) async fn serve(mut incoming: InboundStreams, seeds: Arc<Seeds>, gate: Arc<PeerGate>) {
    let reads = Arc::new(Semaphore::new(READS_IN_FLIGHT));
    let corrupt = std::env::var_os(CORRUPT_ENV).is_some_and(|v| !v.is_empty());
    if corrupt {
        tracing::warn!("{CORRUPT_ENV} is set: this node flips a byte of every tensor range it serves (a test adversary)");
    }
    while let Some((peer, stream)) = incoming.next().await {
        let (seeds, gate, reads) = (Arc::clone(&seeds), Arc::clone(&gate), Arc::clone(&reads));
        tokio::spawn(async move { serve_stream(peer, stream, seeds, gate, reads, corrupt).await });
    }
}

async fn serve_stream(peer: PeerId, mut stream: Stream, seeds: Arc<Seeds>, gate: Arc<PeerGate>, reads: Arc<Semaphore>, corrupt: bool) {
    // The slot and the read permit are held until the answer is written: a peer that never
    // reads its answers holds at most its streams' worth of this node's memory.
    let slot = gate.open_stream(peer);
    let mut permit = None;
    let answer = match &slot {
        Err(refusal) => Err(refusal.message.clone()),
        Ok(_) => answer(peer, &mut stream, &seeds, &gate, &reads, &mut permit).await,
    };
    let answer = answer.map(|(mut bytes, tensor)| {
        if corrupt && tensor && !bytes.is_empty() {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x5a;
        }
        bytes
    });
    if let Err(why) = &answer {
        tracing::debug!(%peer, "blob request refused: {why}");
    }
    let (status, payload) = match answer {
        Ok(bytes) => (OK, bytes),
        Err(why) => (FAILED, why.into_bytes()),
    };
    let stall = gate.limits().stall_timeout;
    let sent = tokio::time::timeout(stall + Duration::from_secs(MAX_READ >> 16), async {
        write_message(&mut stream, &[&[status], &payload[..]]).await?;
        stream.close().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!(%peer, "a blob answer could not be delivered");
    }
    drop((slot, permit));
}

/// The answer to the one request `stream` carries (and whether it is a tensor's bytes), or why
/// there is none. A read takes one of the node's read permits into `permit` first.
async fn answer(
    peer: PeerId,
    stream: &mut Stream,
    seeds: &Seeds,
    gate: &PeerGate,
    reads: &Arc<Semaphore>,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> std::result::Result<(Vec<u8>, bool), String> {
    let stall = gate.limits().stall_timeout;
    let body = tokio::time::timeout(stall, read_message(stream, MAX_REQUEST))
        .await
        .map_err(|_| format!("no whole request within {} s", stall.as_secs_f64()))?
        .map_err(|e| format!("cannot read the request: {e}"))?;
    gate.admit_request(peer).map_err(|refusal| refusal.message)?;
    match Request::parse(&body)? {
        Request::List => Ok((seeds.list().to_string().into_bytes(), false)),
        Request::Read { model, item, offset, len } => {
            if len > MAX_READ {
                return Err(format!("a read may ask for at most {MAX_READ} bytes, not {len}"));
            }
            let blob = seeds.get(&model, &item)?;
            *permit = Some(
                tokio::time::timeout(gate.limits().stall_timeout, Arc::clone(reads).acquire_owned())
                    .await
                    .map_err(|_| "this node is busy serving other reads; try another seeder".to_string())?
                    .map_err(|_| "the node is shutting down".to_string())?,
            );
            if offset.checked_add(len).is_none_or(|end| end > blob.len()) {
                return Err(format!("bytes {offset}..+{len} are past the end of {item:?} ({} bytes)", blob.len()));
            }
            let bytes = tokio::task::spawn_blocking(move || blob.read(offset, len))
                .await
                .map_err(|e| format!("the read failed: {e}"))?
                .map_err(|e| format!("cannot read {item:?}: {e}"))?;
            Ok((bytes, item.starts_with("tensor/")))
        }
    }
}

/// Sends `body` (a JSON request) to `peer` on a new blob stream and returns the answer's
/// payload; a peer's refusal is [`Error::Network`] with its reason.
pub(crate) async fn request(opener: Opener, peer: PeerId, addrs: Vec<Multiaddr>, body: Vec<u8>) -> Result<Vec<u8>> {
    let mut stream = opener.open(peer, addrs).await.map_err(|e| Error::Network(format!("cannot open a blob stream to {peer}: {e}")))?;
    let io = |e: std::io::Error| Error::Network(format!("blob request to {peer}: {e}"));
    write_message(&mut stream, &[&body]).await.map_err(io)?;
    let mut answer = read_message(&mut stream, MAX_ANSWER).await.map_err(io)?;
    match answer.first() {
        Some(&OK) => {
            answer.remove(0);
            Ok(answer)
        }
        Some(&FAILED) => Err(Error::Network(format!("{peer} refused a blob request: {}", String::from_utf8_lossy(&answer[1..])))),
        _ => Err(Error::Frame(format!("{peer} sent a blob answer with no valid status byte"))),
    }
}

async fn write_message<T: AsyncWrite + Unpin>(io: &mut T, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| std::io::Error::other("message too long"))?;
    io.write_all(&len.to_le_bytes()).await?;
    for part in parts {
        io.write_all(part).await?;
    }
    io.flush().await
}

async fn read_message<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a {len}-byte message; at most {max} are allowed")));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}
