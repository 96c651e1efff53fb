"""Starting mesh nodes from settings: identity directories, bootstrap addresses, and the
rendezvous node that `meshpy bootstrap` runs."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from meshpy import _native
from meshpy.errors import InvalidArgumentError, NetworkError
from meshpy.settings import NodeSettings

__all__ = ["LAN", "joins_by_lan", "parse_bootstrap", "allowed_peers", "data_dir", "NodeDir", "uses_mdns", "start_node", "join_lan", "settle_reachability"]

log = logging.getLogger(__name__)


#: The bootstrap "address" that means: find the mesh on the local network (mDNS).
LAN = "lan"

#: How long a node that joins by the local network waits for a first peer: mDNS answers come
#: within a second; the rest is margin for a loaded machine.
LAN_WAIT = 10.0

#: How long a worker or bootstrap node with no bootstrap address looks for a mesh on the local
#: network before it starts one of its own: libp2p's mDNS asks at about 0.5, 1.5 and 3.5 s
#: (and the nodes already there ask too, and find it), so a lost packet costs one more round.
LAN_LOOK = 5.0


def joins_by_lan(text: str | None) -> bool:
    """Whether a bootstrap setting is `lan`: find the mesh on the local network."""
    return (text or "").strip().lower() == LAN


def parse_bootstrap(text: str | None) -> list[str]:
    """Multiaddrs from a comma- or space-separated list; each must end in /p2p/<peer id>.
    `lan` gives none: the node finds its peers by mDNS (`start_node(lan=True)`)."""
    if joins_by_lan(text):
        return []
    addrs = [a for a in (text or "").replace(",", " ").split() if a]
    for a in addrs:
        if "/p2p/" not in a:
            raise InvalidArgumentError(f"bootstrap address {a!r} lacks /p2p/<peer id> (copy it as `meshpy bootstrap` prints it)")
    return addrs


def allowed_peers(values: Sequence[str]) -> list[str] | None:
    """The peers `--allow-peer` values name: each a peer id, or a file of them (one per line,
    `#` comments); None when no value is given (every peer allowed)."""
    if not values:
        return None
    peers: list[str] = []
    for value in values:
        path = Path(value).expanduser()
        if path.is_file():
            lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
            peers += [line for line in lines if line]
        else:
            peers.append(value)
    return peers


def data_dir() -> Path:
    """Where nodes keep their identities: `$MESHPY_DATA_DIR`, else `$XDG_DATA_HOME/meshpy`."""
    if os.environ.get("MESHPY_DATA_DIR"):
        return Path(os.environ["MESHPY_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "meshpy"


class NodeDir:
    """A node's identity directory: the one given; a persistent one per role and fixed port
    (so a restarted bootstrap node keeps the address others were given); or, on a free port,
    a temporary one removed on close."""

    def __init__(self, given: Path | None, role: str, port: int) -> None:
        self._temp: str | None = None
        if given is not None:
            self.path = Path(given)
        elif port:
            self.path = data_dir() / f"{role}-{port}"
        else:
            self._temp = tempfile.mkdtemp(prefix=f"meshpy-{role}-")
            self.path = Path(self._temp)

    def cleanup(self) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None


def uses_mdns(settings: NodeSettings, lan: bool) -> bool:
    """Whether a node looks for peers on the local network: when it joins by it (`lan`), or
    when `--mdns` is on and it listens beyond loopback (a node only this machine can reach
    has nothing to announce to the network)."""
    return lan or (settings.mdns and not on_loopback(settings))


def on_loopback(settings: NodeSettings) -> bool:
    """Whether the node listens on loopback only (reachable from this machine alone)."""
    return ipaddress.ip_address(settings.host).is_loopback


def start_node(settings: NodeSettings, role: str, bootstrap: list[str] | None = None, *, lan: bool = False,
               serves: bool = False, **kwargs: object) -> tuple[_native.Node, NodeDir]:
    """A node listening as `settings` says, joined to the mesh through `bootstrap`, or with
    `lan` through the first meshpy nodes mDNS finds on the local network (an error when none
    answers within `LAN_WAIT`). Without either, a node with mDNS on looks for a mesh on the
    local network for `LAN_LOOK` seconds and joins it if one answers. A node that `serves`
    (others dial it: workers, seeds) and listens beyond loopback then learns whether it is reachable, and behind a NAT
    gets a relay slot, before it returns (`settle_reachability`), so what it announces next
    carries addresses others can reach."""
    node_dir = NodeDir(settings.node_dir, role, settings.port)
    mdns = uses_mdns(settings, lan)
    try:
        key = None if settings.network_key is None else str(settings.network_key)
        if settings.peer_rate is not None:
            kwargs["peer_rate"] = settings.peer_rate
        node = _native.Node(
            str(node_dir.path), settings.port, settings.transport, bootstrap or [], None, host=settings.host,
            network_key=key, allow_peers=allowed_peers(settings.allow_peer), mdns=mdns, relay_server=settings.relay,
            hole_punch=settings.hole_punch, **kwargs,
        )
    except BaseException:
        node_dir.cleanup()
        raise
    if mdns and not bootstrap:
        try:
            found = join_lan(node, LAN_WAIT if lan else LAN_LOOK)
            if lan and not found:
                key_hint = "this node's network key may not be the mesh's" if settings.network_key else "the mesh may have a network key (--network-key)"
                raise NetworkError(f"no meshpy node answered on the local network within {LAN_WAIT:.0f} s (mDNS; {key_hint}); "
                                   "join through an address instead (--bootstrap /ip4/.../p2p/...)")
            log.info("%s node: %s", role, f"joined the mesh on the local network through {len(found)} node(s)" if found
                     else "no mesh on the local network yet; others there will find this one")
        except BaseException:
            node.close()
            node_dir.cleanup()
            raise
    if bootstrap:
        try:
            node.bootstrap()
            # A DHT bootstrap can end without reaching anyone; a node alone is no use.
            wanted = {a.rsplit("/p2p/", 1)[1] for a in bootstrap}
            if not wanted & set(node.connected_peers()):
                key_hint = "this node's network key is not the mesh's" if settings.network_key else "the mesh may have a network key (--network-key)"
                raise NetworkError(f"cannot connect to the bootstrap node ({', '.join(bootstrap)}): it is unreachable, or {key_hint}")
        except BaseException:
            node.close()
            node_dir.cleanup()
            raise
    if serves and not on_loopback(settings) and node.connected_peers():
        settle_reachability(node, role)
    log.info("%s node %s listening on %s", role, node.peer_id, ", ".join(node.listen_addrs()))
    return node, node_dir


#: How long a serving node waits to learn whether peers can reach it and, if not, for a relay
#: slot: a probe is a dial back (a round trip or a refused connection), a slot one more round
#: trip; the rest is margin for a slow link.
REACH_WAIT = 15.0


def settle_reachability(node: _native.Node, role: str) -> dict[str, object]:
    """Waits (up to `REACH_WAIT`) until peers' dial-back probes tell whether this node is
    reachable and, when it is not, until a relay holds a slot for it; logs the outcome and
    returns `node.reachability()`."""
    deadline = time.monotonic() + REACH_WAIT
    while True:
        state = node.reachability()
        settled = state["reachability"] == "public" or state["reachability"] == "private" and state["relayed_through"]
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if state["reachability"] == "public":
        log.info("%s node: reachable directly", role)
    elif state["relayed_through"]:
        log.info("%s node: behind a NAT; reachable through relay %s", role, ", ".join(state["relayed_through"]))  # type: ignore[arg-type]
    elif state["reachability"] == "private":
        log.warning("%s node: behind a NAT and no relay holds a slot for it: other nodes cannot reach it (open its port, "
                    "or join through a node running with --relay; `meshpy bootstrap` relays)", role)
    else:
        log.info("%s node: no peer has probed its reachability yet", role)
    return state


def join_lan(node: _native.Node, timeout: float) -> list[str]:
    """Waits up to `timeout` for mDNS to connect this node to peers on the local network that
    serve the mesh's DHT, then fills the routing table through them (a DHT bootstrap);
    returns the peers found (none: no mesh here)."""
    deadline = time.monotonic() + timeout
    while True:
        peers = node.connected_peers()
        if peers:
            try:
                node.bootstrap()  # fails until identify has put a DHT server in the table
                return peers
            except NetworkError:
                pass
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.1)
