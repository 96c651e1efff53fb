"""A mesh across machines with no address given: network namespaces as hosts on one local
network (a bridge); workers find each other by mDNS, place themselves by the coverage they
find, and an End node that joins with `--bootstrap lan` generates the one-process tokens. A
network key splits one local network into separate meshes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshpy
from meshpy import _native
from meshpy.generation import Model
from meshpy.mesh.launcher import MeshProcess
from tests.fixtures.netns import Network, why_not_available
from tests.test_mesh import KV_BUDGET, PROMPT, greedy, ten_layer_memory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_not_available() is not None, reason=f"no network namespaces: {why_not_available()}"),
]

N_TOKENS = 24

#: The End node: joins the local network's mesh and prints its greedy tokens.
END_NODE = """
import json, sys
import numpy as np
import meshpy.mesh
model = meshpy.mesh.connect(sys.argv[1], "lan", threads=1, route=sys.argv[2])
session = model.new_session()
logits = model.prefill(session, model.encode(sys.argv[3]))
tokens = []
for _ in range(int(sys.argv[4])):
    tokens.append(int(np.argmax(model.end.samplable(logits))))
    logits = model.step(session, tokens[-1])
model.close()
print(json.dumps(tokens))
"""


def env_for(data: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(meshpy.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    env["MESHPY_DATA_DIR"] = str(data)
    env.pop("MESHPY_MDNS", None)
    return env


@pytest.fixture()
def lan() -> Iterator[tuple[Network, list[str]]]:
    """Five hosts on one bridge, 10.77.1.1 to .5."""
    with Network() as net:
        net.bridge("lan")
        hosts = [net.host(f"h{i}") for i in range(1, 6)]
        for i, ns in enumerate(hosts, 1):
            net.attach(ns, "lan", f"10.77.1.{i}/24")
        yield net, hosts


def test_workers_on_one_lan_find_each_other_and_serve_the_one_process_tokens(
    lan: tuple[Network, list[str]], smollm2_gguf: Path, tmp_path: Path
) -> None:
    net, hosts = lan
    env = env_for(tmp_path / "data")
    memory = ten_layer_memory(smollm2_gguf)
    workers: list[MeshProcess] = []
    try:
        # No --bootstrap anywhere: the first worker finds no mesh and starts one; each next one
        # finds the others by mDNS and takes the layers nobody serves yet.
        for i, ns in enumerate(hosts[:3]):
            worker = MeshProcess(f"worker {i}", ["worker", "--model", str(smollm2_gguf), "--memory", str(memory),
                                                 "--kv-budget", str(KV_BUDGET), "--threads", "1", "--port", "0",
                                                 "--transport", "tcp"], env, prefix=net.prefix(ns))
            workers.append(worker)
            worker.wait_for(r"announcing layers", 120)
            found = "no mesh on the local network yet" if i == 0 else r"joined the mesh on the local network through \d+ node"
            worker.wait_for(found, 5)
        layers = sorted(w.wait_for(r"announcing layers (\d+)-(\d+)", 1).group(0) for w in workers)
        assert layers == ["announcing layers 0-9", "announcing layers 10-19", "announcing layers 20-29"], layers
        expected = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, N_TOKENS)
        for route in ("chain", "star"):
            end = net.run(hosts[3], [sys.executable, "-c", END_NODE, str(smollm2_gguf), route, PROMPT, str(N_TOKENS)],
                          env=env, timeout=300)
            assert end.returncode == 0, end.stderr[-3000:]
            assert json.loads(end.stdout) == expected, route

        # A second mesh on the same network, separated by its key: its worker and the first
        # mesh never join, and `status` on each side sees its own workers only.
        key = tmp_path / "other.key"
        _native.generate_network_key(str(key))
        keyed = MeshProcess("keyed worker", ["worker", "--model", str(smollm2_gguf), "--kv-budget", str(KV_BUDGET),
                                             "--threads", "1", "--port", "0", "--network-key", str(key)], env,
                            prefix=net.prefix(hosts[4]))
        workers.append(keyed)
        keyed.wait_for(r"no mesh on the local network yet", 120)
        keyed.wait_for(r"announcing layers 0-29", 120)

        def status(*extra: str) -> dict:
            run = net.run(hosts[3], [sys.executable, "-m", "meshpy", "status", "--bootstrap", "lan", "--json", *extra],
                          env=env, timeout=120)
            assert run.returncode == 0, run.stderr[-3000:]
            return json.loads(run.stdout)

        open_mesh = status()
        assert open_mesh["answering"] == 3 and open_mesh["models"][0]["uncovered_layers"] == []
        keyed_mesh = status("--network-key", str(key))
        assert keyed_mesh["answering"] == 1 and [w["first_layer"] for w in keyed_mesh["workers"]] == [0]
    finally:
        for worker in workers:
            worker.stop()
