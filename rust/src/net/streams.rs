//! A small libp2p behaviour handing out raw streams of one protocol (the tensor protocol, the
//! blob protocol): outbound ones on request (dialing the peer first when needed), inbound ones
//! to an unbounded queue.
//!
//! libp2p-stream does the same but hands inbound streams over through a one-slot channel and
//! drops those that arrive while the slot is taken, which concurrent requesters hit at once;
//! here nothing is dropped (the server's accept loop drains the queue).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::Endpoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, DialError, FromSwarm, NetworkBehaviour,
    NotifyHandler, Stream, StreamUpgradeError, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use libp2p::StreamProtocol;
use libp2p::multiaddr::Protocol;

/// Where an opened stream (or why none) goes, with whether its connection is relayed.
pub(crate) type OpenReply = oneshot::Sender<Result<(Stream, bool), String>>;

/// Peers with at least one direct (not relayed) connection, shared with the stream pools: a
/// relayed stream is not reused once its peer is reachable directly (hole punched).
pub(crate) type DirectPeers = Arc<Mutex<HashMap<PeerId, usize>>>;

/// Asks the behaviour for a new outbound stream to a peer; cloneable, usable from any task.
#[derive(Clone)]
pub(crate) struct Opener(mpsc::UnboundedSender<(PeerId, Vec<Multiaddr>, OpenReply)>, DirectPeers);

impl Opener {
    /// A new stream to `peer`, once a connection is up and the protocol negotiated; `addrs`
    /// are tried, besides those the node knows, if it must dial.
    pub(crate) async fn open(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<Stream, String> {
        Ok(self.open_tagged(peer, addrs).await?.0)
    }

    /// [`open`](Self::open), also saying whether the stream runs over a relayed connection
    /// (a direct connection is used when the peer has one).
    pub(crate) async fn open_tagged(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(Stream, bool), String> {
        let (tx, rx) = oneshot::channel();
        self.0.unbounded_send((peer, addrs, tx)).map_err(|_| "the node is shut down".to_string())?;
        rx.await.map_err(|_| "the connection closed while opening a stream".to_string())?
    }

    /// Whether `peer` has a direct connection now.
    pub(crate) fn is_direct(&self, peer: &PeerId) -> bool {
        self.1.lock().unwrap_or_else(|e| e.into_inner()).contains_key(peer)
    }
}

/// The behaviour; see the module documentation.
pub struct ProtocolStreams {
    protocol: StreamProtocol,
    inbound: mpsc::UnboundedSender<(PeerId, Stream)>,
    requests: mpsc::UnboundedReceiver<(PeerId, Vec<Multiaddr>, OpenReply)>,
    /// Each peer's connections, and whether each is relayed.
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    direct: DirectPeers,
    /// Opens waiting for a connection to their peer.
    waiting: HashMap<PeerId, Vec<OpenReply>>,
    events: VecDeque<ToSwarm<Infallible, OpenReply>>,
}

impl ProtocolStreams {
    /// The behaviour for `protocol`, the handle to open streams with, and the queue of
    /// inbound streams.
    pub(crate) fn new(protocol: StreamProtocol) -> (Self, Opener, mpsc::UnboundedReceiver<(PeerId, Stream)>) {
        let (inbound, inbound_rx) = mpsc::unbounded();
        let (requests_tx, requests) = mpsc::unbounded();
        let direct = DirectPeers::default();
        let behaviour = ProtocolStreams {
            protocol,
            inbound,
            requests,
            connections: HashMap::new(),
            direct: Arc::clone(&direct),
            waiting: HashMap::new(),
            events: VecDeque::new(),
        };
        (behaviour, Opener(requests_tx, direct), inbound_rx)
    }

    fn open(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, reply: OpenReply) {
        // A direct connection when there is one (a relayed one stays open beside a hole-punched one).
        let best = self.connections.get(&peer).and_then(|c| c.iter().find(|(_, relayed)| !relayed).or(c.first()));
        if let Some(&(connection, _)) = best {
            self.events.push_back(ToSwarm::NotifyHandler { peer_id: peer, handler: NotifyHandler::One(connection), event: reply });
            return;
        }
        let waiting = self.waiting.entry(peer).or_default();
        waiting.push(reply);
        if waiting.len() == 1 {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            self.events.push_back(ToSwarm::Dial { opts });
        }
    }

    fn handler(&self, peer: PeerId, relayed: bool) -> Handler {
        Handler {
            protocol: self.protocol.clone(),
            remote: peer,
            relayed,
            inbound: self.inbound.clone(),
            to_open: VecDeque::new(),
            opening: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for ProtocolStreams {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, is_relayed(local) || is_relayed(remote)))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, is_relayed(addr)))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                let relayed = e.endpoint.is_relayed();
                self.connections.entry(e.peer_id).or_default().push((e.connection_id, relayed));
                if !relayed {
                    *self.direct.lock().unwrap_or_else(|e| e.into_inner()).entry(e.peer_id).or_default() += 1;
                }
                for reply in self.waiting.remove(&e.peer_id).unwrap_or_default() {
                    self.events.push_back(ToSwarm::NotifyHandler {
                        peer_id: e.peer_id,
                        handler: NotifyHandler::One(e.connection_id),
                        event: reply,
                    });
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                if !e.endpoint.is_relayed() {
                    let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = direct.get_mut(&e.peer_id) {
                        *n -= 1;
                        if *n == 0 {
                            direct.remove(&e.peer_id);
                        }
                    }
                }
                if let Some(c) = self.connections.get_mut(&e.peer_id) {
                    c.retain(|(id, _)| *id != e.connection_id);
                    if c.is_empty() {
                        self.connections.remove(&e.peer_id);
                    }
                }
            }
            // A dial skipped because one is under way (or a connection exists) is no failure.
            FromSwarm::DialFailure(e) if !matches!(e.error, DialError::DialPeerConditionFalse(_)) => {
                let Some(peer) = e.peer_id else { return };
                if self.connections.contains_key(&peer) {
                    return;
                }
                for reply in self.waiting.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(format!("cannot connect to {peer}: {}", e.error)));
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some((peer, addrs, reply))) = self.requests.poll_next_unpin(cx) {
            self.open(peer, addrs, reply);
        }
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

/// Per connection: negotiates outbound streams in request order and queues inbound ones.
pub struct Handler {
    protocol: StreamProtocol,
    remote: PeerId,
    /// Whether this connection runs through a relay.
    relayed: bool,
    inbound: mpsc::UnboundedSender<(PeerId, Stream)>,
    /// Opens not yet asked of the connection.
    to_open: VecDeque<OpenReply>,
    /// Opens under negotiation; any negotiated stream serves the oldest (they are alike).
    opening: VecDeque<OpenReply>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = OpenReply;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<libp2p::StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<libp2p::StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Infallible>> {
        match self.to_open.pop_front() {
            Some(reply) => {
                self.opening.push_back(reply);
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ()),
                })
            }
            None => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, reply: OpenReply) {
        self.to_open.push_back(reply);
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: stream, .. }) => {
                let _ = self.inbound.unbounded_send((self.remote, stream));
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: stream, .. }) => {
                if let Some(reply) = self.opening.pop_front() {
                    let _ = reply.send(Ok((stream, self.relayed)));
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                if let Some(reply) = self.opening.pop_front() {
                    let why = match error {
                        StreamUpgradeError::Timeout => "timed out negotiating the stream".to_string(),
                        StreamUpgradeError::NegotiationFailed => format!("the peer does not speak {}", self.protocol),
                        StreamUpgradeError::Io(e) => e.to_string(),
                        StreamUpgradeError::Apply(never) => match never {},
                    };
                    let _ = reply.send(Err(why));
                }
            }
            _ => {}
        }
    }
}

/// Whether `addr` goes through a relay (`.../p2p-circuit/...`).
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}
