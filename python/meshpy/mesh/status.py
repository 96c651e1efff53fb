"""What a mesh says of itself, as data: its workers (each one's `Info`, round trip, how this
node reaches it, bans), End nodes that check it, and each model's uncovered layers. `meshpy
status` prints it; the End node's dashboard shows it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from meshpy import _native
from meshpy.mesh.fetch import seeds_key
from meshpy.mesh.identity import CHECKERS_KEY, WORKERS_KEY
from meshpy.mesh.routing import describe_peers

__all__ = ["mesh_status", "node_links"]


def mesh_status(node: _native.Node, wanted: str | None = None, wanted_layers: int = 0) -> dict[str, Any]:
    """What the mesh says of itself, as data: `answering` (workers that answered Info, of any
    model), `workers` (each worker's Info fields, `reachability` and `relayed_through` among
    them, its `peer`, `rtt_ms`, `link` (how this node reached it: "direct" or "relayed") and
    `banned_by` [{"end_node", "reason"}], in model and layer order; only
    model `wanted`'s when given), `silent_workers` (listed but not answering), `end_nodes`
    (those that check the mesh: `peer`, `verify`, `banned`), and `models` (`model_id`,
    `n_layers`, `uncovered_layers`, `seeders`)."""
    workers = [peer for peer, _ in node.get_providers(WORKERS_KEY)]
    infos = describe_peers(node, workers)
    links = node_links(node)
    end_nodes, bans = _bans(node)
    listed: list[dict[str, Any]] = []
    models: dict[str, tuple[int, list[range]]] = defaultdict(lambda: (0, []))
    for peer, (info, rtt) in sorted(infos.items(), key=lambda kv: (str(kv[1][0].get("model_id")), kv[1][0].get("first_layer", 0))):
        if wanted is not None and info.get("model_id") != wanted:
            continue
        listed.append({**info, "peer": peer, "rtt_ms": rtt * 1000, "banned_by": bans.get(peer, []), "link": links.get(peer)})
        if info.get("mode") == "span" and "model_id" in info:
            n, spans = models[info["model_id"]]
            first = int(info["first_layer"])
            spans.append(range(first, first + int(info["n_layers"])))
            models[info["model_id"]] = (max(n, int(info.get("model_layers", 0))), spans)
    if wanted is not None and wanted not in models:
        models[wanted] = (wanted_layers, [])
    coverage = [
        {
            "model_id": model_id,
            "n_layers": n_layers,
            "uncovered_layers": [i for i in range(n_layers) if not any(i in r for r in spans)],
            "seeders": len(node.get_providers(seeds_key(model_id))),
        }
        for model_id, (n_layers, spans) in sorted(models.items())
    ]
    return {
        "answering": len(infos),
        "silent_workers": len(workers) - len(infos),
        "workers": listed,
        "end_nodes": end_nodes,
        "models": coverage,
    }


def node_links(node: _native.Node) -> dict[str, str]:
    """How this node reaches each connected peer: "direct" when any connection is (a hole
    punched one included), else "relayed"."""
    links: dict[str, str] = {}
    for c in node.connections():
        if not c["relayed"] or c["peer"] not in links:
            links[c["peer"]] = "relayed" if c["relayed"] else "direct"
    return links


def _bans(node: _native.Node) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, str]]]]:
    """The End nodes that check the mesh (--verify), from their Info ([{"peer", "verify",
    "banned"}]), and the workers they banned: worker -> [{"end_node", "reason"}]."""
    bans: dict[str, list[dict[str, str]]] = defaultdict(list)
    end_nodes = []
    checkers = describe_peers(node, [peer for peer, _ in node.get_providers(CHECKERS_KEY)])
    for checker, (info, _rtt) in sorted(checkers.items()):
        # What an End node says of others is its claim; a malformed one is skipped.
        banned, verify = info.get("banned"), info.get("verify")
        if not isinstance(banned, dict) or not isinstance(verify, (int, float)):
            continue
        end_nodes.append({"peer": checker, "verify": float(verify), "banned": len(banned)})
        for peer, reason in banned.items():
            bans[str(peer)].append({"end_node": checker, "reason": str(reason)})
    return end_nodes, bans
