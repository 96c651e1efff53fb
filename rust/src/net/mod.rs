//! meshpy's peer-to-peer layer: a libp2p node per process (persistent Ed25519 identity, TCP
//! with Noise and Yamux and/or QUIC, identify, ping, a Kademlia DHT holding provider records
//! per "<model-id>/layer/<i>", the tensor protocol "/meshpy/tensor/1": one `wire` frame
//! per request and one per answer, on long-lived libp2p streams reused across requests, and
//! the blob protocol "/meshpy/blobs/1": byte ranges of model files, for fetching models).
//!
//! The node runs on a tokio runtime of its own; other threads (Python's included) drive it
//! through [`NodeHandle`]'s blocking calls, which send commands over a channel and wait on a
//! reply channel. Inbound requests go to a [`FrameHandler`] on tokio's blocking pool:
//! [`EchoHandler`] for network tests, [`crate::span::SpanHandler`] to serve a span of layers
//! (the span protocol's two halves live in `span`; this module is their transport). A chained
//! route's `Relay` and `Collect` the node serves itself around its handler (`relay`).

mod behaviour;
pub mod blobs;
mod codec;
pub mod identity;
mod info;
pub mod network_key;
mod node;
mod peers;
mod relay;
mod serve;
mod streams;
mod tensor;

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_blobs;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use behaviour::{KAD_PROTOCOL, IDENTIFY_PROTOCOL};
pub use codec::{error_frame, PROTOCOL};
pub(crate) use codec::error_frame_for;
pub(crate) use serve::unexpected;
pub use info::JsonObject;
pub use libp2p::{Multiaddr, PeerId};
pub use network_key::NetworkKey;
pub use node::{Connection, Node, NodeHandle, Pending, Providers, Reachability};
pub use peers::PeerLimits;
pub use serve::{EchoHandler, FrameHandler, Handed, SendFrame};

use crate::error::{Error, Result};
use crate::wire::Limits;

/// Which transports a node listens on (it can dial over both either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP with Noise encryption and Yamux multiplexing.
    Tcp,
    /// QUIC (v1), encrypted and multiplexed by the protocol itself.
    Quic,
    /// One listener of each.
    Both,
}

impl FromStr for Transport {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            "both" => Ok(Transport::Both),
            _ => Err(Error::InvalidArgument(format!("unknown transport {s:?}; known: tcp, quic, both"))),
        }
    }
}

/// How to start a [`Node`].
#[derive(Clone)]
pub struct NodeConfig {
    /// Directory holding the identity key (created if missing).
    pub node_dir: PathBuf,
    /// Address to listen on (127.0.0.1 for a node only this machine may reach).
    pub listen_host: IpAddr,
    /// Port to listen on; 0 takes a free one (the same number for TCP and QUIC when given).
    pub port: u16,
    /// Which listeners to open.
    pub transport: Transport,
    /// Peers to join through, as multiaddrs ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Default time a tensor request may take, both directions and the worker's forward (a
    /// long prefill included); [`NodeHandle::request`] can override it per call.
    pub request_timeout: Duration,
    /// Longest time a DHT query (bootstrap, provide, find providers) or a dial may take.
    pub query_timeout: Duration,
    /// How long the provider records this node stores for others stay valid without being
    /// announced again; this node re-announces its own every quarter of it. A worker that
    /// dies is thus forgotten within this time (libp2p's default is 48 hours). Every node of
    /// a mesh should use the same value.
    pub provider_ttl: Duration,
    /// Whether this node serves the DHT (answers Kademlia queries, stores records, joins
    /// other nodes' routing tables). Long-lived nodes (bootstrap, workers) do; short-lived
    /// clients should not: once gone, they would linger in routing tables and every query
    /// would wait on them (a vanished QUIC peer costs a full timeout).
    pub dht_server: bool,
    /// What the node accepts in frames, from requesters and responders alike.
    pub limits: Limits,
    /// Answers inbound tensor requests; `None` refuses them with an `InvalidRequest` error
    /// (the node itself still answers `Info` and `Ping`).
    pub handler: Option<Arc<dyn FrameHandler>>,
    /// The static part of the node's `Info` replies (device, threads, version, ...), merged
    /// under the handler's live description.
    pub info: JsonObject,
    /// Link latency stand-in for tests and benchmarks (this machine's kernel has no netem):
    /// every request this node sends waits half of it before it goes out and half after its
    /// answer comes in, so each of its round trips takes that much longer, and a request whose
    /// answer nobody waits on (a relay to the next hop) costs its receiver half. Zero unless
    /// `MESHPY_EMULATED_RTT_MS` is set.
    pub emulated_rtt: Duration,
    /// The mesh's shared key: only nodes holding it can connect (TCP only; see
    /// `network_key`). `None`: an open mesh.
    pub network_key: Option<NetworkKey>,
    /// The only peers this node connects with (both ways), if set: every other connection
    /// is denied once the handshake names the peer, and logged.
    pub allow_peers: Option<Vec<PeerId>>,
    /// What one peer may ask of this node at once and per second (see `peers`).
    pub peer_limits: PeerLimits,
    /// Whether to find other nodes on the local network by mDNS (multicast DNS queries and
    /// answers on every non-loopback interface), so a mesh forms with no bootstrap address.
    /// Off by default here: it sends packets to the whole local network.
    pub mdns: bool,
    /// Whether this node relays connections for peers that cannot reach each other (a node
    /// behind a NAT reserves a slot on one it is connected to, and is reachable through it).
    /// Only for nodes others can reach: the bootstrap node, or a public worker.
    pub relay_server: bool,
    /// Whether to try turning a relayed connection into a direct one: DCUtR hole punching
    /// (both ends dial each other at once through their NATs), and a plain dial out to a
    /// peer that reached this node through a relay (a node behind a NAT can reach a public
    /// one). Off: relayed connections stay so.
    pub hole_punch: bool,
}

/// Environment variable giving [`NodeConfig::emulated_rtt`] in milliseconds.
pub const EMULATED_RTT_ENV: &str = "MESHPY_EMULATED_RTT_MS";

/// The round trip `MESHPY_EMULATED_RTT_MS` asks for (zero when unset or not a finite,
/// non-negative number of milliseconds).
fn emulated_rtt_from_env() -> Duration {
    std::env::var(EMULATED_RTT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map_or(Duration::ZERO, |ms| Duration::from_secs_f64(ms / 1000.0))
}

impl NodeConfig {
    /// A config with defaults: 127.0.0.1, port 0, TCP, no bootstrap peers, 60 s requests,
    /// 30 s queries, 10-minute provider records, default frame limits, no handler, no static
    /// info.
    pub fn new(node_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            node_dir: node_dir.into(),
            listen_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            transport: Transport::Tcp,
            bootstrap: Vec::new(),
            request_timeout: Duration::from_secs(60),
            query_timeout: Duration::from_secs(30),
            provider_ttl: Duration::from_secs(600),
            dht_server: true,
            limits: Limits::default(),
            handler: None,
            info: JsonObject::new(),
            emulated_rtt: emulated_rtt_from_env(),
            network_key: None,
            allow_peers: None,
            peer_limits: PeerLimits::default(),
            mdns: false,
            relay_server: false,
            hole_punch: true,
        }
    }
}

/// A DHT key for "layer `layer` of model `model_id`", the record a worker provides for each
/// layer it serves.
pub fn layer_key(model_id: &str, layer: u32) -> Vec<u8> {
    format!("{model_id}/layer/{layer}").into_bytes()
}
