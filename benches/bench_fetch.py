"""Fetching a model from the mesh (issue 13): one seeder holds the GGUF; workers and the End
node start from the model id alone, each fetching only its part over loopback.

    PYTHONPATH=python python benches/bench_fetch.py [--model /work/models/llama8b-q4_k.gguf]
                                                    [--workers 3] [--tokens 4] [--keep]

Per node: bytes fetched against its share (its layers' tensors, or for the End node the
shared ones) plus the metadata every node reads first (manifest and GGUF key-values), the
time its fetch took and the rate; what its store takes on disk (a sparse file: the
tensors it did not fetch take no room) against the whole file; and that its store holds
exactly its layers. Yardsticks measured in the same run: reading the seeder's file from the
page cache, and one TCP stream on loopback moving the same bytes. With `--tokens N`, the mesh
then decodes N greedy tokens and checks them against the one-process engine on the file.

Every node is a process of its own on this machine's cores (the End node this one); the
seeder hashes the file first (cached after the first run, `$MESHPY_CACHE_DIR`).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from meshpy.mesh import connect  # noqa: E402
from meshpy.mesh.identity import manifest_bytes, model_identity  # noqa: E402
from meshpy.mesh.launcher import LocalMesh, MeshProcess  # noqa: E402
from meshpy.mesh.nodes import start_node  # noqa: E402
from meshpy.mesh.store import ModelStore, parse_model_ref  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.settings import NodeSettings  # noqa: E402

MiB = 1 << 20


def loopback_rate(nbytes: int) -> float:
    """Bytes per second one TCP stream moves over loopback (1 MiB writes)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4 * MiB):
                received[0] += len(data)

    t = threading.Thread(target=sink)
    t.start()
    block = os.urandom(MiB)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        for _ in range(nbytes // MiB):
            c.sendall(block)
    t.join()
    server.close()
    return received[0] / (time.perf_counter() - start)


def file_rate(path: Path) -> float:
    """Bytes per second reading `path` (from the page cache after the seeder hashed it)."""
    start = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 * MiB):
            n += len(chunk)
    return n / (time.perf_counter() - start)


def greedy(model, n: int) -> list[int]:  # noqa: ANN001 - a meshpy Model
    """`n` greedy tokens of a fixed prompt, not stopping at end of turn."""
    import numpy as np

    session = model.new_session()
    try:
        logits = model.prefill(session, model.encode("The capital of France is"))
        out = []
        for _ in range(n):
            out.append(int(np.argmax(model.end.samplable(logits))))
            logits = model.step(session, out[-1])
        return out
    finally:
        model.close_session(session)


def even_split(n_layers: int, parts: int) -> list[range]:
    bounds = [round(i * n_layers / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/work/models/llama8b-q4_k.gguf"))
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=0, help="greedy tokens to decode through the mesh and check")
    parser.add_argument("--store", type=Path, default=None, help="where the nodes' stores go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args()

    source = open_model_source(args.model)
    t0 = time.perf_counter()
    identity = model_identity(source)
    print(f"model {identity.id}: {args.model} ({source.path.stat().st_size / MiB:.0f} MiB); identity in {time.perf_counter() - t0:.1f} s")
    manifest = identity.manifest
    size = {n: source.checkpoint.byte_range(n)[2] - source.checkpoint.byte_range(n)[1] for n in manifest["tensors"]}
    metadata_bytes = len(manifest_bytes(manifest)) + (source.checkpoint.metadata_end or 0)
    n_layers = len(manifest["layers"])
    spans = even_split(n_layers, args.workers)
    root = args.store or Path(tempfile.mkdtemp(prefix="meshpy-bench-fetch-", dir="/work" if Path("/work").is_dir() else None))
    print(f"stores under {root}; metadata every node reads first: {metadata_bytes / MiB:.2f} MiB")
    print(f"yardsticks: page-cache read of the file {file_rate(args.model) / MiB:.0f} MiB/s; "
          f"one loopback TCP stream {loopback_rate(1 << 30) / MiB:.0f} MiB/s")

    rows = []
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        seeder = MeshProcess("seed", ["seed", *mesh._node_args(), "--bootstrap", mesh.bootstrap_addr, "--model", str(args.model)], mesh.env)
        mesh.workers.append(seeder)
        seeder.wait_for(r"serves \S+@\S+", 1800)
        peers = []
        for i, span in enumerate(spans):
            layers = f"{span.start}-{span.stop - 1}"
            t = time.perf_counter()
            worker = mesh.add_worker(identity.id, layers=layers, kv_budget="64MiB", threads=1,
                                     extra=["--store", str(root / f"worker{i}")], timeout=1800)
            seconds = time.perf_counter() - t
            peers.append(worker.wait_for(r"worker (\S+) listening").group(1))
            share = sum(size[n] for layer in span for n in manifest["layers"][layer])
            rows.append((f"worker {i} (layers {layers})", root / f"worker{i}", share, seconds, span))
        node, node_dir = start_node(NodeSettings(port=0, host="127.0.0.1", transport="tcp"), "client", [mesh.bootstrap_addr], dht_server=False)
        fetched = [node.info(p)["fetched"] for p in peers]
        node.close()
        node_dir.cleanup()
        t = time.perf_counter()
        with connect(identity.id, mesh.bootstrap_addr, store=root / "end", threads=1) as model:
            end_seconds = time.perf_counter() - t
            fetched.append(model.pipeline.fetched.to_json())  # type: ignore[attr-defined]
            rows.append(("End node", root / "end", sum(size[n] for n in manifest["shared"]), end_seconds, range(0)))
            if args.tokens:
                mesh_tokens = greedy(model, args.tokens)
        rss = [p.rss_bytes(peak=True) for p in mesh.workers]

    print(f"\n{'node':<24} {'fetched MiB':>11} {'share MiB':>9} {'/(share+meta)':>13} {'fetch s':>8} {'MiB/s':>7} "
          f"{'store on disk MiB':>17} {'holds only its part':>19}")
    ref = parse_model_ref(identity.id)
    assert ref is not None
    for (name, store_dir, share, seconds, span), got in zip(rows, fetched, strict=True):
        stored = ModelStore(store_dir).find(ref)
        assert stored is not None
        want = {n for layer in span for n in manifest["layers"][layer]}
        held_layers = {n for n in stored.held if re.match(r"blk\.\d+\.", n)}
        only = held_layers == want and (bool(span) or stored.held == set(manifest["shared"]))
        fetch_s = got["seconds"]
        print(f"{name:<24} {got['fetched_bytes'] / MiB:>11.1f} {share / MiB:>9.1f} {got['fetched_bytes'] / (share + metadata_bytes):>13.3f} "
              f"{fetch_s:>8.1f} {got['fetched_bytes'] / MiB / max(fetch_s, 1e-9):>7.0f} {stored.disk_bytes() / MiB:>17.1f} {str(only):>19}")
        print(f"{'':<24} (process start to serving: {seconds:.1f} s; file apparent size {stored.weights[0].stat().st_size / MiB:.0f} MiB)")
    print("peak RSS of seeder and workers (MiB): " + ", ".join(f"{r / MiB:.0f}" for r in rss))
    if args.tokens:
        from meshpy.generation import Model

        with Model.load(args.model, threads=2) as local:
            local_tokens = greedy(local, args.tokens)
        print(f"{args.tokens} greedy tokens through the fetched mesh equal one process's: {mesh_tokens == local_tokens}")
    if not args.keep and args.store is None:
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
