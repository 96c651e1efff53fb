"""A worker: joins the mesh, picks its layers, loads only those (memory-mapped, repacked),
announces them in the DHT and serves them from Rust (no Python per token).

Without a model it runs in echo mode, returning hidden states unchanged, to test a network
with no weights.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from meshpy import _native
from meshpy.errors import InvalidArgumentError, MeshpyError, format_layer_list
from meshpy.generation import default_threads, model_path
from meshpy.gpu import check_device
from meshpy.metrics import MetricsServer, serve_node_metrics
from meshpy.mesh.fetch import Fetcher, FetchReport, fetch_part, fetcher_for, names_remote_model, seed
from meshpy.mesh.identity import WORKERS_KEY, ModelIdentity, model_identity
from meshpy.mesh.nodes import NodeDir, joins_by_lan, parse_bootstrap, start_node
from meshpy.mesh.placement import (
    choose_layers,
    device_memory,
    format_layers,
    format_size,
    layer_nbytes,
    layers_that_fit,
    parse_layers,
    parse_size,
)
from meshpy.mesh.routing import Provider, coverage_of, discover, layer_seconds, preference
from meshpy.mesh.store import ModelStore
from meshpy.models.config import ModelConfig, read_config
from meshpy.models.source import ModelSource, open_model_source
from meshpy.pipeline import LocalSpan
from meshpy.settings import WorkerSettings

__all__ = ["Worker"]

log = logging.getLogger(__name__)

#: Seconds idle compute threads spin between passes on a mesh node: none. Passes arrive at
#: least a network round trip apart, and nodes sharing cores would spin through each other's
#: turns (benches/bench_mesh.py, 2 workers on 2 cores: 2 ms spin 0.35x of one process,
#: 0.5 ms 0.6x, none 0.8x); a wake-up costs tens of microseconds.
MESH_IDLE_SPIN = 0.0

#: How often a worker that may move looks for layers nobody serves: a gap is closed within
#: about this plus loading the layers (the issue asks for 30 s in all).
REBALANCE_EVERY = 2.0

#: Longest one session's hand-over (its KV state sent, checked and loaded) may take.
HANDOVER_TIMEOUT = 60.0

#: A worker moves for throughput only when that raises the mesh's slowest layer's throughput
#: (the sum of its providers' speeds, which bounds every generation's) by this factor: the
#: measured speeds are noisy, and a move costs its sessions a hand-over.
THROUGHPUT_GAIN = 2.0

#: How long a worker moving for throughput waits for the End nodes of the sessions it handed
#: over to learn where they went (one told later replays instead).
MOVE_TELL_WAIT = 1.0


def best_window(throughput: list[float], layers: range, speed: float) -> tuple[range, float]:
    """Where a worker of `speed` now on `layers` raises the slowest layer's `throughput` (per
    layer, this worker included) most, moving its `len(layers)` contiguous layers: the window,
    and that slowest throughput after (its current layers when nothing does better)."""
    without = list(throughput)
    for i in layers:
        without[i] -= speed
    count, n = len(layers), len(throughput)

    def slowest_with(window: range) -> float:
        return min(t + (speed if i in window else 0.0) for i, t in enumerate(without))

    best, best_min = layers, slowest_with(layers)
    for start in range(n - count + 1):
        window = range(start, start + count)
        m = slowest_with(window)
        if m > best_min * (1 + 1e-9):
            best, best_min = window, m
    return best, best_min


class Worker:
    """A mesh worker running in this process. `start()` returns once it serves and has
    announced its layers; `close()` withdraws them and stops the node."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.node: _native.Node | None = None
        self.model: ModelIdentity | None = None
        self.layers: range | None = None
        #: The model's layer count, once a model is served.
        self.n_layers: int | None = None
        #: Seconds a decode step takes per layer here, measured at load.
        self.layer_seconds: float | None = None
        self._span: LocalSpan | None = None
        #: Its `/metrics` server, with --metrics-port.
        self.metrics: MetricsServer | None = None
        #: What `rebalance` needs to re-place this worker (source, config, KV budget), when it may.
        self._movable: tuple[ModelSource, ModelConfig, int] | None = None
        #: What fetching the model from the mesh read, for a worker started from a model id.
        self.fetched: FetchReport | None = None
        self._node_dir: NodeDir | None = None
        self._keys: list[str] = []
        self._stopped = threading.Event()

    def start(self) -> Worker:
        """Checks the settings and opens the model (failing before joining anything), then
        joins the mesh, places and loads the layers, serves and announces them."""
        s = self.settings
        check_device(s.device)
        kv_budget = parse_size(s.kv_budget)
        memory = parse_size(s.memory) if s.memory else None
        bootstrap = parse_bootstrap(s.bootstrap)
        model = None
        remote = s.model is not None and names_remote_model(s.model)
        if s.model is not None and not remote:
            source = open_model_source(model_path(s.model))
            config = read_config(source)
            layers = parse_layers(s.layers, config.n_layers) if s.layers else None
            model = (source, config, layers)
            self.model = model_identity(source)
        self.node, self._node_dir = start_node(s, "worker", bootstrap, lan=joins_by_lan(s.bootstrap), serves=True)
        if s.metrics_port is not None:
            self.metrics = serve_node_metrics(self.node, s.host, s.metrics_port)
        joined = bool(bootstrap) or bool(self.node.connected_peers())  # a mesh found on the local network
        try:
            if remote:
                assert s.model is not None
                fetcher = fetcher_for(self.node, s.model, ModelStore(s.store), joined=joined)
                assert fetcher is not None
                model = self._fetch(fetcher, kv_budget, device_memory(s.device, memory), joined)
            if model is None:
                self._serve_echo()
            else:
                self._serve_model(*model, kv_budget=kv_budget, memory=memory, has_peers=joined)
        except BaseException:
            self.close()
            raise
        return self

    def _fetch(self, fetcher: Fetcher, kv_budget: int, memory: int, has_peers: bool) -> tuple[ModelSource, ModelConfig, range]:
        """Fetches the model's manifest and metadata and the shared tensors a worker needs, then
        places its layers (as for a local file) and fetches just those."""
        s = self.settings

        def place(source: ModelSource, config: ModelConfig) -> range:
            self.model = model_identity(source)
            if s.layers:
                return parse_layers(s.layers, config.n_layers)
            return self._place(source, config, kv_budget, memory, has_peers)

        _, source, config, layers = fetch_part(fetcher, place)
        assert layers is not None
        self.fetched = fetcher.report
        return source, config, layers

    def _serve_echo(self) -> None:
        assert self.node is not None
        self.node.serve("echo", info=self._info())
        log.info("echo mode: returning hidden states unchanged")
        self._announce([WORKERS_KEY])

    def _serve_model(
        self, source: ModelSource, config: ModelConfig, layers: range | None, *, kv_budget: int, memory: int | None,
        has_peers: bool,
    ) -> None:
        assert self.node is not None and self.model is not None
        if layers is None:
            layers = self._place(source, config, kv_budget, device_memory(self.settings.device, memory), has_peers)
            # Placed by coverage (not pinned by --layers), from a whole local file: it may move.
            if self.settings.rebalance and self.fetched is None:
                self._movable = (source, config, kv_budget)
        self._load_and_serve(source, config, layers, kv_budget)

    def _load_and_serve(self, source: ModelSource, config: ModelConfig, layers: range, kv_budget: int) -> None:
        """Loads `layers`, serves them and announces them (and seeds their tensors)."""
        assert self.node is not None and self.model is not None
        s = self.settings
        pool = _native.ThreadPool(s.threads or default_threads(), idle_spin=MESH_IDLE_SPIN)
        self._span = LocalSpan(source, config, layers, pool, kv_dtype=s.kv_dtype, device=s.device)
        self.layers = layers
        self.n_layers = config.n_layers
        self.layer_seconds = self._span.decode_seconds(config.row_widths[layers.start]) / len(layers)
        info = self._info(model_id=self.model.id, model_layers=config.n_layers, weights_bytes=self._span.nbytes, device=self._span.device_name,
                          rebalances=self._movable is not None,
                          threads=pool.n_threads, kv_dtype=self._span.kv_dtype,
                          decode_ms_per_layer=round(self.layer_seconds * 1e3, 4),
                          fetched=self.fetched.to_json() if self.fetched is not None else None)
        self.node.serve(
            self._span.native,
            model_name=self.model.name,
            model_hash=self.model.digest,
            kv_budget_bytes=kv_budget,
            idle_timeout=s.idle_timeout,
            info=info,
            **self._peer_limits(),
        )
        log.info("announcing layers %s of %s (a decode step: %.3f ms per layer)", format_layers(layers), self.model.id,
                 self.layer_seconds * 1e3)
        self._announce([self.model.layer_key(i) for i in layers] + [WORKERS_KEY])
        mine = {n for i in layers for n in config.layer_names(i).values()} | set(self.model.manifest.get("shared", []))
        self._keys += seed(self.node, source, self.model, only=mine)

    def rebalance(self) -> range | None:
        """Re-places this worker when the mesh needs it elsewhere; the new layers, or None when
        it stays. Only workers placed by coverage move (Info `rebalances`; pinned ones never).

        - A gap: some layers have no live provider and every layer of this worker's has
          another. It moves to the least-covered window of as many layers as it holds
          (`choose_layers`, uncovered layers first). Of all the workers that could (each of
          their layers served elsewhere too), the one with the smallest peer id does, so one
          gap draws one worker. Its sessions are dropped at once (their End nodes are stuck on
          the gap and replay them on the other providers of its old layers).
        - Throughput: every generation crosses every layer, so the mesh runs no faster than
          its slowest layer, whose throughput is the sum of its providers' speeds (Petals'
          rule; speeds as each worker measured a decode step at load). When moving a worker
          would raise that minimum by `THROUGHPUT_GAIN`, the one with the smallest peer id among
          those whose move would moves, handing its sessions over first (`_throughput_move`)."""
        if self._movable is None or self.node is None or self.model is None or self.layers is None:
            return None
        source, config, kv_budget = self._movable
        n = config.n_layers
        others = discover(self.node, self.model, n)
        coverage = coverage_of(others, n)
        missing = [i for i in range(n) if coverage[i] == 0 and i not in self.layers]
        if not missing:
            layers = self._throughput_move(others, n)
            if layers is None:
                return None
            log.info("layers %s are the mesh's slowest; moving from layers %s to them", format_layers(layers),
                     format_layers(self.layers))
            self._hand_over_and_tell()
        else:
            if any(coverage[i] == 0 for i in self.layers):
                return None  # this worker is the only provider of some of its layers
            with_me = list(coverage)
            for i in self.layers:
                with_me[i] += 1
            # Workers that may move and would open no gap.
            movers = [self.peer_id] + [p.peer_id for p in others
                                       if p.info.get("rebalances") and all(with_me[i] >= 2 for i in p.layers)]
            if min(movers) != self.peer_id:
                return None  # another spare worker moves
            layers = choose_layers(coverage, len(self.layers))
            if layers == self.layers:
                return None
            log.info("layers %s lost their last provider; moving from layers %s to %s", format_layer_list(missing),
                     format_layers(self.layers), format_layers(layers))
        # The old layers go first, so the worker never needs memory for both ranges.
        self._withdraw()
        self.node.serve(None)
        self._span = None
        self.layers = layers
        self._load_and_serve(source, config, layers, kv_budget)
        return layers

    def _throughput_move(self, others: list[Provider], n: int) -> range | None:
        """Where this worker should move to raise the slowest layer's throughput by
        `THROUGHPUT_GAIN` (see `rebalance`), when it is the one that should; else None. Needs
        every provider's measured speed."""
        assert self.layers is not None and self.layer_seconds is not None and self.node is not None
        speeds = {p.peer_id: layer_seconds(p) for p in others}
        if any(v is None for v in speeds.values()):
            return None  # a worker that did not measure its speed: nothing to compare
        workers = [(p.peer_id, p.layers, 1.0 / speeds[p.peer_id], bool(p.info.get("rebalances"))) for p in others]
        workers.append((self.peer_id, self.layers, 1.0 / self.layer_seconds, True))
        throughput = [0.0] * n
        for _, layers, speed, _ in workers:
            for i in layers:
                throughput[i] += speed
        slowest = min(throughput)
        moves = {}
        for peer, layers, speed, movable in workers:
            if not movable:
                continue
            window, after = best_window(throughput, layers, speed)
            if window != layers and after >= THROUGHPUT_GAIN * slowest:
                moves[peer] = window
        if not moves or min(moves) != self.peer_id:
            return None
        return moves[self.peer_id]

    def _hand_over_and_tell(self) -> None:
        """Before moving: takes no new sessions, hands the held ones to the other providers of
        its layers, and waits up to `MOVE_TELL_WAIT` for their End nodes to learn where (those
        that stayed are dropped with the old layers: their End nodes replay them)."""
        assert self.node is not None
        if self.settings.hand_over and self.node.session_count():
            self.node.drain()
            self._hand_over()
            self._settle(time.monotonic() + MOVE_TELL_WAIT, until_ended=False)

    def _settle(self, deadline: float, *, until_ended: bool) -> int:
        """Waits until `deadline` at most for the End nodes of the sessions handed over to
        learn where they went, and (`until_ended`) for the sessions held to end; the sessions
        still held."""
        assert self.node is not None
        held = self.node.session_count()
        while ((until_ended and held) or self.node.moves_untold()) and time.monotonic() < deadline:
            time.sleep(0.02)
            held = self.node.session_count()
        return held

    def _peer_limits(self) -> dict[str, int]:
        """The per-peer session limits asked for; those not given keep the core's defaults."""
        s = self.settings
        limits = {}
        if s.peer_sessions is not None:
            limits["sessions_per_peer"] = s.peer_sessions
        if s.peer_kv is not None:
            limits["kv_bytes_per_peer"] = parse_size(s.peer_kv)
        return limits

    def _place(self, source: ModelSource, config: ModelConfig, kv_budget: int, memory: int, has_peers: bool) -> range:
        """The least-covered contiguous layers that fit `memory` (see `mesh.placement`)."""
        assert self.node is not None and self.model is not None
        per_layer = [layer_nbytes(source, config, i, self.settings.device) for i in range(config.n_layers)]
        count = layers_that_fit(per_layer, memory, kv_budget)
        if count == 0:
            room = "--memory" if self.settings.device in ("cpu", "torch-cpu") else f"{self.settings.device}'s free memory"
            raise InvalidArgumentError(
                f"{room} {format_size(memory)} holds no layer of {self.model.id} "
                f"(one needs {format_size(max(per_layer))} next to a {format_size(kv_budget)} KV budget "
                "and 150 MiB for the process)"
            )
        providers = discover(self.node, self.model, config.n_layers) if has_peers else []
        coverage = coverage_of(providers, config.n_layers)
        layers = choose_layers(coverage, count)
        log.info("room for %d of %d layers in %s; coverage now %s", count, config.n_layers, format_size(memory), coverage)
        return layers

    def _info(self, **extra: object) -> dict[str, object]:
        return {"device": self.settings.device, "version": _native.__version__, **extra}

    def _announce(self, keys: list[str]) -> None:
        assert self.node is not None
        for key in keys:
            self.node.start_providing(key)
            self._keys.append(key)

    @property
    def peer_id(self) -> str:
        assert self.node is not None, "the worker has not started"
        return self.node.peer_id

    def listen_addrs(self) -> list[str]:
        assert self.node is not None, "the worker has not started"
        return self.node.listen_addrs()

    def serve_forever(self) -> None:
        """Blocks until `close()` (from another thread or a signal handler), looking every
        `REBALANCE_EVERY` seconds (jittered, so spare workers do not look in step) for layers
        that lost their last provider (`rebalance`)."""
        while not self._stopped.wait(REBALANCE_EVERY * random.uniform(0.75, 1.25)):
            try:
                self.rebalance()
            except MeshpyError as e:
                log.warning("rebalancing: %s", e)

    def leave(self, timeout: float) -> bool:
        """Leaves without losing work: withdraws the announcements and takes no new sessions
        (End nodes start them elsewhere), hands each held session with its KV cache to another
        worker of its layers (`--hand-over`; its End node goes on there, replaying nothing),
        and waits up to `timeout` seconds for the End nodes of those to learn where they went
        and for the sessions that stayed to end; then stops the node. Sessions still held then
        move with replay (their End nodes reroute when this worker is gone). True if every
        session moved or ended in time."""
        if self.node is None:
            return True
        self.node.drain()
        self._withdraw()
        deadline = time.monotonic() + timeout
        held = self.node.session_count()
        log.info("leaving: no new sessions; %d held", held)
        moved = self._hand_over()
        held = self.node.session_count()
        if held:
            log.info("waiting up to %.0f s for %d held sessions to end", max(deadline - time.monotonic(), 0.0), held)
        held = self._settle(deadline, until_ended=True)
        if held:
            log.warning("leaving with %d sessions still held: their End nodes will move them, with replay", held)
        else:
            log.info("left: %d sessions handed over, the others ended", moved)
        self.close()
        return held == 0

    def _hand_over(self) -> int:
        """Hands the held sessions to the other providers of their layers (the least busy
        first), unless `--no-hand-over`; how many moved."""
        assert self.node is not None
        if not (self.settings.hand_over and self.node.session_count()):
            return 0
        assert self.model is not None and self.n_layers is not None
        others = sorted(discover(self.node, self.model, self.n_layers), key=lambda p: preference(p, {}))
        handed = self.node.hand_over([(p.peer_id, p.layers.start, len(p.layers)) for p in others], timeout=HANDOVER_TIMEOUT)
        for h in handed:
            if h["to"] is not None:
                log.info("handed session %032x over to %s: %d positions, %d bytes, requests held back %.1f ms",
                         h["session"], h["to"], h["positions"], h["bytes"], h["seconds"] * 1e3)
            else:
                log.warning("session %032x stays (its End node replays it elsewhere if this worker goes first): %s",
                            h["session"], h["error"])
        return sum(h["to"] is not None for h in handed)

    def _withdraw(self) -> None:
        """Stops announcing (best effort: records others hold expire with their TTL)."""
        assert self.node is not None
        for key in self._keys:
            try:
                self.node.stop_providing(key)
            except Exception as e:  # noqa: BLE001 - leaving either way
                log.debug("stop providing %s: %s", key, e)
        self._keys.clear()

    def close(self) -> None:
        """Withdraws the announcements (best effort) and stops the node. Idempotent."""
        self._stopped.set()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.node is not None:
            self._withdraw()
            self.node.close()
            self.node = None
        if self._node_dir is not None:
            self._node_dir.cleanup()
            self._node_dir = None

    def __enter__(self) -> Worker:
        return self.start() if self.node is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
