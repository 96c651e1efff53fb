//! A small libp2p behaviour handing out raw streams of one protocol (the tensor protocol, the
//! blob protocol): outbound ones on request (dialing the peer first when needed), inbound ones
//! to an unbounded queue.
//!
//! libp2p-stream does the same but hands inbound streams over through a one-slot channel and
//! drops those that arrive while the slot is taken, which concurrent requesters hit at once;
//! here nothing is dropped (the server's accept loop drains the queue).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
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

/// Where an opened stream (or why none) goes.
pub(crate) type OpenReply = oneshot::Sender<Result<Stream, String>>;

/// Asks the behaviour for a new outbound stream to a peer; cloneable, usable from any task.
#[derive(Clone)]
pub(crate) struct Opener(mpsc::UnboundedSender<(PeerId, Vec<Multiaddr>, OpenReply)>);

impl Opener {
    /// A new stream to `peer`, once a connection is up and the protocol negotiated; `addrs`
    /// are tried, besides those the node knows, if it must dial.
    pub(crate) async fn open(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<Stream, String> {
        let (tx, rx) = oneshot::channel();
        self.0.unbounded_send((peer, addrs, tx)).map_err(|_| "the node is shut down".to_string())?;
        rx.await.map_err(|_| "the connection closed while opening a stream".to_string())?
    }
}

/// The behaviour; see the module documentation.
pub struct ProtocolStreams {
    protocol: StreamProtocol,
    inbound: mpsc::UnboundedSender<(PeerId, Stream)>,
    requests: mpsc::UnboundedReceiver<(PeerId, Vec<Multiaddr>, OpenReply)>,
    connections: HashMap<PeerId, Vec<ConnectionId>>,
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
        let behaviour = ProtocolStreams {
            protocol,
            inbound,
            requests,
            connections: HashMap::new(),
            waiting: HashMap::new(),
            events: VecDeque::new(),
        };
        (behaviour, Opener(requests_tx), inbound_rx)
    }

    fn open(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, reply: OpenReply) {
        if let Some(&connection) = self.connections.get(&peer).and_then(|c| c.first()) {
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

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            protocol: self.protocol.clone(),
            remote: peer,
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
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections.entry(e.peer_id).or_default().push(e.connection_id);
                for reply in self.waiting.remove(&e.peer_id).unwrap_or_default() {
                    self.events.push_back(ToSwarm::NotifyHandler {
                        peer_id: e.peer_id,
                        handler: NotifyHandler::One(e.connection_id),
                        event: reply,
                    });
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(c) = self.connections.get_mut(&e.peer_id) {
                    c.retain(|id| *id != e.connection_id);
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
                    let _ = reply.send(Ok(stream));
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
