"""Private meshes (issue 12 part 1): `meshpy keygen` and `--network-key`, with real processes on
127.0.0.1. A keyed mesh generates the one-process tokens, and a capture of the loopback
interface meanwhile holds neither the prompt nor its token ids nor hidden states in clear; a
node without the key or with another one cannot join, announce or be answered, and the keyed
node logs each refusal. QUIC
cannot carry the key (its TLS handshake has no room for libp2p's private-network layer), so a
keyed node refuses it, saying why."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from meshpy.errors import MeshpyError
from meshpy.generation import Model
from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from tests.test_mesh import greedy

pytestmark = pytest.mark.slow

PROMPT = "Write a short story about a lighthouse keeper."


def meshpy(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpy", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


class LoopbackCapture:
    """Every frame on the loopback interface while open (a raw AF_PACKET socket: root or
    CAP_NET_RAW, else the test is skipped). `control` sends bytes over a plain TCP connection
    of its own, so a test can show the capture would see them in clear."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))  # ETH_P_ALL
        except (PermissionError, AttributeError, OSError) as e:
            pytest.skip(f"no packet capture here: {e}")
        # A session sends megabytes: a large buffer so the kernel drops no frame.
        self._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", socket.SO_RCVBUF), 64 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self.frames: list[bytes] = []
        self._control: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Once told to stop, read on until the socket's queue is empty (a quiet 0.1 s), so
        # frames already captured are never left unread.
        while True:
            try:
                self.frames.append(self._sock.recv(1 << 16))
            except TimeoutError:
                if self._stop.is_set():
                    return

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def control(self, data: bytes) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname()) as out:
                peer, _ = server.accept()
                with peer:
                    out.sendall(data)
                    peer.recv(len(data))
        self._control.append(data)

    def holds(self, needle: bytes, skip_control: bool = False) -> bool:
        """Whether any captured frame contains `needle` (frames carrying a control payload are
        left out with `skip_control`)."""
        frames = self.frames
        if skip_control:
            frames = [f for f in frames if not any(c in f for c in self._control)]
        return any(needle in f for f in frames)


def test_keygen_writes_an_owner_only_key_once(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    done = meshpy("keygen", str(key))
    assert done.returncode == 0, done.stderr
    assert "network key" in done.stdout and str(key) in done.stdout
    assert key.read_text().startswith("/key/swarm/psk/1.0.0/\n/base16/\n")
    assert key.stat().st_mode & 0o777 == 0o600
    again = meshpy("keygen", str(key))
    assert again.returncode == 2 and "not overwriting" in again.stderr


def test_a_keyed_mesh_admits_only_its_members(smollm2_gguf: Path, tmp_path: Path) -> None:
    key, other = tmp_path / "mesh.key", tmp_path / "other.key"
    for path in (key, other):
        assert meshpy("keygen", str(path)).returncode == 0
    want = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, 24)
    env = {**os.environ, "MESHPY_NETWORK_KEY": str(key)}
    with LocalMesh(transport="tcp", env=env) as mesh:
        mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
        mesh.add_worker(smollm2_gguf, layers="15-29", threads=1)
        # Members: the same tokens as one process, over either route; on the loopback wire
        # meanwhile, neither the prompt's text, nor its token ids, nor the hidden states the
        # End node sends.
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60, network_key=key) as model:
            with LoopbackCapture() as capture:
                for route in ("chain", "star"):
                    model.pipeline.route_mode = route
                    assert greedy(model, PROMPT, 24) == want, route
                capture.control(PROMPT.encode())
            ids = model.encode(PROMPT)
            hidden = model.end.embed(ids)
        assert capture.holds(PROMPT.encode()), "the capture sees plain loopback traffic"
        secrets = {"prompt text": PROMPT.encode(), "token ids (int32)": np.asarray(ids, "<i4").tobytes(),
                   "token ids (int64)": np.asarray(ids, "<i8").tobytes(), "hidden states": hidden[0, :16].tobytes()}
        for what, needle in secrets.items():
            assert not capture.holds(needle, skip_control=True), f"{what} in clear on the wire"
        # A client without the key, or with another, cannot join.
        for client_key in (None, other):
            with pytest.raises(MeshpyError):
                connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=5, network_key=client_key)
        # Nor can a worker: it never gets to announce its layers.
        open_env = {k: v for k, v in mesh.env.items() if k != "MESHPY_NETWORK_KEY"}
        for worker_env in (open_env, {**open_env, "MESHPY_NETWORK_KEY": str(other)}):
            done = meshpy("worker", "--port", "0", "--host", "127.0.0.1", "--transport", "tcp", "--bootstrap",
                          mesh.bootstrap_addr, "--model", str(smollm2_gguf), "--layers", "0-29", "--threads", "1",
                          env=worker_env)
            assert done.returncode != 0 and "announcing" not in done.stderr, done.stderr[-2000:]
        # The keyed nodes said why they refused.
        assert mesh.bootstrap is not None
        assert mesh.bootstrap.wait_for(r"refused a connection.*no network key, or another one", 10)
        # Only the two members serve layers.
        status = meshpy("status", "--bootstrap", mesh.bootstrap_addr, "--network-key", str(key))
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("2 worker(s) answering"), status.stdout


def test_a_keyed_node_refuses_quic_and_says_why(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    assert meshpy("keygen", str(key)).returncode == 0
    done = meshpy("bootstrap", "--port", "0", "--host", "127.0.0.1", "--transport", "quic", "--network-key", str(key),
                  timeout=60)
    assert done.returncode == 2
    assert "QUIC" in done.stderr and "--transport tcp" in done.stderr, done.stderr


def peer_id_of(node_dir: Path) -> str:
    """The peer id of the identity in `node_dir` (created there if missing)."""
    from meshpy import _native

    node = _native.Node(str(node_dir))
    try:
        return node.peer_id
    finally:
        node.close()


def test_an_allow_list_serves_only_the_peers_it_names(smollm2_gguf: Path, tmp_path: Path) -> None:
    """Worker B (layers 15-29) allows the bootstrap node, worker A and one client, named by a
    flag and by a file: that client gets the one-process tokens through A and B, chained and
    star; a client B does not name finds no route for B's layers, and B logs the refusal with
    its peer id."""
    want = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, 24)
    a_dir, friend_dir = tmp_path / "a", tmp_path / "friend"
    a_id, friend_id = peer_id_of(a_dir), peer_id_of(friend_dir)
    with LocalMesh(transport="tcp") as mesh:
        boot_id = mesh.start_bootstrap().rsplit("/p2p/", 1)[1]
        allowed = tmp_path / "allowed.txt"
        allowed.write_text(f"# the mesh\n{boot_id}\n{a_id}  # worker A\n")
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1, extra=["--node-dir", str(a_dir)])
        b = mesh.add_worker(smollm2_gguf, layers="15-29", threads=1,
                            extra=["--allow-peer", str(allowed), "--allow-peer", friend_id])
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60, node_dir=friend_dir) as model:
            for route in ("chain", "star"):
                model.pipeline.route_mode = route
                assert greedy(model, PROMPT, 24) == want, route
        with pytest.raises(MeshpyError, match="15"):
            connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=5)
        refused = b.wait_for(r"refused a connection from (12D3\w+): not on this node's allow list", 10)
        assert refused.group(1) not in (boot_id, a_id, friend_id)
