"""`meshpy bootstrap`, `meshpy seed`, `meshpy worker` and `meshpy status`: running and inspecting a mesh."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
import threading
from typing import Any

from meshpy.errors import InvalidArgumentError, format_layer_list
from meshpy.mesh.fetch import cannot_seed, seed
from meshpy.mesh.hub import HubFetcher, hub_ref
from meshpy.mesh.store import ModelStore, model_ref
from meshpy.mesh.identity import model_identity
from meshpy.mesh.nodes import NodeDir, joins_by_lan, parse_bootstrap, start_node
from meshpy.mesh.placement import format_size
from meshpy.mesh.status import mesh_status
from meshpy.metrics import serve_node_metrics
from meshpy.mesh.worker import Worker
from meshpy.generation import model_path
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy import _native
from meshpy.cli.signals import stop_on_sigterm
from meshpy.settings import BootstrapSettings, KeygenSettings, NodeSettings, SeedSettings, StatusSettings, WorkerSettings

__all__ = ["run_bootstrap", "run_seed", "run_worker", "run_status", "run_keygen"]

log = logging.getLogger(__name__)


def run_bootstrap(settings: BootstrapSettings) -> int:
    """Starts a rendezvous node, prints its addresses, and runs until stopped."""
    stop_on_sigterm()
    node, node_dir = start_node(settings, "bootstrap")
    return _serve_until_stopped(node, node_dir, f"meshpy bootstrap node {node.peer_id}; join with --bootstrap and one of:",
                                settings)


def _serve_until_stopped(node: _native.Node, node_dir: NodeDir, banner: str, settings: NodeSettings) -> int:
    """Prints `banner` (stderr) and the node's addresses (stdout), then serves (and its
    metrics, with --metrics-port) until stopped."""
    metrics = None
    try:
        if settings.metrics_port is not None:
            metrics = serve_node_metrics(node, settings.host, settings.metrics_port)
        print(banner, file=sys.stderr)
        for addr in node.listen_addrs():
            print(addr, flush=True)
        threading.Event().wait()
    finally:
        if metrics is not None:
            metrics.close()
        node.close()
        node_dir.cleanup()
    return 0


def run_seed(settings: SeedSettings) -> int:
    """Serves a model's file over the blob protocol and runs until stopped."""
    stop_on_sigterm()
    if settings.model is None:
        raise InvalidArgumentError("meshpy seed needs --model: the GGUF file to serve")
    if not Path(settings.model).expanduser().exists() and hub_ref(settings.model) is not None:
        raise InvalidArgumentError(f"{settings.model} is a Hub repository: each node fetches it from the Hub (seed a file here)")
    source = open_model_source(model_path(settings.model))
    identity = model_identity(source)
    why = cannot_seed(source, identity)
    if why is not None:
        raise InvalidArgumentError(f"{source.path} cannot be served to peers: {why}")
    node, node_dir = start_node(settings, "seed", parse_bootstrap(settings.bootstrap), lan=joins_by_lan(settings.bootstrap),
                                 serves=True)
    try:
        seed(node, source, identity)
    except BaseException:
        node.close()
        node_dir.cleanup()
        raise
    return _serve_until_stopped(node, node_dir, f"meshpy seed {node.peer_id} serves {identity.id} (start workers with "
                                                f"--model {identity.id}); listening on:", settings)


def run_worker(settings: WorkerSettings) -> int:
    """Starts a worker and serves until stopped."""
    stop_on_sigterm()
    worker = Worker(settings)
    try:
        worker.start()
        print(f"meshpy worker {worker.peer_id} listening on:", file=sys.stderr)
        for addr in worker.listen_addrs():
            print(addr, flush=True)
        try:
            worker.serve_forever()
        except KeyboardInterrupt:
            # SIGTERM or Ctrl-C: leave without losing work; a second one stops at once.
            worker.leave(settings.drain_timeout)
    finally:
        worker.close()
    return 0


def _describe(info: dict[str, Any]) -> str:
    mode = info.get("mode")
    if mode == "span":
        first, count = int(info["first_layer"]), int(info["n_layers"])
        return (
            f"{info.get('model_id', info.get('model_name'))} layers {first}-{first + count - 1} "
            f"({info.get('device', '?')}, {info.get('sessions', 0)} sessions, "
            f"KV {format_size(int(info.get('kv_used_bytes', 0)))} of {format_size(int(info.get('kv_budget_bytes', 0)))})"
            + (", leaving" if info.get("draining") else "")
            + _refusals(info)
        )
    return ("echo mode" if mode == "echo" else str(mode)) + _refusals(info)


def _reach(info: dict[str, Any]) -> str:
    """`; behind a NAT, via relay 12D3..; reached relayed` and the like."""
    out = ""
    if info.get("reachability") == "private":
        relays = info.get("relayed_through") or []
        out += "; behind a NAT, " + (f"via relay {', '.join(map(str, relays))}" if relays else "no relay: unreachable")
    if info.get("link"):
        out += f"; reached {info['link']}"
    return out


def _refusals(info: dict[str, Any]) -> str:
    """The errors a node has answered, by code: ``; refused 3 overloaded, 1 malformed_frame``."""
    refusals = info.get("refusals")
    if not isinstance(refusals, dict):
        return ""
    counts = sorted(((str(k), v) for k, v in refusals.items() if isinstance(v, int)), key=lambda kv: -kv[1])
    return "; refused " + ", ".join(f"{n} {code}" for code, n in counts) if counts else ""


def run_status(settings: StatusSettings) -> int:
    """Prints every worker, its addresses and layers, then each model's uncovered layers (as
    text, or with --json as one JSON object: `mesh_status`)."""
    node, node_dir = start_node(
        NodeSettings(port=0, host="127.0.0.1", transport=settings.transport, network_key=settings.network_key,
                     allow_peer=settings.allow_peer), "status",
        parse_bootstrap(settings.bootstrap),
        lan=joins_by_lan(settings.bootstrap),
        dht_server=False,
    )
    try:
        wanted, wanted_layers = None, 0
        if settings.model is not None:
            ref = model_ref(settings.model)
            hub = hub_ref(settings.model)
            if ref is not None and ref.hash_prefix:
                wanted = ref.id
            elif hub is not None:  # its headers only, as a worker reads them
                stored = HubFetcher(hub, ModelStore()).open()
                wanted, wanted_layers = stored.identity.id, len(stored.manifest["layers"])
            else:
                source = open_model_source(model_path(settings.model))
                wanted, wanted_layers = model_identity(source).id, read_config(source).n_layers
        status = mesh_status(node, wanted, wanted_layers)
    finally:
        node.close()
        node_dir.cleanup()
    if settings.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    for end in status["end_nodes"]:
        print(f"End node {end['peer']} checks {end['verify']:.0%} of its sessions; {end['banned']} worker(s) banned")
    print(f"{status['answering']} worker(s) answering ({status['silent_workers']} listed but silent)")
    for info in status["workers"]:
        print(f"{info['peer']}: {_describe(info)}, round trip {info['rtt_ms']:.1f} ms{_reach(info)}")
        for ban in info["banned_by"]:
            print(f"    BANNED by End node {ban['end_node']}: {ban['reason']}")
        for addr in info.get("listen_addrs", []):
            print(f"    {addr}")
    for model in status["models"]:
        missing = model["uncovered_layers"]
        gaps = f"no provider for layers {format_layer_list(missing)}" if missing else "every layer has a provider"
        print(f"model {model['model_id']} ({model['n_layers']} layers): {gaps}; {model['seeders']} node(s) seed it")


def run_keygen(settings: KeygenSettings) -> int:
    """Writes a new network key and says how to use it."""
    fingerprint = _native.generate_network_key(str(settings.path))
    print(f"network key {fingerprint} written to {settings.path}; give it to every node of the mesh "
          f"(--network-key {settings.path}, or MESHPY_NETWORK_KEY)")
    return 0
