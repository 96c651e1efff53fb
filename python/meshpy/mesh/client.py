"""The End node's side of the mesh: sessions whose layers run on workers.

`MeshPipeline` has the interface of the local pipeline (`new_session`, `forward`,
`close_session`), so `Model` generates through the mesh exactly as it does in one process.
Each session gets a random 128-bit id and a route (hops of contiguous layers). A step goes
through the route chained where every worker serves relays: the first worker passes its
output to the next and so on, the last answering this node, so N workers cost N + 1 link
crossings instead of the star route's 2N (each hop a round trip from here). Either way every
hop's output comes back here, and every hop's inputs are kept for the life of the session:
when a hop fails (the worker vanished, dropped the session, or cannot hold it), the client
goes on hop by hop from there, routes those layers through other providers, replays the kept
inputs to rebuild their KV caches, and carries on where it was, so a lost worker costs time,
not the generation. A worker that leaves hands its sessions over with their KV caches
instead (`Worker.leave`): asked meanwhile, it answers `session_moving` (ask again shortly),
then `session_moved` naming the worker holding the session now, and the client sends the same
step there, replaying nothing (`recovery` counts both ways).

With `verify` > 0 that share of sessions is checked (`verify`): each hop also runs on a
shadow provider of the same layers, hop by hop from here, and its output is used only when
the two agree; on a mismatch a third provider, replayed to the session's state, decides, the
one that disagrees is banned for the pipeline's life, and the session goes on with the two
that agree. Sessions routed through a banned provider reroute with replay at their next step.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from typing import Any

import numpy as np

from meshpy import _native
from meshpy.errors import (
    format_layer_list,
    ContextOverflowError,
    MeshpyError,
    NetworkError,
    NoRouteError,
    RequestTimeoutError,
    VerificationError,
    WorkerError,
)
from meshpy.mesh.identity import ModelIdentity
from meshpy.mesh.routing import (
    Hop,
    Provider,
    describe_peers,
    describe_route,
    discover,
    missing_layers,
    plan_route,
    preference,
    provider_from_info,
)
from meshpy.mesh.verify import VERIFY_TOLERANCE, Bans, disagreement
from meshpy.models.config import ModelConfig

__all__ = ["MeshPipeline", "MeshSession", "ROUTE_MODES", "WIRE_DTYPES"]

log = logging.getLogger(__name__)

WIRE_DTYPES = ("f32", "bf16", "f16")
#: How a step crosses the route: "chain" (worker to worker, where every hop serves relays)
#: or "star" (each hop a round trip from the End node; what a feature needing to act between
#: hops uses).
ROUTE_MODES = ("chain", "star")
#: A provider that failed is left out of routes for this long.
_FAILED_COOLDOWN = 30.0
#: Reroutes one forward may try before giving up.
_MAX_REROUTES = 4
#: Positions per frame when replaying a hop's inputs into a new provider.
_REPLAY_CHUNK = 512
#: Looking for a shadow or referee looks the providers up again at most this often (s).
_REFRESH_GAP = 5.0
#: How often a hop whose session is being handed over is asked again (s).
_MOVING_POLL = 0.002
#: Hand-overs one forward may follow before treating the hop as failed.
_MAX_MOVES = 4
#: Seconds a worker has to copy a session (`fork`): a copy is one round trip.
_FORK_TIMEOUT = 10.0


class _HopFailed(Exception):
    """A hop that another provider may serve: its peer and what went wrong."""

    def __init__(self, peer: str, error: Exception) -> None:
        super().__init__(peer, error)
        self.peer = peer
        self.error = error


class _HopMoved(_HopFailed):
    """The hop's worker handed the session over, KV cache and all, to `to`."""

    def __init__(self, peer: str, error: Exception, to: str) -> None:
        super().__init__(peer, error)
        self.to = to


class _RunAlone(Exception):
    """`forward_batch` cannot take these sessions together (nothing has changed): the caller
    runs them one by one through `forward`."""


def _handed_over(error: BaseException) -> bool:
    """Whether `error` says the session is being or was handed to another worker."""
    return isinstance(error, WorkerError) and error.code in ("session_moving", "session_moved")


def _recoverable(error: BaseException) -> bool:
    """Whether another try (the same hop direct, or another provider) may get past `error`."""
    if isinstance(error, (NetworkError, RequestTimeoutError)):
        return True
    return isinstance(error, WorkerError) and error.recoverable


def _serves_relays(provider: Provider) -> bool:
    """Whether the provider's Info says it serves chained routes (version 1 or later)."""
    version = provider.info.get("relay")
    return isinstance(version, int) and version >= 1


def _addresses(provider: Provider) -> list[str]:
    """The provider's listen addresses from its Info, the strings among them (hints for the
    worker before it on a chained route)."""
    addrs = provider.info.get("listen_addrs")
    return [a for a in addrs if isinstance(a, str)] if isinstance(addrs, list) else []


class MeshSession:
    """One generation on the mesh: its id, route, and every hop's inputs so far."""

    def __init__(self, session_id: int, hops: Sequence[Hop], max_len: int) -> None:
        self.id = session_id
        self.hops = list(hops)
        self.inputs: list[list[np.ndarray]] = [[] for _ in self.hops]
        self.max_len = max_len
        self.n_positions = 0
        self.steps = 0
        self.closed = False
        #: Cleared when a chained step broke where a hop-by-hop one then went through: the
        #: links between these workers fail where the End node's own do not.
        self.chained = True
        #: For a verified session, each hop's shadow (None where no second provider serves
        #: its layers); None for a session that is not verified.
        self.shadows: list[Hop | None] | None = None
        #: Every worker that may hold a cache of this session (hops, shadows, referees,
        #: providers rerouted away from), for `close_session`.
        self.peers: set[str] = {h.provider.peer_id for h in self.hops}


def _check_room(session: MeshSession, n: int) -> None:
    """Refuses a closed session, or `n` more positions than it holds."""
    if session.closed:
        raise ValueError("the session is closed")
    if session.n_positions + n > session.max_len:
        raise ContextOverflowError(f"{session.n_positions + n} positions needed, the session holds {session.max_len}")


class MeshPipeline:
    """Runs a model's layers on the workers of a mesh, reached through `node`."""

    #: Two batches in flight keep two stages busy: while one crosses a worker (or the End
    #: node's head), the other crosses the next.
    in_flight = 2

    def __init__(
        self,
        node: _native.Node,
        model: ModelIdentity,
        config: ModelConfig,
        *,
        wire_dtype: str = "f32",
        route_mode: str = "chain",
        request_timeout: float = 120.0,
        route_timeout: float = 30.0,
        verify: float = 0.0,
        verify_tolerance: float = VERIFY_TOLERANCE,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype {wire_dtype!r}; known: {', '.join(WIRE_DTYPES)}")
        if route_mode not in ROUTE_MODES:
            raise ValueError(f"route mode {route_mode!r}; known: {', '.join(ROUTE_MODES)}")
        if not 0.0 <= verify <= 1.0:
            raise ValueError(f"verify is a share of sessions, from 0 to 1; got {verify}")
        self.route_mode = route_mode
        #: How long a session whose layers lost every provider waits for one (a worker
        #: re-placing itself, `Worker.rebalance`) before it fails.
        self.route_timeout = route_timeout
        self.verify = verify
        self.verify_tolerance = verify_tolerance
        self.bans = Bans()
        #: What fetching the End model from the mesh read (`connect` from a model id), else None.
        self.fetched: Any = None
        #: Verified sessions, steps whose hops were compared, and mismatches found.
        self.verify_counts = {"sessions": 0, "hop_checks": 0, "mismatches": 0}
        # Sessions on several threads (the HTTP server) count and start shadows concurrently.
        self._verify_lock = threading.Lock()
        self._last_refresh = 0.0
        self._on_ban: list[Callable[[str, str], object]] = []
        self._shadow_pool: ThreadPoolExecutor | None = None
        self.node = node
        self.model = model
        self.n_layers = config.n_layers
        # Values per row entering each layer boundary (the hidden size, or wider: Gemma 4).
        self.row_widths = config.row_widths
        self.max_positions = config.max_positions
        self.wire_dtype = wire_dtype
        self.request_timeout = request_timeout
        self.providers: list[Provider] = []
        # Sessions on several threads (the HTTP server) mark failures concurrently.
        self._failed: dict[str, float] = {}
        self._failed_lock = threading.Lock()
        #: Sessions started here per provider (primaries and shadows), so that equally good
        #: providers take turns (`preference`).
        self._started: Counter[str] = Counter()
        #: What recovering sessions has cost: hops rerouted (their kept inputs replayed into
        #: other providers: `replayed_positions`, per new hop), and hops that followed a
        #: session handed over with its KV cache (`handovers`, nothing replayed) and the
        #: seconds their steps waited for it (`handover_wait_s`).
        #: Called when a worker has no room for a session: gives back what this End node keeps
        #: on the workers beyond its running generations (the prompt cache's sessions); True
        #: if it freed something, and the request is then sent again.
        self.make_room: Callable[[], bool] | None = None
        self.recovery = {"reroutes": 0, "replayed_positions": 0, "handovers": 0, "handover_wait_s": 0.0}
        self._recovery_lock = threading.Lock()
        self._on_close = on_close

    def on_ban(self, call: Callable[[str, str], object]) -> None:
        """Calls `call(peer, reason)` whenever a provider is banned."""
        self._on_ban.append(call)

    def close(self) -> None:
        """Stops the node (and whatever `on_close` releases). Idempotent."""
        if self._shadow_pool is not None:
            self._shadow_pool.shutdown(wait=False)
            self._shadow_pool = None
        self.node.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # --- discovery and routes ---------------------------------------------------------

    def _excluded(self) -> set[str]:
        now = time.monotonic()
        with self._failed_lock:
            self._failed = {p: t for p, t in self._failed.items() if now - t < _FAILED_COOLDOWN}
            return set(self._failed) | set(self.bans.reasons())

    def _count(self, key: str, amount: float = 1) -> None:
        with self._recovery_lock:
            self.recovery[key] += amount

    def _mark_failed(self, peer: str) -> None:
        with self._failed_lock:
            self._failed[peer] = time.monotonic()

    def refresh(self) -> list[Provider]:
        """Looks up the model's providers again (skipping ones that failed recently)."""
        self._last_refresh = time.monotonic()
        self.providers = discover(self.node, self.model, self.n_layers, exclude=self._excluded())
        return self.providers

    def route(self, start: int = 0, stop: int | None = None) -> list[Hop]:
        """A route over layers `start..stop` (default: all), refreshing providers when the
        known ones do not cover them. Raises NoRouteError naming the uncovered layers."""
        stop = self.n_layers if stop is None else stop
        try:
            return plan_route(self.providers, start, stop, self._excluded(), self._started)
        except NoRouteError:
            self.refresh()
            return plan_route(self.providers, start, stop, self._excluded(), self._started)

    def _route_when_covered(self, start: int, stop: int, poll: float = 0.5) -> list[Hop]:
        """A route over `start..stop`, waiting up to `route_timeout` while nobody serves some
        of those layers (their last provider just left; a spare worker takes them over)."""
        deadline = time.monotonic() + self.route_timeout
        while True:
            try:
                return self.route(start, stop)
            except NoRouteError as e:
                if time.monotonic() >= deadline:
                    raise NoRouteError(e.missing_layers, f"after {self.route_timeout:.0f} s: {e}") from None
                log.info("layers %s have no provider; waiting for one", format_layer_list(e.missing_layers))
            time.sleep(poll)

    def wait_for_route(self, timeout: float, poll: float = 0.5) -> list[Hop]:
        """Polls the DHT until the layers are covered or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            try:
                return plan_route(self.providers, 0, self.n_layers, self._excluded())
            except NoRouteError as e:
                if time.monotonic() >= deadline:
                    raise NoRouteError(e.missing_layers, f"after {timeout:.0f} s: {e}") from None
            time.sleep(poll)

    def missing_layers(self) -> list[int]:
        """Layers the known providers leave uncovered."""
        return missing_layers(self.providers, self.n_layers)

    # --- sessions ---------------------------------------------------------------------

    def new_session(self, max_len: int | None = None) -> MeshSession:
        """A session on a fresh route; workers create their caches on its first forward."""
        hops = self.route()
        session = MeshSession(secrets.randbits(128), hops, min(max_len or self.max_positions, self.max_positions))
        log.info("session %032x: route %s", session.id, describe_route(hops))
        with self._verify_lock:
            self._started.update(h.provider.peer_id for h in hops)
        if self.verify and random.random() < self.verify:
            session.shadows = [self._other_provider(hop, {hop.provider.peer_id}) for hop in hops]
            session.chained = False  # checks happen here, between hops
            with self._verify_lock:
                self.verify_counts["sessions"] += 1
                self._started.update(h.provider.peer_id for h in session.shadows if h is not None)
            log.info("session %032x: verified; shadows %s", session.id,
                     "; ".join(str(h) if h else "none" for h in session.shadows))
        return session

    def forward(self, session: MeshSession, hidden: np.ndarray) -> np.ndarray:
        """Runs hidden states through every hop, extending the session's caches there."""
        x = np.ascontiguousarray(hidden, dtype=np.float32)
        n, start = x.shape[0], session.n_positions
        _check_room(session, n)
        i, broke = 0, None
        if session.chained and self._chains(session.hops):
            outputs, error = self._chain(session.hops, [(session.id, session.steps, start, n)], x)
            for y in outputs:
                session.inputs[i].append(x)
                x, i = y, i + 1
            if error is not None:
                if not _recoverable(error):
                    raise error
                if not _handed_over(error):
                    broke = i  # a link failed (a hand-over is no reason to stop chaining)
                log.info("session %032x: the chained route broke at hop %d (%s); going on hop by hop", session.id, i, error)
        reroutes, rerouting, moves = 0, False, 0
        while i < len(session.hops):
            try:
                if rerouting:
                    self._reroute(session, i)
                    rerouting = False
                hop = session.hops[i]
                if hop.provider.peer_id in self.bans:
                    raise _HopFailed(hop.provider.peer_id, WorkerError("banned", "this provider was caught lying (--verify)"))
                y = self._send(session, hop, start, x) if session.shadows is None else self._checked(session, i, start, x)
            except _HopFailed as failure:
                if isinstance(failure, _HopMoved) and not rerouting and moves < _MAX_MOVES:
                    moved = self._follow(session, i, failure)
                    if moved:
                        moves += 1
                        continue
                if reroutes >= _MAX_REROUTES:
                    raise failure.error from None
                reroutes += 1
                log.warning("session %032x: %s failed (%s); rerouting", session.id, failure.peer, failure.error)
                self._mark_failed(failure.peer)
                rerouting = True
                continue
            session.inputs[i].append(x)
            x = y
            i += 1
        if broke is not None and reroutes == 0:
            session.chained = False
            log.warning("session %032x: hop by hop went through where the chain broke; no more chained steps", session.id)
        session.n_positions += n
        session.steps += 1
        return x

    def forward_batch(self, sessions: Sequence[MeshSession], hidden: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """Distinct sessions' rows (`counts[i]` rows of `sessions[i]`, stacked in order):
        sessions on the same route go through each hop as one request with an entry per
        session, so a worker runs them in one span call. Any failure raises before a
        session's state changes; the caller then runs the sessions one by one through
        `forward`, whose reroute and replay handle it (workers take the resent positions as
        retries)."""
        x = np.ascontiguousarray(hidden, dtype=np.float32)
        for session, n in zip(sessions, counts):
            _check_room(session, n)
            if session.shadows is not None:
                raise _RunAlone("a verified session's hops are checked one by one")
            if any(h.provider.peer_id in self.bans for h in session.hops):
                raise _RunAlone("a session's route goes through a banned provider")
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        out = np.empty_like(x)
        groups: dict[tuple, list[int]] = {}
        for i, session in enumerate(sessions):
            route = tuple((h.provider.peer_id, h.layers.start, h.layers.stop) for h in session.hops)
            groups.setdefault(route, []).append(i)
        kept: list[tuple[MeshSession, int, list[np.ndarray]]] = []
        for members in groups.values():
            rows = [r for i in members for r in range(bounds[i], bounds[i + 1])]
            entries = [(sessions[i].id, sessions[i].steps, sessions[i].n_positions, counts[i]) for i in members]
            y = x[rows]
            hops = sessions[members[0]].hops
            inputs = []
            if all(sessions[i].chained for i in members) and self._chains(hops):
                outputs, error = self._chain(hops, entries, y)
                if error is not None:
                    raise error
                inputs = [y, *outputs[:-1]]
                y = outputs[-1]
            else:
                for hop in hops:
                    inputs.append(y)
                    y = self._hop(hop, entries, y)
            out[rows] = y
            at = 0
            for i in members:
                n = counts[i]
                kept.append((sessions[i], n, [inp[at : at + n] for inp in inputs]))
                at += n
        # Every hop of every group answered: the sessions advance.
        for session, n, rows_in in kept:
            for k, part in enumerate(rows_in):
                session.inputs[k].append(part)
            session.n_positions += n
            session.steps += 1
        return out

    def rewind(self, session: MeshSession, n_positions: int) -> None:
        """Forgets the session's positions from `n_positions` on (rejected draft tokens),
        and their kept inputs. Nothing is sent: each worker cuts its cache back when the next
        step starts at an earlier position than it holds (the span protocol's retry rule)."""
        if not 0 <= n_positions <= session.n_positions:
            raise ValueError(f"cannot rewind a session of {session.n_positions} positions to {n_positions}")
        drop = session.n_positions - n_positions
        for inputs in session.inputs:
            left = drop
            while left:
                last = inputs[-1]
                if len(last) > left:
                    inputs[-1] = last[: len(last) - left]
                    break
                inputs.pop()
                left -= len(last)
        session.n_positions = n_positions

    def close_session(self, session: MeshSession) -> None:
        """Frees the session's caches on its workers (best effort: idle expiry is the net)."""
        if session.closed:
            return
        session.closed = True
        frame = _native.encode_close_session([session.id])

        def close_on(peer: str) -> None:
            try:
                self.node.request(peer, frame, timeout=5.0)
            except (NetworkError, RequestTimeoutError) as e:
                log.info("closing session %032x on %s: %s", session.id, peer, e)

        peers = list(dict.fromkeys([*(h.provider.peer_id for h in session.hops), *sorted(session.peers)]))
        if len(peers) == 1:
            close_on(peers[0])
        else:
            with ThreadPoolExecutor(max_workers=min(8, len(peers))) as ex:
                list(ex.map(close_on, peers))
        session.inputs.clear()

    def fork(self, session: MeshSession, n_positions: int) -> MeshSession:
        """A new session on the same route holding a copy of the session's first
        `n_positions` positions: each worker of the route copies its cache (`ForkSession`),
        and the End node the kept inputs. Raises the first refusal (no room, a worker gone),
        with the copies made closed again; a verified session is not forked."""
        if session.shadows is not None:
            raise ValueError("a verified session's shadows hold caches too: it is not forked")
        if not 0 < n_positions <= session.n_positions:
            raise ValueError(f"cannot fork {n_positions} positions of a session holding {session.n_positions}")
        child = MeshSession(secrets.randbits(128), session.hops, session.max_len)
        child.inputs = [[np.concatenate(kept)[:n_positions]] if kept else [] for kept in session.inputs]
        child.n_positions, child.steps, child.chained = n_positions, session.steps, session.chained
        frame = _native.encode_fork_session(session.id, child.id, n_positions)

        def fork_on(peer: str) -> BaseException | None:
            try:
                # A copy is one round trip; a worker that cannot answer soon costs only this
                # choice its shared prefill (it then prefills on its own).
                reply = _native.decode_frame(self.node.request(peer, frame, timeout=min(self.request_timeout, _FORK_TIMEOUT)))
            except Exception as e:  # noqa: BLE001 - reported below
                return e
            if reply["kind"] == "fork_session_ack" and reply["session"] == child.id:
                return None
            if reply["kind"] == "error":
                return WorkerError(reply["code"], reply["message"], peer)
            return WorkerError("invalid_request", f"answered a fork with a {reply['kind']} frame", peer)

        peers = list(dict.fromkeys(h.provider.peer_id for h in session.hops))
        with ThreadPoolExecutor(max_workers=min(8, len(peers))) as ex:
            errors = [e for e in ex.map(fork_on, peers) if e is not None]
        if errors:
            self.close_session(child)  # the copies some workers made (unknown ids are ignored)
            raise errors[0]
        return child

    # --- one hop ----------------------------------------------------------------------

    def _send(self, session: MeshSession, hop: Hop, start: int, x: np.ndarray) -> np.ndarray:
        """Runs `x` (positions `start..`) through one hop; the hop's output. While the hop's
        worker hands the session over, asks again; once it has, raises `_HopMoved` naming
        where it went. A failure another provider may serve raises `_HopFailed`."""
        peer = hop.provider.peer_id
        session.peers.add(peer)
        waiting_since, made_room = None, False
        while True:
            try:
                return self._hop(hop, [(session.id, session.steps, start, x.shape[0])], x)
            except (NetworkError, RequestTimeoutError, WorkerError) as e:
                full = isinstance(e, WorkerError) and e.code in ("cannot_hold_session", "overloaded")
                if full and not made_room and self.make_room is not None and self.make_room():
                    log.info("session %032x: %s had no room; gave back kept sessions, asking again", session.id, peer)
                    made_room = True
                    continue
                if isinstance(e, WorkerError) and e.code == "session_moving":
                    now = time.monotonic()
                    waiting_since = waiting_since or now
                    if now - waiting_since < self.request_timeout:
                        time.sleep(_MOVING_POLL)
                        continue
                if waiting_since is not None:
                    self._count("handover_wait_s", time.monotonic() - waiting_since)
                if isinstance(e, WorkerError) and e.code == "session_moved" and e.moved_to:
                    raise _HopMoved(peer, e, e.moved_to) from e
                if _recoverable(e):
                    raise _HopFailed(peer, e) from e
                raise

    def _follow(self, session: MeshSession, i: int, moved: _HopMoved) -> bool:
        """Points hop `i` at the worker its session was handed to (its cache is there: nothing
        to replay); False when that worker is not found serving the hop's layers."""
        old = session.hops[i]
        provider = self._provider(moved.to, old.layers)
        if provider is None:
            log.warning("session %032x: %s handed it to %s, which does not serve layers %d-%d", session.id,
                        moved.peer, moved.to, old.layers.start, old.layers.stop - 1)
            return False
        session.hops[i] = Hop(provider, old.layers)
        session.peers.add(moved.to)
        self._count("handovers")
        log.info("session %032x: layers %d-%d handed over from %s to %s with their KV cache (nothing replayed)",
                 session.id, old.layers.start, old.layers.stop - 1, moved.peer, moved.to)
        return True

    def _provider(self, peer: str, layers: range) -> Provider | None:
        """`peer` as a provider serving `layers`: as known, else looked up again, else (not
        announced yet) as it describes itself."""
        def known() -> Provider | None:
            return next((p for p in self.providers if p.peer_id == peer and p.serves(layers)), None)

        found = known()
        if found is None:
            self.refresh()
            found = known()
        if found is None and (described := describe_peers(self.node, [peer]).get(peer)) is not None:
            p = provider_from_info(peer, *described, self.model, self.n_layers)
            found = p if p is not None and p.serves(layers) else None
        return found

    def _replay(self, session: MeshSession, hop: Hop, history: np.ndarray) -> np.ndarray:
        """Runs a session's kept inputs `history` (positions 0..) through `hop` in chunks, so
        its cache holds what another provider's held; the outputs."""
        return np.concatenate(
            [self._send(session, hop, pos, history[pos : pos + _REPLAY_CHUNK]) for pos in range(0, len(history), _REPLAY_CHUNK)]
        )

    def _hop(self, hop: Hop, entries: list[tuple[int, int, int, int]], x: np.ndarray) -> np.ndarray:
        """One request through `hop`: `entries` (session id, step, first position, rows) for
        the rows of `x` in order; the hop's output rows. One native call: the frame, the
        round trip and the answer's checks happen in Rust without the GIL."""
        return self.node.forward(
            hop.provider.peer_id, self.model.digest, self.model.name, hop.layers.start, len(hop.layers), entries, x,
            wire_dtype=self.wire_dtype, timeout=self.request_timeout, width_out=self.row_widths[hop.layers.stop],
        )

    def _chains(self, hops: Sequence[Hop]) -> bool:
        """Whether a step through `hops` goes chained: the mode asks for it, there is more
        than one hop, every hop's worker serves relays and is not banned, and no worker comes
        twice (a relay refuses a route through itself; it happens when a worker a session
        used moved to the layers of a lost one, `Worker.rebalance`: hop by hop, the old hop
        then fails over with replay)."""
        return (
            self.route_mode == "chain"
            and len(hops) > 1
            and len({h.provider.peer_id for h in hops}) == len(hops)
            and all(_serves_relays(h.provider) and h.provider.peer_id not in self.bans for h in hops)
        )

    def _chain(
        self, hops: Sequence[Hop], entries: list[tuple[int, int, int, int]], x: np.ndarray
    ) -> tuple[list[np.ndarray], BaseException | None]:
        """One chained step through `hops`: each hop's output in order up to the first that
        failed, and that failure (None when all answered). One native call, GIL released."""
        route = [
            (h.provider.peer_id, _addresses(h.provider), h.layers.start, len(h.layers), self.row_widths[h.layers.stop])
            for h in hops
        ]
        return self.node.forward_chain(
            route, self.model.digest, self.model.name, entries, x, wire_dtype=self.wire_dtype, timeout=self.request_timeout
        )

    def _reroute(self, session: MeshSession, i: int) -> None:
        """Replaces hop `i` by a route over its layers through other providers, and replays
        the hop's kept inputs there so their caches hold what the lost one held."""
        old = session.hops[i]
        history = np.concatenate(session.inputs[i]) if session.inputs[i] else None
        new_hops = self._route_when_covered(old.layers.start, old.layers.stop)
        new_inputs: list[list[np.ndarray]] = []
        x = history
        for hop in new_hops:
            new_inputs.append([] if x is None else [x])
            if x is not None:
                x = self._replay(session, hop, x)
                self._count("replayed_positions", len(x))
        session.hops[i : i + 1] = new_hops
        session.inputs[i : i + 1] = new_inputs
        if session.shadows is not None:
            # The new hops' layers differ from the old one's: checking them would need new
            # shadows replayed; this session goes on unchecked there.
            session.shadows[i : i + 1] = [None] * len(new_hops)
        positions = 0 if history is None else len(history)
        self._count("reroutes")
        log.info("session %032x: layers %d-%d now on %s (%d positions replayed)", session.id,
                 old.layers.start, old.layers.stop - 1, describe_route(new_hops), positions)

    # --- honest-worker checks (verify) ---------------------------------------------------

    def _other_provider(self, hop: Hop, besides: set[str], *, look_again: bool = False) -> Hop | None:
        """A hop over `hop`'s layers on a provider not in `besides` (nor failed or banned),
        the one `preference` likes best; None when there is none, even after looking the
        providers up again (at most every `_REFRESH_GAP` seconds, unless `look_again`)."""
        for attempt in range(2):
            skip = besides | self._excluded()
            others = [p for p in self.providers if p.peer_id not in skip and p.serves(hop.layers)]
            if others:
                return Hop(min(others, key=lambda p: preference(p, self._started)), hop.layers)
            if attempt == 0 and (look_again or time.monotonic() - self._last_refresh > _REFRESH_GAP):
                self.refresh()
        return None

    def _checked(self, session: MeshSession, i: int, start: int, x: np.ndarray) -> np.ndarray:
        """Hop `i` on its provider and on its shadow at once; the output when they agree,
        else what a third provider decides (see `_arbitrate`). A failing primary raises
        `_HopFailed` as an unchecked hop does (once the shadow's step is over, so a reroute
        never meets it mid-step); a failing shadow leaves the hop unchecked, loudly."""
        assert session.shadows is not None
        hop, shadow = session.hops[i], session.shadows[i]
        if shadow is not None and shadow.provider.peer_id in self.bans:
            session.shadows[i] = shadow = None
        if shadow is None:
            return self._send(session, hop, start, x)
        with self._verify_lock:
            if self._shadow_pool is None:
                self._shadow_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="meshpy-shadow")
            shadowed = self._shadow_pool.submit(self._send, session, shadow, start, x)
        try:
            y = self._send(session, hop, start, x)
        except BaseException:
            wait([shadowed])
            session.shadows[i] = None
            raise
        try:
            z = shadowed.result()
        except (_HopFailed, MeshpyError) as e:
            log.warning("session %032x: shadow %s failed (%s); layers %d-%d go unchecked", session.id,
                        shadow.provider.peer_id, e, hop.layers.start, hop.layers.stop - 1)
            session.shadows[i] = None
            return y
        with self._verify_lock:
            self.verify_counts["hop_checks"] += 1
        if disagreement(y, z) <= self.verify_tolerance:
            return y
        return self._arbitrate(session, i, start, x, y, z)

    def _arbitrate(self, session: MeshSession, i: int, start: int, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Hop `i`'s provider answered `y`, its shadow `z`, and they disagree: a third
        provider, replayed to the session's state, runs the step; the one it disagrees with
        is banned and replaced by it. Raises VerificationError when no third provider exists,
        it fails, or it agrees with neither."""
        assert session.shadows is not None
        with self._verify_lock:
            self.verify_counts["mismatches"] += 1
        hop, shadow = session.hops[i], session.shadows[i]
        assert shadow is not None
        a, b = hop.layers.start, hop.layers.stop - 1
        pair = f"{hop.provider.peer_id} and {shadow.provider.peer_id}"
        referee = self._other_provider(hop, {hop.provider.peer_id, shadow.provider.peer_id}, look_again=True)
        if referee is None:
            raise VerificationError(f"layers {a}-{b}: {pair} disagree ({disagreement(y, z):.3g} of a row) "
                                    "and no third provider serves them to say which is right")
        history = np.concatenate(session.inputs[i]) if session.inputs[i] else None
        try:
            if history is not None:
                self._replay(session, referee, history)
                self._count("replayed_positions", len(history))
            r = self._send(session, referee, start, x)
        except (_HopFailed, MeshpyError) as e:
            raise VerificationError(f"layers {a}-{b}: {pair} disagree and the third provider "
                                    f"{referee.provider.peer_id} failed ({e})") from e
        dy, dz = disagreement(y, r), disagreement(z, r)
        tol = self.verify_tolerance
        where = f"layers {a}-{b}, step {session.steps} of session {session.id:032x}"
        if dy <= tol and dz <= tol:
            # The third sits between two that differ by up to twice the tolerance: nobody is
            # clearly wrong. Go on with the provider's output and keep checking.
            log.warning("%s: %s differ by %.3g of a row but both are within %g of %s", where, pair,
                        disagreement(y, z), tol, referee.provider.peer_id)
            return y
        if dy <= tol < dz:
            liar, out = shadow.provider.peer_id, y
            session.shadows[i] = referee
            others = f"{hop.provider.peer_id} and {referee.provider.peer_id}"
            off = dz
        elif dz <= tol < dy:
            liar, out = hop.provider.peer_id, z
            session.hops[i], session.shadows[i] = shadow, referee
            others = f"{shadow.provider.peer_id} and {referee.provider.peer_id}"
            off = dy
        else:
            raise VerificationError(f"{where}: {pair} and {referee.provider.peer_id} give three different outputs "
                                    f"({dy:.3g} and {dz:.3g} of a row from the third)")
        reason = f"its output differed from {others}'s by {off:.3g} of a row (tolerance {tol:g}) at {where}"
        self.bans.add(liar, reason)
        with self._verify_lock:
            calls = list(self._on_ban)
        for call in calls:
            call(liar, reason)
        return out
