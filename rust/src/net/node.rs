//! The running node: a tokio runtime of its own driving the swarm in one event loop, and the
//! blocking [`NodeHandle`] other threads use. Each call is a [`Command`] over a channel with a
//! one-slot reply channel for the answer; the loop owns the swarm and every pending query, dial and request.

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::{self, QueryId, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, ListenError, SwarmEvent};
use libp2p::swarm::dial_opts::PeerCondition;
use libp2p::{autonat, dcutr, identify, mdns, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc;

use super::behaviour::{build_swarm, MeshBehaviour, MeshBehaviourEvent, KAD_PROTOCOL};
use super::info::{JsonObject, NodeInfo};
use super::blobs::{self, Seeds};
use super::relay::Outbox;
use super::tensor::{self, HandlerSlot, Server, StreamPool};
use super::streams::Opener;
use super::{identity, FrameHandler, NodeConfig, Transport};
use crate::error::{Error, Result};
use crate::wire::Message;

/// Providers of a key: each peer with the addresses known for it.
pub type Providers = Vec<(PeerId, Vec<Multiaddr>)>;

/// Whether a connection's failure says the peer went silent or away (a QUIC idle timeout, a
/// TCP reset or timeout), as opposed to closing the connection cleanly.
fn went_silent(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, TimedOut};
    matches!(e.kind(), TimedOut | ConnectionReset | ConnectionAborted | BrokenPipe)
        // QUIC's errors come wrapped in an `Other` I/O error; quinn names the timeout.
        || format!("{e:?}").contains("TimedOut")
}

/// Where the loop sends one answer: a channel of capacity one, so sending never blocks the
/// loop and the caller waits with a plain timeout, independent of the runtime (which may be
/// gone by then).
type Reply<T> = std::sync::mpsc::SyncSender<T>;

/// What a handle asks of the event loop.
enum Command {
    ListenAddrs(Reply<Vec<Multiaddr>>),
    ConnectedPeers(Reply<Vec<PeerId>>),
    Dial(Multiaddr, Reply<Result<PeerId>>),
    Bootstrap(Reply<Result<()>>),
    StartProviding(Vec<u8>, Reply<Result<()>>),
    StopProviding(Vec<u8>, Reply<()>),
    /// Unexpired provider records of a key in this node's own store (tests look at what a
    /// third node holds, which a lookup cannot tell apart from what providers say of
    /// themselves).
    #[cfg(test)]
    StoredProviders(Vec<u8>, Reply<Vec<PeerId>>),
    GetProviders(Vec<u8>, Reply<Result<Providers>>),
    GetProvidersMany(Vec<Vec<u8>>, Reply<Result<Vec<Providers>>>),
    Request { peer: PeerId, frame: Vec<u8>, timeout: Duration, reply: Reply<Result<Vec<u8>>> },
    Blob { peer: PeerId, addrs: Vec<Multiaddr>, body: Vec<u8>, timeout: Duration, reply: Reply<Result<Vec<u8>>> },
    Connections(Reply<Vec<Connection>>),
    Reachability(Reply<Reachability>),
    Shutdown,
}

/// One open connection: to whom, at which address, and whether through a relay.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The peer at the other end.
    pub peer: PeerId,
    /// Its address as this connection sees it (a `/p2p-circuit` one when relayed).
    pub addr: Multiaddr,
    /// Whether the connection runs through a relay (else direct, maybe hole punched).
    pub relayed: bool,
    /// Whether this node dialed it (else the peer did).
    pub outbound: bool,
}

/// Whether others can reach this node, as AutoNAT's probes (peers dialing it back) tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// Not probed yet (no peer to probe with, or no answer yet).
    Unknown,
    /// Peers reached this node directly.
    Public,
    /// Peers could not: behind a NAT or firewall. With `relays`, reachable through those.
    Private {
        /// Relays holding a slot for this node.
        relays: Vec<PeerId>,
    },
}

impl Reachability {
    /// "public", "private" or "unknown" (as `Info` says it).
    pub fn name(&self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private { .. } => "private",
        }
    }
}

/// A cheap, cloneable way to drive a node from any thread. Every call blocks the calling
/// thread (never the node's runtime) until the loop answers or the call times out.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::UnboundedSender<Command>,
    peer_id: PeerId,
    handler: HandlerSlot,
    info: Arc<NodeInfo>,
    seeds: Arc<Seeds>,
    limits: crate::wire::Limits,
    streams: Arc<std::sync::atomic::AtomicUsize>,
    request_timeout: Duration,
    query_timeout: Duration,
}

/// A libp2p node: identity, listeners, DHT, tensor protocol, driven by one dedicated thread
/// running a current-thread tokio runtime (one thread keeps a request's hops off other cores'
/// run queues; handlers run on the runtime's blocking pool). Dereferences to its
/// [`NodeHandle`]; dropping it shuts it down.
pub struct Node {
    handle: NodeHandle,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Deref for Node {
    type Target = NodeHandle;

    fn deref(&self) -> &NodeHandle {
        &self.handle
    }
}

impl Node {
    /// Loads (or creates) the identity in `config.node_dir`, opens the listeners and waits until
    /// each reports its address (so [`NodeHandle::listen_addrs`] shows the real ports), dials
    /// the bootstrap peers and starts a DHT bootstrap in the background.
    pub fn start(mut config: NodeConfig) -> Result<Node> {
        if let Some(key) = &config.network_key {
            match config.transport {
                Transport::Quic => {
                    return Err(Error::InvalidArgument(
                        "a network key protects TCP connections only: QUIC runs its own TLS handshake, which libp2p's \
                         private-network layer cannot wrap, so a keyed node uses TCP (--transport tcp)"
                            .to_string(),
                    ))
                }
                Transport::Both => {
                    tracing::info!("network key {}: listening on TCP only (QUIC cannot carry the key)", key.fingerprint());
                    config.transport = Transport::Tcp;
                }
                Transport::Tcp => tracing::info!("network key {}: only nodes holding it can connect", key.fingerprint()),
            }
        }
        let keypair = identity::load_or_create(&config.node_dir)?;
        let peer_id = keypair.public().to_peer_id();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(64)
            .thread_name("meshpy-net-blocking")
            .enable_all()
            .build()
            .map_err(|e| Error::Network(format!("cannot start the node's runtime: {e}")))?;
        let handler: HandlerSlot = Arc::new(RwLock::new(config.handler.clone()));
        let info = Arc::new(NodeInfo::new(peer_id, config.info.clone()));
        let streams = Arc::default();
        let seeds = Arc::new(Seeds::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let state = runtime.block_on(async {
            let (mut swarm, [(opener, incoming), (blob_opener, blob_incoming)]) = build_swarm(keypair, &config)?;
            let listen_addrs = listen(&mut swarm, &config).await?;
            info.set_listen_addrs(&listen_addrs);
            let pool = StreamPool::new(opener, config.limits, config.emulated_rtt, Arc::clone(&info.traffic));
            let outbox = Arc::new(Outbox::default());
            let server = Server {
                handler: Arc::clone(&handler),
                limits: config.limits,
                gate: Arc::new(super::peers::PeerGate::new(config.peer_limits, "tensor")),
                info: Arc::clone(&info),
                streams: Arc::clone(&streams),
                pool: pool.clone(),
                request_timeout: config.request_timeout,
                outbox: Arc::clone(&outbox),
            };
            tokio::spawn(tensor::serve(incoming, server));
            let blob_limits = super::PeerLimits { max_streams: blobs::STREAMS_PER_PEER, ..config.peer_limits };
            let blob_gate = Arc::new(super::peers::PeerGate::new(blob_limits, "blob"));
            tokio::spawn(blobs::serve(blob_incoming, Arc::clone(&seeds), blob_gate));
            tokio::spawn(tensor::maintain(Arc::clone(&handler), outbox, Duration::from_secs(1)));
            if config.relay_server {
                // A relay is a node others can reach, as its operator says by running one; a
                // relay advertises its service only with a confirmed address, which probes by
                // the first peers would otherwise take seconds to give it.
                for addr in listen_addrs.iter().filter(|a| !is_loopback(a)) {
                    swarm.add_external_address(addr.clone());
                }
            }
            let mut state = Loop::new(swarm, pool, blob_opener, listen_addrs, Arc::clone(&info), config.network_key.is_some(), config.dht_server);
            for addr in &config.bootstrap {
                state.add_bootstrap_peer(addr)?;
            }
            if !config.bootstrap.is_empty() {
                // The first bootstrap runs in the background; `bootstrap()` waits for one.
                let _ = state.swarm.behaviour_mut().kad.bootstrap();
            }
            Ok::<_, Error>(state)
        })?;
        let handle = NodeHandle {
            commands: tx,
            peer_id,
            handler,
            info,
            seeds,
            limits: config.limits,
            streams,
            request_timeout: config.request_timeout,
            query_timeout: config.query_timeout,
        };
        if !config.emulated_rtt.is_zero() {
            tracing::warn!("emulating a {:?} round trip on every request this node sends (tests and benchmarks only)", config.emulated_rtt);
        }
        let thread = std::thread::Builder::new()
            .name("meshpy-net".to_string())
            .spawn(move || {
                runtime.block_on(state.run(rx));
                // In-flight handler calls get a few seconds to finish.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .map_err(|e| Error::Network(format!("cannot start the node's thread: {e}")))?;
        tracing::info!(%peer_id, "node started");
        Ok(Node { handle, thread: Mutex::new(Some(thread)) })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the node: closes the listeners and connections, ends the event loop, shuts the
    /// runtime down and joins its thread. Later calls on any handle fail with a network error.
    /// Idempotent.
    pub fn shutdown(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(thread) = thread else { return };
        let _ = self.handle.commands.send(Command::Shutdown);
        if thread.join().is_err() {
            tracing::error!("the node's thread panicked");
        }
        tracing::info!(peer_id = %self.handle.peer_id, "node stopped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Opens the configured listeners and waits for their first addresses.
async fn listen(swarm: &mut Swarm<MeshBehaviour>, config: &NodeConfig) -> Result<Vec<Multiaddr>> {
    let host = match config.listen_host {
        std::net::IpAddr::V4(ip) => Protocol::Ip4(ip),
        std::net::IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    let mut wanted = Vec::new();
    if matches!(config.transport, Transport::Tcp | Transport::Both) {
        wanted.push(Multiaddr::empty().with(host.clone()).with(Protocol::Tcp(config.port)));
    }
    if matches!(config.transport, Transport::Quic | Transport::Both) {
        wanted.push(Multiaddr::empty().with(host).with(Protocol::Udp(config.port)).with(Protocol::QuicV1));
    }
    let mut pending = HashSet::new();
    for addr in wanted {
        let id = swarm.listen_on(addr.clone()).map_err(|e| Error::Network(format!("cannot listen on {addr}: {e}")))?;
        pending.insert(id);
    }
    let mut addrs = Vec::new();
    let wait = async {
        while !pending.is_empty() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    pending.remove(&listener_id);
                    addrs.push(address);
                }
                SwarmEvent::ListenerClosed { reason: Err(e), .. } | SwarmEvent::ListenerError { error: e, .. } => {
                    return Err(Error::Network(format!("listener failed: {e}")));
                }
                _ => {}
            }
        }
        Ok(())
    };
    tokio::time::timeout(config.query_timeout, wait)
        .await
        .map_err(|_| Error::Timeout("the listeners reported no address".to_string()))??;
    Ok(addrs)
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Addresses the node listens on, each ending in `/p2p/<peer id>` (what others pass as
    /// bootstrap addresses).
    pub fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.call(Command::ListenAddrs, self.query_timeout, "listen_addrs")
    }

    /// Peers with an open connection.
    pub fn connected_peers(&self) -> Result<Vec<PeerId>> {
        self.call(Command::ConnectedPeers, self.query_timeout, "connected_peers")
    }

    /// Connects to `addr` and returns the peer's id once the connection is up; the address is
    /// remembered for the peer (and added to the DHT routing table when it names the peer).
    pub fn dial(&self, addr: Multiaddr) -> Result<PeerId> {
        self.call(|tx| Command::Dial(addr, tx), self.query_timeout, "dial")?
    }

    /// Runs a Kademlia bootstrap (a lookup of our own id, filling the routing table) and waits
    /// for it to finish. Fails when no peer is known.
    pub fn bootstrap(&self) -> Result<()> {
        self.call(Command::Bootstrap, self.query_timeout * 2, "bootstrap")?
    }

    /// Announces this node as a provider of `key` (kept in the local store and sent to the
    /// peers closest to the key) and waits for the announcement to finish.
    pub fn start_providing(&self, key: &[u8]) -> Result<()> {
        self.call(|tx| Command::StartProviding(key.to_vec(), tx), self.query_timeout * 2, "start_providing")?
    }

    /// Stops announcing this node as a provider of `key` (before a clean shutdown, or when
    /// it stops serving a layer): the local record goes at once, so the node no longer lists
    /// itself nor re-announces it; the copies other nodes hold expire within the provider TTL.
    pub fn stop_providing(&self, key: &[u8]) -> Result<()> {
        self.call(|tx| Command::StopProviding(key.to_vec(), tx), self.query_timeout, "stop_providing")
    }

    /// See [`Command::StoredProviders`].
    #[cfg(test)]
    pub(crate) fn stored_providers(&self, key: &[u8]) -> Result<Vec<PeerId>> {
        self.call(|tx| Command::StoredProviders(key.to_vec(), tx), self.query_timeout, "stored_providers")
    }

    /// Every provider of `key` the DHT knows of (this node included when it provides it), with
    /// the addresses known for each; an empty list when there is none.
    pub fn get_providers(&self, key: &[u8]) -> Result<Providers> {
        self.call(|tx| Command::GetProviders(key.to_vec(), tx), self.query_timeout * 2, "get_providers")?
    }

    /// [`get_providers`](Self::get_providers) of every key at once: all the lookups run
    /// concurrently and the answer comes when the last finishes, in key order. Fails (with the
    /// keys named) if any lookup failed without finding a provider, like a single lookup.
    pub fn get_providers_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Providers>> {
        self.call(|tx| Command::GetProvidersMany(keys, tx), self.query_timeout * 2, "get_providers_many")?
    }

    /// Sends `frame` to `peer` (dialing it if needed, from addresses learned through the DHT,
    /// identify or [`dial`](Self::dial)) and returns the response frame. `timeout` defaults to
    /// the node's request timeout; no answer within it is [`Error::Timeout`], a lost connection
    /// or a refused stream [`Error::Network`]. An `Error` frame is a successful answer here: the
    /// caller decodes it.
    pub fn request(&self, peer: PeerId, frame: Vec<u8>, timeout: Option<Duration>) -> Result<Vec<u8>> {
        self.start_request(peer, frame, timeout)?.wait()
    }

    /// [`request`](Self::request) without waiting: the request is under way when this
    /// returns, and [`Pending::wait`] gives its answer. Several started together travel
    /// together.
    pub fn start_request(&self, peer: PeerId, frame: Vec<u8>, timeout: Option<Duration>) -> Result<Pending> {
        let timeout = timeout.unwrap_or(self.request_timeout);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.commands.send(Command::Request { peer, frame, timeout, reply: tx }).map_err(|_| stopped())?;
        // The loop's task gives up at `timeout` too, so no stream waits forever; the margin
        // lets its own error (more precise) arrive first.
        Ok(Pending { rx, deadline: std::time::Instant::now() + timeout + Duration::from_millis(200) })
    }

    /// What this node serves over the blob protocol (see `blobs`); set it through this.
    pub fn seeds(&self) -> &Seeds {
        &self.seeds
    }

    /// Sends a blob request (`body`, a JSON object; see `blobs`) to `peer` on a stream of its
    /// own, dialing `addrs` too if no connection is up, and returns the answer's payload. A
    /// peer's refusal is [`Error::Network`] with the peer's reason.
    pub fn blob_request(&self, peer: PeerId, addrs: Vec<Multiaddr>, body: Vec<u8>, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let timeout = timeout.unwrap_or(self.request_timeout);
        let wait = timeout + Duration::from_millis(200);
        self.call(|reply| Command::Blob { peer, addrs, body, timeout, reply }, wait, "blob request")?
    }

    /// Asks `peer` to describe itself (an `Info` request) and returns its answer, a JSON
    /// object (see the `info` module for the keys). An `Error` frame in answer is
    /// [`Error::Network`], an answer that is not an `InfoReply` [`Error::Frame`].
    pub fn info(&self, peer: PeerId, timeout: Option<Duration>) -> Result<serde_json::Value> {
        let reply = self.request(peer, Message::Info.encode()?, timeout)?;
        match Message::decode(&reply, &self.limits)? {
            Message::InfoReply(json) => serde_json::from_str(&json)
                .map_err(|e| Error::Frame(format!("info reply from {peer}: {e}"))),
            Message::Error(e) => Err(Error::Network(format!("{peer} answered info with {}: {}", e.code, e.message))),
            other => Err(Error::Frame(format!("{peer} answered info with a {} frame", other.kind()))),
        }
    }

    /// Sets (or clears) the handler of inbound tensor requests. Requests already running
    /// finish on the old one; the old handler's sessions go with it.
    pub fn set_handler(&self, handler: Option<Arc<dyn FrameHandler>>) {
        *self.handler.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    /// Merges `fields` into the static part of this node's `Info` replies.
    pub fn set_info(&self, fields: JsonObject) {
        self.info.update(fields);
    }

    /// What this node answers to `Info` now (see the `info` module for the keys).
    pub fn describe(&self) -> serde_json::Value {
        self.info.describe(self.handler().as_deref())
    }

    /// The handler serving now, if any.
    fn handler(&self) -> Option<Arc<dyn FrameHandler>> {
        self.handler.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Inbound tensor streams being served now (idle pooled streams of requesters included).
    pub fn inbound_streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long a request may take unless its call says otherwise.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The frame limits the node was started with.
    pub fn limits(&self) -> crate::wire::Limits {
        self.limits
    }

    /// Tells the handler to take no new sessions (see [`FrameHandler::drain`]).
    pub fn drain(&self) {
        if let Some(h) = self.handler() {
            h.drain();
        }
    }

    /// Hands the handler's sessions to other workers of their layers (see
    /// [`FrameHandler::hand_over`]), each transfer a request of at most `timeout`. Blocks.
    pub fn hand_over(&self, targets: &[(PeerId, crate::wire::Span)], timeout: Option<Duration>) -> Vec<super::Handed> {
        self.handler().map_or_else(Vec::new, |h| h.hand_over(targets, &|peer, frame| self.request(peer, frame, timeout)))
    }

    /// Sessions handed over whose End node does not yet know (see [`FrameHandler::moves_untold`]).
    pub fn moves_untold(&self) -> usize {
        self.handler().map_or(0, |h| h.moves_untold())
    }

    /// Every open connection of this node (see [`Connection`]).
    pub fn connections(&self) -> Result<Vec<Connection>> {
        self.call(Command::Connections, self.query_timeout, "connections")
    }

    /// Whether others can reach this node, and through which relays if not directly.
    pub fn reachability(&self) -> Result<Reachability> {
        self.call(Command::Reachability, self.query_timeout, "reachability")
    }

    /// Sessions the handler holds (0 without a handler).
    pub fn session_count(&self) -> usize {
        self.handler().map_or(0, |h| h.session_count())
    }

    /// Sends a command and waits at most `timeout` for its answer.
    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command, timeout: Duration, what: &str) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.commands.send(make(tx)).map_err(|_| stopped())?;
        match rx.recv_timeout(timeout) {
            Ok(value) => Ok(value),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(Error::Timeout(format!("{what} got no answer within {:.3} s", timeout.as_secs_f64())))
            }
        }
    }
}

/// A request under way (see [`NodeHandle::start_request`]).
pub struct Pending {
    rx: std::sync::mpsc::Receiver<Result<Vec<u8>>>,
    deadline: std::time::Instant,
}

impl Pending {
    /// Blocks until the answer comes (or the request times out).
    pub fn wait(self) -> Result<Vec<u8>> {
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(answer) => answer,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout("request got no answer in time".to_string())),
        }
    }
}

fn stopped() -> Error {
    Error::Network("the node is shut down".to_string())
}

/// Whether `addr` is a loopback one (127.0.0.0/8, ::1).
fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// `addr` without a trailing `/p2p/<id>`, and that id.
fn split_peer(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => (base, Some(peer)),
        _ => (addr.clone(), None),
    }
}

/// Where a provider lookup's answer goes.
enum LookupReply {
    /// A caller waiting for this lookup alone.
    One(Reply<Result<Providers>>),
    /// Slot `index` of batch `batch` (see [`Batch`]).
    Batch { batch: u64, index: usize },
}

/// Concurrent provider lookups answered together.
struct Batch {
    keys: Vec<Vec<u8>>,
    results: Vec<Providers>,
    remaining: usize,
    /// Lookups that failed without finding anyone: key index and why.
    failed: Vec<(usize, Error)>,
    reply: Reply<Result<Vec<Providers>>>,
}

/// The event loop's state: the swarm and what each pending call waits for.
struct Loop {
    swarm: Swarm<MeshBehaviour>,
    pool: StreamPool,
    blob_opener: Opener,
    listen_addrs: Vec<Multiaddr>,
    /// Where `Info` replies read the listen addresses.
    info: Arc<NodeInfo>,
    /// Addresses learned per peer (identify, dials, provider lookups).
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    dials: HashMap<ConnectionId, Reply<Result<PeerId>>>,
    bootstraps: HashMap<QueryId, Reply<Result<()>>>,
    provides: HashMap<QueryId, Reply<Result<()>>>,
    lookups: HashMap<QueryId, (HashSet<PeerId>, LookupReply)>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    /// Whether the mesh is keyed (refused connections are then said to be about the key).
    keyed: bool,
    /// Whether this node serves the DHT ([`NodeConfig::dht_server`]).
    dht_server: bool,
    /// Open connections, for [`NodeHandle::connections`].
    connections: HashMap<ConnectionId, Connection>,
    /// Peers that run a relay (identify lists the relay's hop protocol), with the address
    /// this node reached each at.
    relay_peers: HashMap<PeerId, Multiaddr>,
    /// Relays this node asked for a slot, and whether the slot is held.
    reservations: HashMap<PeerId, bool>,
    /// What AutoNAT last decided.
    nat: autonat::NatStatus,
}

impl Loop {
    fn new(
        swarm: Swarm<MeshBehaviour>,
        pool: StreamPool,
        blob_opener: Opener,
        listen_addrs: Vec<Multiaddr>,
        info: Arc<NodeInfo>,
        keyed: bool,
        dht_server: bool,
    ) -> Self {
        Loop {
            swarm,
            pool,
            blob_opener,
            listen_addrs,
            info,
            addresses: HashMap::new(),
            dials: HashMap::new(),
            bootstraps: HashMap::new(),
            provides: HashMap::new(),
            lookups: HashMap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            keyed,
            dht_server,
            connections: HashMap::new(),
            relay_peers: HashMap::new(),
            reservations: HashMap::new(),
            nat: autonat::NatStatus::Unknown,
        }
    }

    /// Relays a node behind a NAT reserves a slot on (more than one keeps it reachable when
    /// one leaves).
    const RELAYS_WANTED: usize = 2;

    /// When this node cannot be reached directly, asks known relays for a slot (up to
    /// [`Self::RELAYS_WANTED`]): it then listens at `<relay>/p2p-circuit`, an address peers
    /// learn through identify and the DHT.
    fn reserve_relays(&mut self) {
        if self.nat != autonat::NatStatus::Private {
            return;
        }
        let candidates: Vec<(PeerId, Multiaddr)> =
            self.relay_peers.iter().filter(|(p, _)| !self.reservations.contains_key(*p)).map(|(p, a)| (*p, a.clone())).collect();
        for (relay, addr) in candidates {
            if self.reservations.len() >= Self::RELAYS_WANTED {
                break;
            }
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => {
                    tracing::info!(%relay, "not reachable directly: asking relay {relay} for a slot");
                    self.reservations.insert(relay, false);
                }
                Err(e) => tracing::warn!(%circuit, "cannot listen through relay: {e}"),
            }
        }
    }

    /// What [`NodeHandle::reachability`] answers.
    fn reachability(&self) -> Reachability {
        match self.nat {
            autonat::NatStatus::Unknown => Reachability::Unknown,
            autonat::NatStatus::Public(_) => Reachability::Public,
            autonat::NatStatus::Private => Reachability::Private {
                relays: self.reservations.iter().filter(|(_, held)| **held).map(|(p, _)| *p).collect(),
            },
        }
    }

    /// Puts reachability in `Info` (`"reachability"`, `"relayed_through"`).
    fn publish_reachability(&self) {
        let r = self.reachability();
        let mut fields = JsonObject::new();
        fields.insert("reachability".into(), r.name().into());
        let relays = match &r {
            Reachability::Private { relays } => relays.iter().map(|p| serde_json::Value::from(p.to_string())).collect(),
            _ => Vec::new(),
        };
        fields.insert("relayed_through".into(), relays.into());
        self.info.update(fields);
    }

    /// Adds a bootstrap address (which must name its peer) to the routing table and dials it.
    fn add_bootstrap_peer(&mut self, addr: &Multiaddr) -> Result<()> {
        let (base, peer) = split_peer(addr);
        let peer = peer.ok_or_else(|| {
            Error::InvalidArgument(format!("bootstrap address {addr} must end in /p2p/<peer id>"))
        })?;
        self.learn(peer, base, true);
        if let Err(e) = self.swarm.dial(addr.clone()) {
            tracing::warn!(%addr, "cannot dial bootstrap peer: {e}");
        }
        Ok(())
    }

    /// Starts announcing `key`. A node that does not serve the DHT is in nobody's routing
    /// table, and a record without addresses for such a node is never handed out, so its
    /// records carry its listen addresses (while it knows no external one).
    fn provide(&mut self, key: Vec<u8>) -> std::result::Result<QueryId, kad::store::Error> {
        if !self.dht_server && self.swarm.external_addresses().next().is_none() {
            for addr in self.listen_addrs.clone() {
                self.swarm.add_external_address(addr);
            }
        }
        self.swarm.behaviour_mut().kad.start_providing(key.into())
    }

    /// Remembers an address of `peer` for the swarm (dialing), the DHT and provider answers.
    fn learn(&mut self, peer: PeerId, addr: Multiaddr, dht_server: bool) {
        if peer == *self.swarm.local_peer_id() {
            return;
        }
        let known = self.addresses.entry(peer).or_default();
        if !known.contains(&addr) {
            known.push(addr.clone());
            self.swarm.add_peer_address(peer, addr.clone());
        }
        // Only peers serving the DHT go in the routing table: a client that has left would
        // otherwise stay there, and every query would wait on it (over QUIC, a whole timeout).
        if dht_server {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(command) => self.on_command(command),
                },
                event = self.swarm.select_next_some() => self.on_event(event),
            }
        }
        let listeners: Vec<_> = self.swarm.listeners().cloned().collect();
        tracing::debug!(?listeners, "closing listeners");
        self.pool.clear();
        // Dropping the swarm closes every listener and connection; pending callers see their
        // reply channel dropped and report the node as shut down.
    }

    fn on_command(&mut self, command: Command) {
        let local = *self.swarm.local_peer_id();
        match command {
            Command::ListenAddrs(tx) => {
                let addrs = self.listen_addrs.iter().map(|a| a.clone().with(Protocol::P2p(local))).collect();
                let _ = tx.send(addrs);
            }
            Command::ConnectedPeers(tx) => {
                let _ = tx.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Dial(addr, tx) => {
                let (base, peer) = split_peer(&addr);
                if let Some(peer) = peer {
                    self.learn(peer, base, true);
                }
                let opts = DialOpts::from(addr.clone());
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, tx);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Error::Network(format!("cannot dial {addr}: {e}"))));
                    }
                }
            }
            Command::Bootstrap(tx) => match self.swarm.behaviour_mut().kad.bootstrap() {
                Ok(id) => {
                    self.bootstraps.insert(id, tx);
                }
                Err(_) => {
                    let _ = tx.send(Err(Error::Network("cannot bootstrap: no known peers".to_string())));
                }
            },
            Command::StartProviding(key, tx) => match self.provide(key) {
                Ok(id) => {
                    self.provides.insert(id, tx);
                }
                Err(e) => {
                    let _ = tx.send(Err(Error::Network(format!("cannot store the provider record: {e}"))));
                }
            },
            Command::StopProviding(key, tx) => {
                self.swarm.behaviour_mut().kad.stop_providing(&key.into());
                let _ = tx.send(());
            }
            #[cfg(test)]
            Command::StoredProviders(key, tx) => {
                use libp2p::kad::store::RecordStore;
                let now = std::time::Instant::now();
                let records = self.swarm.behaviour_mut().kad.store_mut().providers(&key.into());
                let _ = tx.send(records.into_iter().filter(|r| !r.is_expired(now)).map(|r| r.provider).collect());
            }
            Command::GetProviders(key, tx) => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key.into());
                self.lookups.insert(id, (HashSet::new(), LookupReply::One(tx)));
            }
            Command::GetProvidersMany(keys, tx) => {
                if keys.is_empty() {
                    let _ = tx.send(Ok(Vec::new()));
                    return;
                }
                let batch = self.next_batch;
                self.next_batch += 1;
                for (index, key) in keys.iter().enumerate() {
                    let id = self.swarm.behaviour_mut().kad.get_providers(key.clone().into());
                    self.lookups.insert(id, (HashSet::new(), LookupReply::Batch { batch, index }));
                }
                let n = keys.len();
                self.batches.insert(
                    batch,
                    Batch { keys, results: vec![Vec::new(); n], remaining: n, failed: Vec::new(), reply: tx },
                );
            }
            Command::Request { peer, frame, timeout, reply } => {
                let pool = self.pool.clone();
                tokio::spawn(async move {
                    let answer = tokio::time::timeout(timeout, pool.request(peer, frame)).await.unwrap_or_else(|_| {
                        Err(Error::Timeout(format!("request to {peer}: no answer within {:.3} s", timeout.as_secs_f64())))
                    });
                    let _ = reply.send(answer);
                });
            }
            Command::Connections(tx) => {
                let _ = tx.send(self.connections.values().cloned().collect());
            }
            Command::Reachability(tx) => {
                let _ = tx.send(self.reachability());
            }
            Command::Blob { peer, addrs, body, timeout, reply } => {
                let opener = self.blob_opener.clone();
                tokio::spawn(async move {
                    let answer = tokio::time::timeout(timeout, blobs::request(opener, peer, addrs, body)).await.unwrap_or_else(|_| {
                        Err(Error::Timeout(format!("blob request to {peer}: no answer within {:.3} s", timeout.as_secs_f64())))
                    });
                    let _ = reply.send(answer);
                });
            }
            Command::Shutdown => {}
        }
    }

    fn on_event(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(MeshBehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Mdns(mdns::Event::Discovered(found))) => self.on_lan_peers(found),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Identify(identify::Event::Received { connection_id, peer_id, info })) => {
                let dht_server = info.protocols.contains(&KAD_PROTOCOL);
                // A peer's loopback addresses are its own machine's: worth dialing only when
                // it is on this machine too (reached over loopback).
                let same_machine = self.connections.get(&connection_id).is_some_and(|c| is_loopback(&c.addr));
                let addrs: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(|a| same_machine || !is_loopback(a)).collect();
                // Part of `hole_punch`: turning relayed connections into direct ones.
                if self.swarm.behaviour().dcutr.is_enabled() && self.connections.get(&connection_id).is_some_and(|c| c.relayed) {
                    self.dial_direct(peer_id, &addrs);
                }
                for addr in addrs {
                    self.learn(peer_id, addr, dht_server);
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) && !self.relay_peers.contains_key(&peer_id) {
                    // Reachable at the address this node dialed it at (the source address of
                    // a connection it opened to us says nothing of where it listens).
                    let dialed = self.connections.values().find(|c| c.peer == peer_id && c.outbound && !c.relayed);
                    if let Some(addr) = dialed.map(|c| c.addr.clone()) {
                        tracing::debug!(relay = %peer_id, %addr, "a relay");
                        self.relay_peers.insert(peer_id, addr);
                        self.reserve_relays();
                    }
                }
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new })) => {
                tracing::info!("reachability: {old:?} -> {new:?}");
                self.nat = new;
                self.reserve_relays();
                self.publish_reachability();
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            })) => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "reachable through relay {relay_peer_id}");
                }
                self.reservations.insert(relay_peer_id, true);
                self.publish_reachability();
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punched: a direct connection to {remote_peer_id}"),
                Err(e) => tracing::info!(peer = %remote_peer_id, "no direct connection to {remote_peer_id}, staying relayed: {e}"),
            },
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                self.listen_addrs.push(address);
                self.info.set_listen_addrs(&self.listen_addrs);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
                self.info.set_listen_addrs(&self.listen_addrs);
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "connected");
                let addr = split_peer(endpoint.get_remote_address()).0;
                let (relayed, outbound) = (endpoint.is_relayed(), endpoint.is_dialer());
                self.connections.insert(connection_id, Connection { peer: peer_id, addr, relayed, outbound });
                if endpoint.is_dialer() {
                    self.learn(peer_id, split_peer(endpoint.get_remote_address()).0, false);
                }
                if let Some(tx) = self.dials.remove(&connection_id) {
                    let _ = tx.send(Ok(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { connection_id, peer_id, num_established, cause, .. } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    self.on_peer_gone(peer_id, cause);
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, error, peer_id } => {
                tracing::debug!(peer = ?peer_id, "dial failed: {error}");
                if let Some(tx) = self.dials.remove(&connection_id) {
                    let _ = tx.send(Err(Error::Network(format!("dial failed: {error}"))));
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error: ListenError::Denied { cause }, peer_id, .. } => {
                // The allow list: the handshake named a peer not on it.
                let peer = peer_id.map_or_else(|| "an unnamed peer".to_string(), |p| p.to_string());
                let why = match cause.downcast_ref::<libp2p::allow_block_list::NotAllowed>() {
                    Some(_) => "not on this node's allow list (--allow-peer)".to_string(),
                    None => cause.to_string(),
                };
                tracing::warn!(from = %send_back_addr, "refused a connection from {peer}: {why}");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } if self.keyed => {
                // With a network key, a peer without it (or with another) fails here, in the
                // handshake, before it is anyone: its address is all there is to name.
                tracing::warn!(from = %send_back_addr, "refused a connection: {error} (no network key, or another one)");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                // Hole punching's crossing dials fail here by design; nothing to warn of.
                tracing::debug!(from = %send_back_addr, "an incoming connection failed: {error}");
            }
            _ => {}
        }
    }

    /// `peer`'s last connection closed.
    fn on_peer_gone(&mut self, peer: PeerId, cause: Option<libp2p::swarm::ConnectionError>) {
        if self.relay_peers.remove(&peer).is_some() && self.reservations.remove(&peer).is_some() {
            // Its slot went with it; another relay may take over.
            tracing::info!(relay = %peer, "lost relay {peer}");
            self.reserve_relays();
            self.publish_reachability();
        }
        if let Some(libp2p::swarm::ConnectionError::IO(e)) = cause {
            if went_silent(&e) {
                // The peer's last connection timed out or was reset: it crashed or its network
                // went away (a clean close by the peer also surfaces as an I/O error, and is
                // not this). Out of the routing table, so no DHT query (ours, or another
                // node's through our answers) waits on it; it comes back when it connects again.
                tracing::info!(%peer, "lost the connection: {e}");
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
            }
        }
    }

    /// Nodes mDNS found on the local network: each one not connected is dialed at the
    /// addresses it announced. Nothing is trusted yet: a peer joins the routing table once
    /// identify shows it serves meshpy's DHT (`learn`), and a keyed mesh's handshake refuses
    /// nodes of other meshes on the same network.
    fn on_lan_peers(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        let local = *self.swarm.local_peer_id();
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in found.into_iter().filter(|(peer, _)| *peer != local) {
            by_peer.entry(peer).or_default().push(split_peer(&addr).0);
        }
        for (peer, addrs) in by_peer {
            tracing::debug!(%peer, ?addrs, "found on the local network");
            for addr in &addrs {
                self.swarm.add_peer_address(peer, addr.clone());
            }
            // Both ends find each other at the same moment and dial: from their listening
            // ports (libp2p's port reuse), the two dials would meet as one TCP simultaneous
            // open that neither handshake survives. Fresh ports make two connections instead.
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .allocate_new_port()
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "not dialing a node found on the local network: {e}");
            }
        }
    }

    /// A peer reached only through a relay may be reachable directly from here: a worker
    /// behind a NAT can dial out to a public End node, though the End node cannot dial in.
    /// DCUtR hole punching does not cover that case over TCP (its NAT-side dial takes the
    /// listener's role, so a public peer that simply accepts it meets two listeners), so try a
    /// plain dial to the peer's direct addresses, from a fresh port (DCUtR's dials reuse the
    /// listening one). Streams move to the direct connection once it is up.
    fn dial_direct(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let direct: Vec<Multiaddr> = addrs.iter().filter(|a| !super::streams::is_relayed(a)).cloned().collect();
        if direct.is_empty() || self.connections.values().any(|c| c.peer == peer && !c.relayed) {
            return;
        }
        tracing::debug!(%peer, ?direct, "reached through a relay; dialing it directly");
        let opts = DialOpts::peer_id(peer).addresses(direct).condition(PeerCondition::NotDialing).allocate_new_port().build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "no direct dial: {e}");
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed { id, result, step, .. } = event else {
            if let kad::Event::RoutingUpdated { peer, .. } = event {
                tracing::debug!(%peer, "routing table updated");
            }
            return;
        };
        match result {
            QueryResult::Bootstrap(result) if step.last => {
                if let Some(tx) = self.bootstraps.remove(&id) {
                    let _ = tx.send(result.map(drop).map_err(|e| Error::Network(format!("bootstrap: {e}"))));
                }
            }
            QueryResult::StartProviding(result) => {
                if let Some(tx) = self.provides.remove(&id) {
                    let _ = tx.send(result.map(drop).map_err(|e| Error::Network(format!("start providing: {e}"))));
                }
            }
            QueryResult::GetProviders(result) => {
                let failed = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        if let Some((found, _)) = self.lookups.get_mut(&id) {
                            found.extend(providers);
                        }
                        None
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
                    Err(e) => Some(e.to_string()),
                };
                if step.last {
                    if let Some((found, to)) = self.lookups.remove(&id) {
                        let answer = match failed {
                            Some(e) if found.is_empty() => Err(Error::Timeout(format!("get providers: {e}"))),
                            _ => Ok(self.with_addresses(found)),
                        };
                        match to {
                            LookupReply::One(tx) => {
                                let _ = tx.send(answer);
                            }
                            LookupReply::Batch { batch, index } => self.batch_answer(batch, index, answer),
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Files one lookup's answer in its batch; answers the batch when it was the last.
    fn batch_answer(&mut self, id: u64, index: usize, answer: Result<Providers>) {
        let Some(batch) = self.batches.get_mut(&id) else { return };
        match answer {
            Ok(providers) => batch.results[index] = providers,
            Err(e) => batch.failed.push((index, e)),
        }
        batch.remaining -= 1;
        if batch.remaining > 0 {
            return;
        }
        let Some(batch) = self.batches.remove(&id) else { return };
        let answer = match batch.failed.first() {
            None => Ok(batch.results),
            Some((_, first)) => {
                let keys: Vec<String> =
                    batch.failed.iter().map(|(i, _)| String::from_utf8_lossy(&batch.keys[*i]).into_owned()).collect();
                Err(Error::Timeout(format!(
                    "get providers of {} of {} keys failed ({}): {first}",
                    keys.len(),
                    batch.keys.len(),
                    keys.join(", ")
                )))
            }
        };
        let _ = batch.reply.send(answer);
    }

    /// Each provider with its known addresses (ours for ourselves), sorted by peer id.
    fn with_addresses(&mut self, peers: HashSet<PeerId>) -> Providers {
        let local = *self.swarm.local_peer_id();
        let mut out: Providers = peers
            .into_iter()
            .map(|peer| {
                let mut addrs = if peer == local {
                    self.listen_addrs.clone()
                } else {
                    self.addresses.get(&peer).cloned().unwrap_or_default()
                };
                if let Some(bucket) = self.swarm.behaviour_mut().kad.kbucket(peer) {
                    for entry in bucket.iter().filter(|e| *e.node.key.preimage() == peer) {
                        for addr in entry.node.value.iter() {
                            if !addrs.contains(addr) {
                                addrs.push(addr.clone());
                            }
                        }
                    }
                }
                (peer, addrs)
            })
            .collect();
        out.sort_by_key(|(peer, _)| peer.to_bytes());
        out
    }
}
