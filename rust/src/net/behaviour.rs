//! The node's libp2p behaviour (identify, ping, Kademlia in server mode, raw streams for
//! the tensor protocol, and mDNS on the local network when asked) and the swarm built around it: TCP with Noise and Yamux, and
//! QUIC, on tokio. Both transports can always dial; which ones listen is the node's choice.
//! With a network key, TCP alone, under the private-network layer.

use std::time::Duration;

use libp2p::core::upgrade::Version;
use libp2p::core::Transport as _;
use libp2p::identity::Keypair;
use libp2p::pnet::PnetConfig;
use libp2p::kad::store::MemoryStore;
use libp2p::allow_block_list;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{autonat, dcutr, identify, kad, mdns, noise, ping, relay, tcp, yamux, StreamProtocol, Swarm, SwarmBuilder};

use super::blobs::BLOB_PROTOCOL;
use super::codec::PROTOCOL;
use super::streams::{Opener, ProtocolStreams};
use super::NodeConfig;
use crate::error::{Error, Result};

/// Kademlia protocol of meshpy meshes: a name of our own keeps our DHT apart from the public
/// IPFS one if the two ever meet.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshpy/kad/1");

/// Identify's protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/meshpy/id/1";

/// Every protocol a node runs.
#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    /// Exchanges listen addresses and protocols with each peer.
    pub identify: identify::Behaviour,
    /// Keeps connections checked and measures round trips.
    pub ping: ping::Behaviour,
    /// The DHT: routing and provider records per (model, layer).
    pub kad: kad::Behaviour<MemoryStore>,
    /// Streams of the tensor protocol (frames on long-lived streams; see `codec`).
    pub tensor: ProtocolStreams,
    /// Streams of the blob protocol (model files' byte ranges; see `blobs`).
    pub blobs: ProtocolStreams,
    /// With an allow list, connections with any other peer are denied as they are made.
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    /// Finds nodes on the local network ([`NodeConfig::mdns`]): each one found is dialed, and
    /// joins the DHT once identify shows it speaks meshpy's Kademlia.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Tells whether this node is reachable from outside (peers try to dial it back): a node
    /// behind a NAT then listens through a relay. Every node also answers others' probes.
    pub autonat: autonat::Behaviour,
    /// Relays connections between nodes that cannot reach each other ([`NodeConfig::relay_server`]).
    pub relay: Toggle<relay::Behaviour>,
    /// Reserves a slot on a relay, and dials peers through relays (`/p2p-circuit` addresses).
    pub relay_client: relay::client::Behaviour,
    /// Upgrades a relayed connection to a direct one by hole punching ([`NodeConfig::hole_punch`]).
    pub dcutr: Toggle<dcutr::Behaviour>,
}

/// How a node probes its own reachability: soon after it starts (the mesh places layers
/// right after joining), against any connected peer, private addresses included (meshes run on
/// home and office networks), one answer enough to decide.
fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_millis(500),
        retry_interval: Duration::from_secs(20),
        refresh_interval: Duration::from_secs(300),
        timeout: Duration::from_secs(10),
        throttle_server_period: Duration::from_secs(1),
        only_global_ips: false,
        confidence_max: 1,
        ..autonat::Config::default()
    }
}

/// What a relay carries: hidden states of whole generations, so no byte or time limit per
/// circuit (libp2p's defaults, 128 KiB and 2 minutes, are for hole punching only), and enough
/// circuits for a mesh's workers and End nodes.
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuits: 1024,
        max_circuits_per_peer: 64,
        max_circuit_duration: Duration::from_secs(24 * 3600),
        max_circuit_bytes: 0,
        ..relay::Config::default()
    }
}

/// Inbound streams of one protocol, as the swarm accepts them.
pub(crate) type InboundStreams = futures::channel::mpsc::UnboundedReceiver<(libp2p::PeerId, libp2p::Stream)>;

/// One protocol's ends: the handle that opens streams, and the queue of inbound ones.
pub(crate) type ProtocolEnds = (Opener, InboundStreams);

/// How often an idle QUIC connection proves it is alive.
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A QUIC connection silent this long is dead (five missed keep-alives; long enough that an
/// event loop busy for a few seconds, or a lossy moment, does not drop live peers).
const QUIC_IDLE_TIMEOUT_MS: u32 = 5000;
/// Longest a QUIC dial may take: a few round trips of even a slow intercontinental link.
const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest any dial may take to connect and finish its handshakes (libp2p's default is 10 s).
/// A NAT drops unsolicited packets silently, so a dial to a node behind one fails only by
/// timing out; AutoNAT's dial-back must fail within its probe's 10 s for the node to learn
/// it is private at all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the swarm for `keypair` with `config`'s timeouts; also returns, for the tensor
/// protocol and then the blob protocol, the handle that opens streams and the queue of inbound
/// ones. With a network key, TCP connections carry
/// libp2p's private-network layer under Noise and there is no QUIC (see `network_key`).
pub(crate) fn build_swarm(keypair: Keypair, config: &NodeConfig) -> Result<(Swarm<MeshBehaviour>, [ProtocolEnds; 2])> {
    let (tensor, opener, inbound) = ProtocolStreams::new(PROTOCOL);
    let (blobs, blob_opener, blob_inbound) = ProtocolStreams::new(BLOB_PROTOCOL);
    let net = |what: &str, e: &dyn std::fmt::Display| Error::Network(format!("{what}: {e}"));
    let tcp_config = tcp::Config::default().nodelay(true);
    let (query_timeout, provider_ttl) = (config.query_timeout, config.provider_ttl);
    let kad_mode = if config.dht_server { kad::Mode::Server } else { kad::Mode::Client };
    let allow = config.allow_peers.as_ref().map(|peers| {
        let mut allow = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for peer in peers {
            allow.allow_peer(*peer);
        }
        allow
    });
    let (lan, relay_server, hole_punch) = (config.mdns, config.relay_server, config.hole_punch);
    let behaviour = move |key: &Keypair, relay_client: relay::client::Behaviour| {
        let peer_id = key.public().to_peer_id();
        let mdns = if lan { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?) } else { None };
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(query_timeout);
        // Records of dead providers expire; live ones are re-announced well before.
        kad_config.set_provider_record_ttl(Some(provider_ttl));
        kad_config.set_provider_publication_interval(Some(provider_ttl / 4));
        let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(kad_mode));
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(MeshBehaviour {
            // Listen addresses change when a relay slot is reserved: peers must hear of it.
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public()).with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::new(ping::Config::new()),
            kad,
            tensor,
            blobs,
            allow: Toggle::from(allow),
            mdns: Toggle::from(mdns),
            autonat: autonat::Behaviour::new(peer_id, autonat_config()),
            relay: Toggle::from(relay_server.then(|| relay::Behaviour::new(peer_id, relay_config()))),
            relay_client,
            dcutr: Toggle::from(hole_punch.then(|| dcutr::Behaviour::new(peer_id))),
        })
    };
    let swarm_config = |c: libp2p::swarm::Config| {
        c.with_idle_connection_timeout(Duration::from_secs(300))
            // Every meshpy node speaks every protocol we open streams for, so a stream can
            // carry its first frame with the protocol proposal instead of waiting a round
            // trip for the confirmation (multistream-select "V1 lazy"): one loopback round
            // trip less per tensor request.
            .with_substream_upgrade_protocol_override(Version::V1Lazy)
    };
    let swarm = match &config.network_key {
        None => SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp_config, noise::Config::new, yamux::Config::default)
            .map_err(|e| net("TCP transport", &e))?
            .with_quic_config(|mut c| {
                // Notice a vanished peer within seconds: quinn sees nothing when a process
                // dies, so only keep-alives that stop being acknowledged tell (libp2p's
                // defaults, 5 s pings and a 10 s idle timeout, cost every DHT query that
                // reaches the dead peer in the meantime a 10 s wait, then 5 s per dial).
                c.keep_alive_interval = QUIC_KEEP_ALIVE;
                c.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
                c.handshake_timeout = QUIC_HANDSHAKE_TIMEOUT;
                c
            })
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| net("relay client", &e))?
            .with_behaviour(behaviour)
            .map_err(|e| net("behaviour", &e))?
            .with_swarm_config(swarm_config)
            .with_connection_timeout(CONNECTION_TIMEOUT)
            .build(),
        Some(network_key) => {
            let psk = network_key.psk();
            SwarmBuilder::with_existing_identity(keypair)
                .with_tokio()
                .with_other_transport(|key| {
                    let noise = noise::Config::new(key)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        tcp::tokio::Transport::new(tcp_config)
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default()),
                    )
                })
                .map_err(|e| net("private TCP transport", &e))?
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| net("relay client", &e))?
                .with_behaviour(behaviour)
                .map_err(|e| net("behaviour", &e))?
                .with_swarm_config(swarm_config)
                .with_connection_timeout(CONNECTION_TIMEOUT)
                .build()
        }
    };
    Ok((swarm, [(opener, inbound), (blob_opener, blob_inbound)]))
}
