"""Finding the workers of a model and choosing a route through them.

Discovery asks the DHT for the providers of every layer key at once, then asks each provider
for its live description (an `Info` round trip, which also proves it is up and tells its
exact layer range: provider records can outlive a worker or its old range). A route is a list
of hops, each a provider and the contiguous layers it runs; workers run any contiguous part
of their range, so the route greedily takes, from the next layer, the provider reaching
furthest (fewest hops), then the least busy, then the nearest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from meshpy import _native
from meshpy.errors import MeshpyError, NoRouteError
from meshpy.mesh.identity import ModelIdentity

__all__ = [
    "Provider",
    "Hop",
    "describe_peers",
    "discover",
    "plan_route",
    "coverage_of",
    "describe_route",
    "layer_seconds",
    "missing_layers",
    "provider_from_info",
]

log = logging.getLogger(__name__)

#: How long one provider may take to answer `Info` before discovery skips it.
INFO_TIMEOUT = 5.0


@dataclass(frozen=True)
class Provider:
    """A worker serving layers `layers` of the model, as it described itself."""

    peer_id: str
    layers: range
    rtt: float
    sessions: int = 0
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def serves(self, layers: range) -> bool:
        """Whether every layer of `layers` is one of this provider's."""
        return self.layers.start <= layers.start and layers.stop <= self.layers.stop


@dataclass(frozen=True)
class Hop:
    """One step of a route: `provider` runs `layers` (a part of its range)."""

    provider: Provider
    layers: range

    def __str__(self) -> str:
        return f"layers {self.layers.start}-{self.layers.stop - 1} on {self.provider.peer_id}"


def _ask_info(node: _native.Node, peer: str) -> tuple[dict[str, Any], float] | None:
    t0 = time.perf_counter()
    try:
        info = node.info(peer, timeout=INFO_TIMEOUT)
    except MeshpyError as e:
        log.info("provider %s does not answer: %s", peer, e)
        return None
    return info, time.perf_counter() - t0


def describe_peers(node: _native.Node, peers: Iterable[str]) -> dict[str, tuple[dict[str, Any], float]]:
    """`Info` from every peer that answers, asked in parallel: peer -> (info, round trip)."""
    peers = list(dict.fromkeys(peers))
    if not peers:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(peers))) as ex:
        answers = list(ex.map(lambda p: _ask_info(node, p), peers))
    return {p: a for p, a in zip(peers, answers) if a is not None}


def discover(node: _native.Node, model: ModelIdentity, n_layers: int, exclude: Iterable[str] = ()) -> list[Provider]:
    """Live providers of `model` (skipping `exclude`), each with its real layer range."""
    keys = [model.layer_key(i) for i in range(n_layers)]
    found = node.get_providers_many(keys)
    skip = set(exclude) | {node.peer_id}
    peers = [peer for providers in found for peer, _addrs in providers if peer not in skip]
    out = [p for peer, (info, rtt) in describe_peers(node, peers).items()
           if (p := provider_from_info(peer, info, rtt, model, n_layers)) is not None]
    out.sort(key=lambda p: (p.layers.start, p.peer_id))
    return out


def provider_from_info(peer: str, info: dict[str, Any], rtt: float, model: ModelIdentity, n_layers: int) -> Provider | None:
    """The provider `peer` is by its `Info` (answered in `rtt` seconds), or None when it
    serves no layers of `model` or is leaving (it takes no new sessions)."""
    if info.get("mode") != "span" or info.get("draining"):
        return None
    if info.get("model_hash") != model.digest.hex():
        # Cannot happen through the keys (they hold the hash) unless a worker lies.
        log.warning("provider %s serves %s, not %s; skipped", peer, info.get("model_name"), model.id)
        return None
    first, count = int(info["first_layer"]), int(info["n_layers"])
    if not (0 <= first and count > 0 and first + count <= n_layers):
        log.warning("provider %s announces layers %d+%d outside the model; skipped", peer, first, count)
        return None
    return Provider(peer, range(first, first + count), rtt, int(info.get("sessions", 0)), info)


def coverage_of(providers: Sequence[Provider], n_layers: int) -> list[int]:
    """How many providers each layer has."""
    cover = [0] * n_layers
    for p in providers:
        for i in p.layers:
            cover[i] += 1
    return cover


def missing_layers(providers: Sequence[Provider], n_layers: int) -> list[int]:
    """Layers no provider serves."""
    return [i for i, c in enumerate(coverage_of(providers, n_layers)) if c == 0]


#: Round trips within this many seconds of each other count as equal when choosing providers,
#: so sessions spread over them instead of all going to the one a few microseconds closer.
RTT_BUCKET = 0.010


def layer_seconds(p: Provider) -> float | None:
    """Seconds one decode step takes per layer on `p`, as it measured at load (Info
    `decode_ms_per_layer`); None when it did not say."""
    ms = p.info.get("decode_ms_per_layer")
    return ms / 1000.0 if isinstance(ms, (int, float)) and ms > 0 else None


def preference(p: Provider, started: Mapping[str, int]) -> tuple[int, int, int, float]:
    """How good a provider is for one more session (smaller is better): fewest sessions it
    reported, then the time a step costs there, the round trip plus its layers' compute (in
    `RTT_BUCKET` steps), then fewest sessions this node started on it (`started`; so equal
    providers take turns), then the exact round trip."""
    step = max(p.rtt, 0.0) + (layer_seconds(p) or 0.0) * len(p.layers)
    return max(p.sessions, 0), round(step / RTT_BUCKET), started.get(p.peer_id, 0), p.rtt


def plan_route(
    providers: Sequence[Provider], start: int, stop: int, exclude: Iterable[str] = (), started: Mapping[str, int] | None = None
) -> list[Hop]:
    """Hops running layers `start..stop` in order, the fewest there can be, each on the
    provider `preference` likes best (`started`: sessions this node started on each peer);
    raises NoRouteError naming the missing layers when no provider serves some of them."""
    started = started or {}
    skip = set(exclude)
    usable = [p for p in providers if p.peer_id not in skip]
    hops: list[Hop] = []
    pos = start
    while pos < stop:
        here = [p for p in usable if p.layers.start <= pos < p.layers.stop]
        if not here:
            missing = [i for i in range(pos, stop) if not any(i in p.layers for p in usable)]
            raise NoRouteError(missing)
        best = min(here, key=lambda p: (-min(p.layers.stop, stop), *preference(p, started)))
        end = min(best.layers.stop, stop)
        hops.append(Hop(best, range(pos, end)))
        pos = end
    return hops


def describe_route(hops: Sequence[Hop]) -> str:
    """One line per hop, for logs."""
    return "; ".join(str(h) for h in hops)
