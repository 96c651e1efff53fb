"""The End node's live dashboard: `/dashboard` (one static page, dashboard.html) and
`/dashboard/state` (what it shows, as JSON, polled every two seconds): the mesh's workers and
who hosts which layers, each link's round trip and traffic, tokens per second, generations
running and waiting. The page's chat box talks to `/v1/chat/completions` like any client.

Every number comes from the same sources as `/metrics` (the server's counters, the client
node's `Info`) or from `mesh_status`, so the page and the metrics agree."""

from __future__ import annotations

import threading
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from meshpy.mesh.status import mesh_status

if TYPE_CHECKING:
    from meshpy.server.app import ServerState

__all__ = ["dashboard_routes", "Dashboard"]

#: Seconds a mesh view is reused (several open pages, quick reloads).
MESH_VIEW_TTL = 1.0
#: Seconds over which tokens per second and link traffic are averaged.
RATE_WINDOW = 10.0


class Dashboard:
    """What `/dashboard/state` answers, with the short history its rates need."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._mesh: tuple[float, dict[str, Any]] | None = None
        #: (time, completion tokens, {peer: bytes both ways}) samples, oldest first.
        self._samples: deque[tuple[float, float, dict[str, float]]] = deque()

    def _mesh_view(self) -> dict[str, Any] | None:
        node = self.state.node
        if node is None:
            return None
        with self._lock:
            if self._mesh is not None and time.monotonic() - self._mesh[0] < MESH_VIEW_TTL:
                return self._mesh[1]
        view = mesh_status(node, self.state.model.pipeline.model.id)  # type: ignore[attr-defined]
        with self._lock:
            self._mesh = (time.monotonic(), view)
        return view

    def _rates(self, tokens: float, traffic: dict[str, float]) -> tuple[float, dict[str, float]]:
        """Tokens per second and bytes per second per peer over the last `RATE_WINDOW`."""
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, tokens, traffic))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
                self._samples.popleft()
            t0, tokens0, traffic0 = self._samples[0]
        span = now - t0
        if span <= 0:
            return 0.0, {}
        return (tokens - tokens0) / span, {p: (b - traffic0.get(p, 0.0)) / span for p, b in traffic.items()}

    def snapshot(self) -> dict[str, Any]:
        """The page's data (blocking: run it on a thread)."""
        state = self.state
        config = state.model.config
        tokens = state.metrics.registry.get_sample_value("meshpy_completion_tokens_total") or 0.0  # as /metrics shows it
        node_info = state.node.local_info() if state.node is not None else {}
        traffic = {p: float(t.get("sent", 0) + t.get("received", 0)) for p, t in (node_info.get("traffic") or {}).items()}
        tokens_per_second, bytes_per_second = self._rates(tokens, traffic)
        view = self._mesh_view()
        if view is None:
            workers: list[dict[str, Any]] = []
            coverage = [1] * config.n_layers
        else:
            workers = [w for w in view["workers"] if w.get("mode") == "span"]
            coverage = [0] * config.n_layers
            for w in workers:
                for i in range(int(w["first_layer"]), int(w["first_layer"]) + int(w["n_layers"])):
                    if 0 <= i < config.n_layers:
                        coverage[i] += 1
        return {
            "model": state.model_name,
            "n_layers": config.n_layers,
            "on_mesh": view is not None,
            "generations_running": len(state.jobs),
            "requests_waiting": state.waiting,
            "completion_tokens": tokens,
            "tokens_per_second": tokens_per_second,
            "coverage": coverage,
            "workers": [
                {
                    "peer": w["peer"],
                    "first_layer": w["first_layer"],
                    "n_layers": w["n_layers"],
                    "sessions": w.get("sessions", 0),
                    "kv_used_bytes": w.get("kv_used_bytes", 0),
                    "kv_budget_bytes": w.get("kv_budget_bytes", 0),
                    "rtt_ms": w.get("rtt_ms"),
                    "link": w.get("link"),
                    "reachability": w.get("reachability", "unknown"),
                    "bytes_per_second": bytes_per_second.get(w["peer"], 0.0),
                    "traffic_bytes": traffic.get(w["peer"], 0.0),
                }
                for w in workers
            ],
        }


def dashboard_routes(state: ServerState) -> list[Route]:
    """`/dashboard` and `/dashboard/state` for the app serving `state`."""
    dashboard = Dashboard(state)
    page = resources.files("meshpy.server").joinpath("dashboard.html").read_text()

    async def show(request: Request) -> Response:
        return HTMLResponse(page)

    async def snapshot(request: Request) -> Response:
        state.check_key(request)
        return JSONResponse(await run_in_threadpool(dashboard.snapshot))

    return [Route("/dashboard", show, methods=["GET"]), Route("/dashboard/state", snapshot, methods=["GET"])]
