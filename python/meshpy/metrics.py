"""Prometheus metrics (prometheus_client) of every node.

- A mesh node's own (`NodeCollector`, read from its `Info` at each scrape, so nothing is
  counted twice): frame bytes sent to and received from each peer, errors answered by code,
  chained relays run, whether it is reachable; a worker's sessions, KV cache bytes and budget,
  span calls, entries and seconds, sessions handed over and taken over.
- The End node's server (`ServerMetrics`): requests by route and status, prompt and completion
  tokens, generations by outcome, time to first token and inter-token latency histograms, and
  the queue (generations running, requests waiting); on a mesh, reroutes, replayed positions
  and hand-overs followed (`RecoveryCollector`).

Workers, bootstrap and seed nodes serve theirs with `--metrics-port` (`serve_node_metrics`);
the End node at `/metrics` of its HTTP server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshpy import _native

__all__ = ["NodeCollector", "RecoveryCollector", "ServerMetrics", "MetricsServer", "serve_node_metrics", "RequestCounter"]

log = logging.getLogger(__name__)

#: Time to first token buckets, seconds: a prefill of a short prompt on one box is tens of ms,
#: a long one through a mesh of slow links seconds.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Inter-token latency buckets, seconds (tokens kept from one verified draft arrive at once).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class NodeCollector(Collector):
    """A mesh node's metrics, read from `node.describe()` (its `Info`) at each scrape."""

    def __init__(self, node: _native.Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        info: dict[str, Any] = self.node.local_info()
        sent = CounterMetricFamily("meshpy_node_sent_bytes", "Tensor-protocol frame bytes sent to each peer", labels=["peer"])
        received = CounterMetricFamily("meshpy_node_received_bytes", "Tensor-protocol frame bytes received from each peer",
                                       labels=["peer"])
        for peer, t in sorted((info.get("traffic") or {}).items()):
            sent.add_metric([peer], float(t.get("sent", 0)))
            received.add_metric([peer], float(t.get("received", 0)))
        yield sent
        yield received
        refusals = CounterMetricFamily("meshpy_node_refusals", "Errors this node answered, by code", labels=["code"])
        for code, n in sorted((info.get("refusals") or {}).items()):
            refusals.add_metric([code], float(n))
        yield refusals
        yield CounterMetricFamily("meshpy_node_chain_relays", "Chained-route steps this node passed on",
                                  value=float(info.get("relays", 0)))
        reach = GaugeMetricFamily("meshpy_node_reachable", "1 for the node's reachability as peers' probes tell it",
                                  labels=["reachability"])
        reach.add_metric([str(info.get("reachability", "unknown"))], 1.0)
        yield reach
        if info.get("mode") != "span":
            return
        first, count = int(info.get("first_layer", 0)), int(info.get("n_layers", 0))
        yield GaugeMetricFamily("meshpy_worker_first_layer", "First layer this worker serves", value=first)
        yield GaugeMetricFamily("meshpy_worker_layers", "Layers this worker serves", value=count)
        yield GaugeMetricFamily("meshpy_worker_sessions", "Sessions this worker holds", value=float(info.get("sessions", 0)))
        yield GaugeMetricFamily("meshpy_worker_kv_bytes", "KV cache bytes held by its sessions",
                                value=float(info.get("kv_used_bytes", 0)))
        yield GaugeMetricFamily("meshpy_worker_kv_budget_bytes", "KV cache bytes all sessions may hold",
                                value=float(info.get("kv_budget_bytes", 0)))
        yield CounterMetricFamily("meshpy_worker_span_calls", "Forward passes of the span (batches)",
                                  value=float(info.get("span_calls", 0)))
        yield CounterMetricFamily("meshpy_worker_span_entries", "Session steps run (a batch counts each)",
                                  value=float(info.get("span_entries", 0)))
        yield CounterMetricFamily("meshpy_worker_span_seconds", "Seconds spent in forward passes",
                                  value=float(info.get("span_seconds", 0.0)))
        yield CounterMetricFamily("meshpy_worker_sessions_handed_over",
                                  "Sessions this worker handed to another with their KV caches (leaving)",
                                  value=float(info.get("handed_over", 0)))
        yield CounterMetricFamily("meshpy_worker_sessions_taken_over",
                                  "Sessions another worker handed to this one with their KV caches",
                                  value=float(info.get("taken_over", 0)))


class RecoveryCollector(Collector):
    """What keeping sessions alive has cost an End node on a mesh (`MeshPipeline.recovery`):
    hops rerouted and the positions replayed into new providers, and hops that followed a
    session a leaving worker handed over (nothing replayed) and the seconds they waited."""

    def __init__(self, recovery: Callable[[], dict[str, float]]) -> None:
        self.recovery = recovery

    def collect(self) -> Iterator[Metric]:
        r = self.recovery()
        yield CounterMetricFamily("meshpy_mesh_reroutes", "Hops moved to other providers with replay (a worker failed)",
                                  value=float(r["reroutes"]))
        yield CounterMetricFamily("meshpy_mesh_replayed_positions", "Positions replayed into new providers' caches",
                                  value=float(r["replayed_positions"]))
        yield CounterMetricFamily("meshpy_mesh_handovers", "Hops that followed a session handed over with its KV cache",
                                  value=float(r["handovers"]))
        yield CounterMetricFamily("meshpy_mesh_handover_wait_seconds", "Seconds steps waited while sessions were handed over",
                                  value=float(r["handover_wait_s"]))


class MetricsServer:
    """`/metrics` of a node without an HTTP server of its own, on a thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def serve_node_metrics(node: _native.Node, host: str, port: int) -> MetricsServer:
    """Serves `node`'s metrics at `http://host:port/metrics` (port 0: a free one)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    server = MetricsServer(registry, host, port)
    log.info("metrics at %s", server.url)
    return server


class ServerMetrics:
    """The End node server's metrics, in a registry of its own (no global state). `running`
    and `waiting` are read when scraped; `node`, when the layers run on a mesh, adds the
    client node's own (`NodeCollector`)."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], node: _native.Node | None = None,
                 recovery: Callable[[], dict[str, float]] | None = None, kept: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("meshpy_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("meshpy_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_tokens = Counter("meshpy_prompt_cached_tokens",
                                     "Prompt tokens not prefilled: a kept session held them (prompt caching)", registry=r)
        self.completion_tokens = Counter("meshpy_completion_tokens", "Tokens generated", registry=r)
        self.generations = Counter("meshpy_generations", "Generations ended, by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("meshpy_time_to_first_token_seconds", "From a generation's start to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("meshpy_inter_token_latency_seconds", "Between consecutive tokens of a generation",
                             buckets=ITL_BUCKETS, registry=r)
        running_gauge = Gauge("meshpy_generations_running", "Generations running now", registry=r)
        running_gauge.set_function(lambda: float(running()))
        waiting_gauge = Gauge("meshpy_requests_waiting", "Requests waiting for a generation slot", registry=r)
        waiting_gauge.set_function(lambda: float(waiting()))
        if kept is not None:
            kept_gauge = Gauge("meshpy_prompt_cache_sessions", "Sessions kept for prompts that start the same way",
                               registry=r)
            kept_gauge.set_function(lambda: float(kept()))
        if node is not None:
            r.register(NodeCollector(node))
        if recovery is not None:
            r.register(RecoveryCollector(recovery))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.completion_tokens.inc()

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.completion_tokens.inc()

    def ended(self, outcome: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        self.generations.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)


class RequestCounter:
    """ASGI middleware counting each HTTP response by route and status into `counter`; paths
    outside `routes` count as "other" (so unknown URLs cannot grow the label set)."""

    def __init__(self, app: ASGIApp, counter: Counter, routes: tuple[str, ...]) -> None:
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
