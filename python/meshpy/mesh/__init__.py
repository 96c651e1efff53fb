"""The mesh: workers hosting layer ranges, found through a Kademlia DHT, and End-model
clients routing sessions through them.

>>> from meshpy.mesh import connect
>>> model = connect("smollm2", bootstrap="/ip4/192.168.1.5/tcp/9000/p2p/12D3Koo...")  # doctest: +SKIP
>>> model.generate("Hello!", max_tokens=16).text                                     # doctest: +SKIP

Workers run with `meshpy worker` or in-process with `Worker(WorkerSettings(...)).start()`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from meshpy import _native
from meshpy.end_model import EndModel
from meshpy.gpu import check_device
from meshpy.generation import Model, default_threads, model_path
from meshpy.mesh.client import MeshPipeline, MeshSession
from meshpy.mesh.fetch import fetch_part, fetcher_for, names_remote_model
from meshpy.mesh.identity import CHECKERS_KEY, ModelIdentity, model_identity
from meshpy.mesh.nodes import joins_by_lan, parse_bootstrap, start_node
from meshpy.mesh.routing import Hop, Provider, describe_route
from meshpy.mesh.store import ModelStore
from meshpy.mesh.worker import MESH_IDLE_SPIN, Worker
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.settings import NodeSettings, WorkerSettings

__all__ = [
    "connect",
    "Worker",
    "WorkerSettings",
    "MeshPipeline",
    "MeshSession",
    "ModelIdentity",
    "model_identity",
    "Provider",
    "Hop",
    "describe_route",
]


def connect(
    model: str | os.PathLike[str],
    bootstrap: str | Sequence[str],
    *,
    threads: int | None = None,
    transport: str = "tcp",
    host: str = "127.0.0.1",
    wire_dtype: str = "f32",
    route: str = "chain",
    network_key: str | os.PathLike[str] | None = None,
    allow_peers: Sequence[str] = (),
    node_dir: str | os.PathLike[str] | None = None,
    route_timeout: float = 30.0,
    lanes: int | None = None,
    verify: float = 0.0,
    store: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> Model:
    """A `Model` whose End model runs here and whose layers run on the mesh joined through
    `bootstrap` (multiaddrs, or `"lan"`: the mesh mDNS finds on the local network); waits up to `route_timeout` seconds for workers to cover every layer (and as long, mid-generation, for a
    layer range whose last provider left to be taken over).

    `model` is the checkpoint the workers have (its hash names the model in the DHT; only
    embedding, final norm and head are loaded), or the model's id (`name@hash`, as `meshpy
    status` shows it): the End model's tensors are then fetched from the mesh's seeders into
    `store` (default `~/.cache/meshpy/models`) and the layers never come here; or a Hugging
    Face Hub repository (`org/repo`, `org/repo:Q4_K_M`), whose End-model tensors are downloaded
    the same way (see `mesh.hub`). `wire_dtype` "f32" gives exactly the
    single-process tokens; "bf16" halves the bytes on the wire. `route`: "chain" passes each
    step from worker to worker (N + 1 link crossings for N workers), "star" makes each worker a
    round trip from here (2N); both give the same tokens. `network_key`: the mesh's key file,
    for a mesh whose nodes hold one (TCP only). `allow_peers`: the only peers to talk to (peer
    ids, or files of them); `node_dir`: where this client keeps its identity, so that workers
    can name it in their allow lists (default: a new identity each time). `lanes`: batches of
    generations kept in flight at once (default `MeshPipeline.in_flight`). `verify`: the share
    of sessions whose every hop also runs on a second provider and is compared (a provider
    caught disagreeing is banned, and `meshpy status` shows why). `device`: where the embedding
    and head run ("cpu", or with torch: "cuda", "cuda:N", "torch-cpu"). Close the model to leave.
    """
    check_device(device)
    remote = names_remote_model(model)
    fetched = None
    if not remote:
        source = open_model_source(model_path(model))
    addrs = parse_bootstrap(bootstrap if isinstance(bootstrap, str) else " ".join(bootstrap))
    key = None if network_key is None else Path(network_key)
    settings = NodeSettings(port=0, host=host, transport=transport, network_key=key, allow_peer=tuple(allow_peers),
                            node_dir=None if node_dir is None else Path(node_dir))
    lan = isinstance(bootstrap, str) and joins_by_lan(bootstrap)
    node, identity_dir = start_node(settings, "client", addrs, lan=lan, dht_server=False)
    try:
        if remote:
            fetcher = fetcher_for(node, model, ModelStore(store))
            assert fetcher is not None
            source = fetch_part(fetcher, None)[1]
            fetched = fetcher.report
        config = read_config(source)
        identity = model_identity(source)
    except BaseException:
        node.close()
        identity_dir.cleanup()
        raise
    pipeline = MeshPipeline(node, identity, config, wire_dtype=wire_dtype, route_mode=route, verify=verify,
                            route_timeout=route_timeout,
                            on_close=identity_dir.cleanup)
    pipeline.fetched = fetched
    try:
        if verify:
            _announce_checks(pipeline)
        pipeline.wait_for_route(route_timeout)
        end = EndModel(source, config, _native.ThreadPool(threads or default_threads(), idle_spin=MESH_IDLE_SPIN), device)
        return Model(source, config, end, pipeline, lanes=lanes)
    except BaseException:
        pipeline.close()
        raise


def _announce_checks(pipeline: MeshPipeline) -> None:
    """Makes a checking End node findable (under `CHECKERS_KEY`) and its `Info` say what it
    checks and whom it banned and why, kept current as bans happen."""
    node = pipeline.node

    def describe(*_: object) -> None:
        node.serve(None, info={"role": "end", "verify": pipeline.verify, "banned": pipeline.bans.reasons()})

    describe()
    pipeline.on_ban(describe)
    node.start_providing(CHECKERS_KEY)
