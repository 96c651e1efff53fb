"""Models fetched from the mesh (issue 13, parts 2, 3 and 5): a seeder serves the SmolLM2 GGUF;
workers and the End node start from its model id alone, each fetches only its part, and the
tokens are one process's. A seeder that flips a byte is caught by the hash and the tensor comes
from another; a model nobody seeds, and a partial store asked for layers it lacks, say so.

Real processes on 127.0.0.1: a bootstrap node, `meshpy seed` processes and `meshpy worker`s; the
End node runs here through `meshpy.mesh.connect`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshpy.errors import ModelFetchError, ModelSourceError
from meshpy.generation import Model
from meshpy.mesh import connect
from meshpy.mesh.identity import manifest_bytes, model_identity
from meshpy.mesh.launcher import LocalMesh, MeshProcess
from meshpy.mesh.nodes import start_node
from meshpy.mesh.store import ModelStore, parse_model_ref
from meshpy.models.source import open_model_source
from meshpy.pipeline import LocalSpan
from meshpy.settings import NodeSettings
from tests.test_mesh import greedy

PROMPT = "Name three colors of the rainbow."
TOKENS = 64
LAYERS = ("0-9", "10-19", "20-29")


def _seed(mesh: LocalMesh, model: Path, env: dict[str, str] | None = None) -> MeshProcess:
    args = ["seed", *mesh._node_args(), "--bootstrap", mesh.bootstrap_addr, "--model", str(model)]
    seeder = MeshProcess(f"seed {len(mesh.workers)}", args, {**mesh.env, **(env or {})})
    mesh.workers.append(seeder)  # stopped with the mesh
    seeder.wait_for(r"serves \S+@\S+", 120)
    return seeder


def _parts(gguf: Path) -> tuple[dict[str, int], list[list[str]], list[str], int]:
    """Each tensor's byte count, the tensors of each layer, the shared ones, and the metadata's
    bytes (manifest and GGUF key-values) a fetching node reads before any tensor."""
    source = open_model_source(gguf)
    manifest = model_identity(source).manifest
    sizes = {}
    for name in manifest["tensors"]:
        _, start, end = source.checkpoint.byte_range(name)
        sizes[name] = end - start
    assert source.checkpoint.metadata_end is not None
    return sizes, manifest["layers"], manifest["shared"], len(manifest_bytes(manifest)) + source.checkpoint.metadata_end


def _fetched(model: Model, worker_peer: str) -> dict:
    return model.pipeline.node.info(worker_peer)["fetched"]  # type: ignore[attr-defined]


def _layer_range(text: str) -> range:
    a, b = text.split("-")
    return range(int(a), int(b) + 1)


@pytest.fixture(scope="module")
def expected(smollm2_gguf: Path) -> list[int]:
    with Model.load(smollm2_gguf) as model:
        return greedy(model, PROMPT, TOKENS)


@pytest.mark.slow
def test_workers_and_the_end_node_fetch_only_their_part_from_one_seeder(
    smollm2_gguf: Path, expected: list[int], tmp_path: Path
) -> None:
    model_id = model_identity(open_model_source(smollm2_gguf)).id
    sizes, layers, shared, metadata_bytes = _parts(smollm2_gguf)
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        _seed(mesh, smollm2_gguf)
        # The last worker names the model by its name alone; the mesh resolves it to the id.
        names = [model_id, model_id, model_id.split("@")[0]]
        workers = [mesh.add_worker(name, layers=span, extra=["--store", str(tmp_path / f"w{i}")])
                   for i, (name, span) in enumerate(zip(names, LAYERS, strict=True))]
        status = subprocess.run([sys.executable, "-m", "meshpy", "status", "--bootstrap", mesh.bootstrap_addr, "--model", model_id],
                                capture_output=True, text=True, env=mesh.env, timeout=120)
        # The seeder and every worker (each for its part) seed the model.
        assert f"model {model_id} (30 layers): every layer has a provider; 4 node(s) seed it" in status.stdout, status
        with connect(model_id, mesh.bootstrap_addr, store=tmp_path / "end") as model:
            tokens = greedy(model, PROMPT, TOKENS)
            assert tokens == expected

            end_stored = ModelStore(tmp_path / "end").find(parse_model_ref(model_id))  # type: ignore[arg-type]
            assert end_stored is not None and end_stored.held == set(shared)  # never a layer
            end_share = sum(sizes[n] for n in shared)
            end_fetched = model.pipeline.fetched.fetched_bytes  # type: ignore[attr-defined]
            print(f"End node: fetched {end_fetched} bytes; its share {end_share}, metadata {metadata_bytes}")
            assert end_share <= end_fetched <= (end_share + metadata_bytes) * 1.05
            for i, (span, worker) in enumerate(zip(LAYERS, workers, strict=True)):
                peer = worker.wait_for(r"worker (\S+) listening").group(1)
                share = sum(sizes[n] for layer in _layer_range(span) for n in layers[layer])
                fetched = _fetched(model, peer)["fetched_bytes"]
                print(f"worker {i} (layers {span}): fetched {fetched} bytes; its share {share}")
                assert share <= fetched <= (share + metadata_bytes) * 1.05

                # The store holds its layers and the small shared tensors, nothing else, on disk too.
                stored = ModelStore(tmp_path / f"w{i}").find(parse_model_ref(model_id))  # type: ignore[arg-type]
                assert stored is not None
                held_layers = {int(m.group(1)) for n in stored.held if (m := re.match(r"blk\.(\d+)\.", n))}
                assert held_layers == set(_layer_range(span))
                assert not {"token_embd.weight", "output.weight"} & stored.held
                assert stored.disk_bytes() <= (share + metadata_bytes) * 1.05 + (1 << 20)

    # A stored part is a GGUF the engine loads; layers it lacks are refused, never read as zeros.
    stored = ModelStore(tmp_path / "w0").find(parse_model_ref(model_id))  # type: ignore[arg-type]
    assert stored is not None
    source = stored.source()
    assert model_identity(source).id == model_id
    from meshpy import _native
    from meshpy.models.config import read_config

    config = read_config(source)
    with pytest.raises(ModelSourceError, match="holds only part of the model"):
        LocalSpan(source, config, range(10, 20), _native.ThreadPool(1))


@pytest.mark.slow
def test_a_seeder_serving_a_flipped_byte_is_caught_and_the_tensor_fetched_elsewhere(
    smollm2_gguf: Path, expected: list[int], tmp_path: Path
) -> None:
    model_id = model_identity(open_model_source(smollm2_gguf)).id
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        liar = _seed(mesh, smollm2_gguf, env={"MESHPY_TEST_CORRUPT_BLOBS": "1"})
        assert "flips a byte" in liar.tail(50)
        _seed(mesh, smollm2_gguf)
        worker = mesh.add_worker(model_id, layers="0-29", extra=["--store", str(tmp_path / "w")])
        log = worker.tail(400)
        assert "banning seeder" in log and "do not match the manifest's hash" in log
        with connect(model_id, mesh.bootstrap_addr, store=tmp_path / "end") as model:
            tokens = greedy(model, PROMPT, TOKENS)
            peer = worker.wait_for(r"worker (\S+) listening").group(1)
            fetched = _fetched(model, peer)
    assert tokens == expected
    assert fetched["rejected_bytes"] > 0
    # The worker's store equals the file, tensor for tensor.
    stored = ModelStore(tmp_path / "w").find(parse_model_ref(model_id))  # type: ignore[arg-type]
    assert stored is not None
    original = open_model_source(smollm2_gguf).checkpoint
    part = stored.source().checkpoint
    for name in stored.held:
        assert part.tensor_bytes(name) == original.tensor_bytes(name), name


@pytest.mark.slow
def test_a_restarted_worker_fetches_only_what_its_store_lacks(smollm2_gguf: Path, tmp_path: Path) -> None:
    model_id = model_identity(open_model_source(smollm2_gguf)).id
    sizes, layers, _, _ = _parts(smollm2_gguf)
    store = ["--store", str(tmp_path / "w")]
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        _seed(mesh, smollm2_gguf)
        first = mesh.add_worker(model_id, layers="0-9", extra=store)
        first.stop()
        second = mesh.add_worker(model_id, layers="0-19", extra=store)
        peer = second.wait_for(r"worker (\S+) listening").group(1)
        node, node_dir = start_node(NodeSettings(port=0, host="127.0.0.1", transport="tcp"), "client",
                                    [mesh.bootstrap_addr], dht_server=False)
        try:
            fetched = node.info(peer)["fetched"]["fetched_bytes"]
        finally:
            node.close()
            node_dir.cleanup()
    more = sum(sizes[n] for layer in range(10, 20) for n in layers[layer])
    assert more <= fetched <= more * 1.05, (fetched, more)


def test_a_disk_too_small_says_so_before_downloading(smollm2_gguf: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({mounted.stderr.strip()}): needs root")
    try:
        model_id = model_identity(open_model_source(smollm2_gguf)).id
        with LocalMesh() as mesh:
            mesh.start_bootstrap()
            _seed(mesh, smollm2_gguf)
            with pytest.raises(ModelFetchError, match=r"need 2\d\.\d MiB on disk, but .* has [0-9.]+ [KM]iB free"):
                connect(model_id, mesh.bootstrap_addr, store=small)
        stored = ModelStore(small).find(parse_model_ref(model_id))  # type: ignore[arg-type]
        assert stored is not None and not stored.held  # nothing was downloaded
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.slow
def test_a_model_nobody_seeds_says_so(smollm2_gguf: Path, tmp_path: Path) -> None:
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        _seed(mesh, smollm2_gguf)
        unknown = "smollm2-135m-q4_1@0123456789ab"
        with pytest.raises(ModelFetchError, match="nobody seeds model smollm2-135m-q4_1@0123456789ab"):
            connect(unknown, mesh.bootstrap_addr, store=tmp_path / "end")
        with pytest.raises(Exception, match="nobody seeds model"):
            mesh.add_worker(unknown, layers="0-3", extra=["--store", str(tmp_path / "w")], timeout=60)
        assert "nobody seeds model" in mesh.workers[-1].tail(50)


def test_a_model_id_is_the_manifest_hash_in_any_store(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The store's layout comes from the manifest alone: a store made from another node's
    metadata opens with the same identity and tensor layout."""
    source = open_model_source(smollm2_gguf)
    identity = model_identity(source)
    prefix = smollm2_gguf.read_bytes()[: source.checkpoint.metadata_end]
    a = ModelStore(tmp_path / "a").create(manifest_bytes(identity.manifest), prefix)
    b = ModelStore(tmp_path / "b").create(manifest_bytes(identity.manifest), prefix)
    assert {n: r[1:] for n, r in a.layout().items()} == {n: r[1:] for n, r in b.layout().items()}
    assert a.weights[0].read_bytes()[:4096] == b.weights[0].read_bytes()[:4096]
    assert model_identity(a.source()).digest == identity.digest
    assert json.loads((a.dir / "meshpy-manifest.json").read_bytes()) == identity.manifest
    # Nothing held yet: the file is a hole past its header.
    assert a.disk_bytes() < (1 << 20) + len(prefix) * 2
