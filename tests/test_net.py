"""The libp2p node from Python: real sockets on 127.0.0.1 (port 0), TCP and QUIC.

Echo workers, DHT provider records, bad frames, vanished peers; and a worker serving all of
SmolLM2's layers from Rust, checked against the same span run in this process.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.errors import IdentityError, InvalidArgumentError, NetworkError, RequestTimeoutError

TRANSPORTS = ["tcp", "quic"]
HIDDEN = 576


def echo_node(path: Path, transport: str, bootstrap: list[str] | None = None, **kw: object) -> _native.Node:
    return _native.Node(str(path), 0, transport, bootstrap or [], "echo", request_timeout=10.0, query_timeout=10.0, **kw)


def forward(hidden: np.ndarray, dtype: str = "bf16", session: int = 1, start: int = 0, step: int = 0,
            model_hash: bytes = b"\x07" * 32, layers: tuple[int, int] = (0, 1), name: str = "m") -> bytes:
    entries = [(session, step, start, hidden.shape[0])]
    return _native.encode_forward(model_hash, name, layers[0], layers[1], entries, hidden, dtype)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bootstrap_providers_and_echo(tmp_path: Path, transport: str) -> None:
    with echo_node(tmp_path / "a", transport) as a:
        addrs = a.listen_addrs()
        assert addrs and all(x.startswith("/ip4/127.0.0.1/") and x.endswith("/p2p/" + a.peer_id) for x in addrs)
        with echo_node(tmp_path / "b", transport, addrs) as b, echo_node(tmp_path / "c", transport, addrs) as c:
            b.bootstrap()
            c.bootstrap()
            assert a.peer_id in b.connected_peers()
            key = "smollm2@0123/layer/7"
            assert c.get_providers(key) == []
            b.start_providing(key)
            providers = c.get_providers(key.encode())
            assert [p for p, _ in providers] == [b.peer_id]
            assert providers[0][1], "providers come with addresses"
            x = np.linspace(-2, 2, 3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN)
            for dtype in ("bf16", "f32", "f16"):
                reply = _native.decode_frame(c.request(b.peer_id, forward(x, dtype)))
                assert reply["kind"] == "forward_result" and reply["dtype"] == dtype
                assert reply["entries"] == [(1, 0, 0, 3)]
                expected = _native.decode_frame(forward(x, dtype))["hidden"]
                np.testing.assert_array_equal(reply["hidden"], expected)
            assert _native.decode_frame(c.request(b.peer_id, _native.encode_ping(77))) == {"kind": "pong", "nonce": 77}


def test_an_emulated_round_trip_delays_every_request_the_node_sends(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """MESHPY_EMULATED_RTT_MS (tests and benchmarks' stand-in for link latency) is read when a
    node starts: its pings take that much longer; the node answering is unaffected."""
    def ping_ms(client: _native.Node, peer: str) -> float:
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            assert _native.decode_frame(client.request(peer, _native.encode_ping(i)))["kind"] == "pong"
            times.append(time.perf_counter() - t0)
        return sorted(times)[2] * 1e3

    with echo_node(tmp_path / "a", "tcp") as a:
        addrs = a.listen_addrs()
        with echo_node(tmp_path / "b", "tcp", addrs) as plain:
            plain.dial(addrs[0])
            base = ping_ms(plain, a.peer_id)
        monkeypatch.setenv("MESHPY_EMULATED_RTT_MS", "40")
        with echo_node(tmp_path / "c", "tcp", addrs) as slow:
            slow.dial(addrs[0])
            delayed = ping_ms(slow, a.peer_id)
            reverse = ping_ms(a, slow.peer_id)
    assert base < 20 and reverse < 20, (base, reverse)
    assert 40 <= delayed < 40 + base + 20, delayed


def test_every_node_answers_info_and_a_bootstrap_node_answers_ping(tmp_path: Path) -> None:
    with _native.Node(str(tmp_path / "boot"), 0, "tcp", info={"role": "bootstrap", "version": "0.1.0"}) as boot, \
            echo_node(tmp_path / "e", "tcp", info={"device": "cpu", "threads": 2}) as echo, \
            _native.Node(str(tmp_path / "c"), 0, "tcp") as client:
        for node in (boot, echo):
            client.dial(node.listen_addrs()[0])
        info = client.info(boot.peer_id)
        # The Info request's bytes, counted on arrival (the reply after it is sent).
        assert info.pop("traffic") == {client.peer_id: {"received": 24, "sent": 0}}
        assert info == {"mode": "none", "role": "bootstrap", "version": "0.1.0", "peer_id": boot.peer_id,
                        "listen_addrs": boot.listen_addrs(), "relay": 1, "relays": 0, "refusals": {}}
        now = boot.local_info()
        assert now.pop("traffic")[client.peer_id]["sent"] > 0
        assert now == info
        assert _native.decode_frame(client.request(boot.peer_id, _native.encode_ping(8))) == {"kind": "pong", "nonce": 8}
        refused = _native.decode_frame(client.request(boot.peer_id, forward(np.ones((1, 8), np.float32))))
        assert refused["code"] == "invalid_request"
        assert client.info(boot.peer_id)["refusals"] == {"invalid_request": 1}
        info = client.info(echo.peer_id, timeout=5.0)
        assert (info["mode"], info["device"], info["threads"], info["peer_id"]) == ("echo", "cpu", 2, echo.peer_id)
        reply = _native.decode_frame(client.request(echo.peer_id, _native.encode_info()))
        assert reply["kind"] == "info_reply"
        again = reply["info"]
        # Only the traffic moved on: one more request in, one more reply out.
        assert again.pop("traffic")[client.peer_id]["received"] > info.pop("traffic")[client.peer_id]["received"]
        assert again == info
    with pytest.raises(InvalidArgumentError, match="info"):
        _native.Node(str(tmp_path / "bad"), 0, "tcp", info={"x": float("inf")})
    with pytest.raises(InvalidArgumentError, match="info"):
        _native.Node(str(tmp_path / "bad"), 0, "tcp", info=["not", "a", "dict"])  # type: ignore[arg-type]


def test_stopped_providers_are_forgotten_within_the_provider_ttl(tmp_path: Path) -> None:
    with echo_node(tmp_path / "a", "tcp", provider_ttl=1.0) as a:
        addrs = a.listen_addrs()
        with echo_node(tmp_path / "b", "tcp", addrs, provider_ttl=1.0) as b, \
                echo_node(tmp_path / "c", "tcp", addrs, provider_ttl=1.0) as c:
            b.bootstrap()
            c.bootstrap()
            b.start_providing("m/layer/0")
            c.start_providing("m/layer/0")
            assert sorted(p for p, _ in a.get_providers("m/layer/0")) == sorted([b.peer_id, c.peer_id])
            b.stop_providing("m/layer/0")
            deadline = time.monotonic() + 5
            while [p for p, _ in a.get_providers("m/layer/0")] != [c.peer_id] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [p for p, _ in a.get_providers("m/layer/0")] == [c.peer_id]
            time.sleep(1.5)
            assert [p for p, _ in a.get_providers("m/layer/0")] == [c.peer_id], "a live provider re-announces"
    with pytest.raises(ValueError, match="provider_ttl"):
        echo_node(tmp_path / "d", "tcp", provider_ttl=0.0)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_get_providers_many_matches_single_lookups(tmp_path: Path, transport: str) -> None:
    with echo_node(tmp_path / "a", transport) as a:
        addrs = a.listen_addrs()
        with echo_node(tmp_path / "b", transport, addrs) as b, echo_node(tmp_path / "c", transport, addrs) as c:
            b.bootstrap()
            c.bootstrap()
            keys: list[str | bytes] = [f"m@0/layer/{i}" for i in range(32)]
            for i, key in enumerate(keys):
                if i % 4:
                    b.start_providing(key)
            keys.append(b"m@0/layer/0")  # bytes, and a key twice
            many = c.get_providers_many(keys)
            assert many == [c.get_providers(k) for k in keys]
            assert [[p for p, _ in providers] for providers in many] == [
                [b.peer_id] if i % 4 else [] for i in range(32)
            ] + [[]]
            assert c.get_providers_many([]) == []
            with pytest.raises(ValueError, match="bytes or str"):
                c.get_providers_many([1])  # type: ignore[list-item]


def test_identity_persists_with_owner_only_permissions(tmp_path: Path) -> None:
    with echo_node(tmp_path, "tcp") as a:
        first = a.peer_id
    key = next(tmp_path.iterdir())
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with echo_node(tmp_path, "tcp") as a:
        assert a.peer_id == first
    key.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="not a valid node identity key"):
        echo_node(tmp_path, "tcp")


def test_both_transports_and_argument_errors(tmp_path: Path) -> None:
    with _native.Node(str(tmp_path / "a"), 0, "both", serve="echo") as a:
        addrs = a.listen_addrs()
        assert any("/tcp/" in x for x in addrs) and any("/quic-v1" in x for x in addrs)
        with pytest.raises(InvalidArgumentError):
            a.dial("not a multiaddr")
        with pytest.raises(InvalidArgumentError):
            a.request("not a peer", b"")
    with pytest.raises(InvalidArgumentError, match="unknown transport"):
        _native.Node(str(tmp_path / "b"), 0, "udp")
    with pytest.raises(InvalidArgumentError, match="serve must be"):
        _native.Node(str(tmp_path / "c"), 0, "tcp", serve="layers")
    with pytest.raises(InvalidArgumentError, match="/p2p/"):
        _native.Node(str(tmp_path / "d"), 0, "tcp", ["/ip4/127.0.0.1/tcp/1"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_frames_get_errors_and_node_keeps_serving(tmp_path: Path, transport: str) -> None:
    with echo_node(tmp_path / "a", transport, max_frame_bytes=8192) as a, echo_node(tmp_path / "b", transport) as b:
        b.dial(a.listen_addrs()[0])
        good = forward(np.ones((1, HIDDEN), np.float32))
        huge = bytearray(good[:24])
        huge[16:24] = (1 << 40).to_bytes(8, "little")  # announces a 1 TiB payload
        assert _native.decode_frame(b.request(a.peer_id, bytes(huge)))["code"] == "frame_too_large"
        assert _native.decode_frame(b.request(a.peer_id, b"garbage" * 9))["code"] == "malformed_frame"
        assert _native.decode_frame(b.request(a.peer_id, good[:-7]))["code"] == "malformed_frame"
        rng = random.Random(3)
        for _ in range(20):
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            assert _native.decode_frame(b.request(a.peer_id, junk))["kind"] == "error"
        assert _native.decode_frame(b.request(a.peer_id, good))["kind"] == "forward_result"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vanished_peer_fails_fast(tmp_path: Path, transport: str) -> None:
    with echo_node(tmp_path / "a", transport) as a, echo_node(tmp_path / "b", transport) as b:
        b.dial(a.listen_addrs()[0])
        ping = _native.encode_ping(1)
        b.request(a.peer_id, ping)
        a.close()
        t0 = time.monotonic()
        with pytest.raises((NetworkError, RequestTimeoutError)):
            b.request(a.peer_id, ping, timeout=3.0)
        assert time.monotonic() - t0 < 5
        with pytest.raises(NetworkError, match="shut down"):
            a.listen_addrs()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_dht_peer_stops_costing_lookups_once_its_connection_is_found_dead(tmp_path: Path, transport: str) -> None:
    """A provider process killed outright (SIGKILL: over QUIC nothing tells its peers) is out of
    every routing table once its connections are found dead (QUIC: 5 s without keep-alives),
    so lookups stop waiting on it within seconds: with libp2p's defaults every later lookup
    waited 5 s on a dial of it (10 s for the first)."""
    import subprocess
    import sys

    with _native.Node(str(tmp_path / "boot"), 0, transport) as boot:
        addr = boot.listen_addrs()[0]
        script = (
            "import sys, time\nfrom meshpy import _native\n"
            f"n = _native.Node({str(tmp_path / 'doomed')!r}, 0, {transport!r}, [{addr!r}])\n"
            "n.bootstrap(); n.start_providing(b'k'); print('ready', flush=True); time.sleep(600)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(_native.__file__).parents[1])}
        doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert doomed.stdout is not None and doomed.stdout.readline().strip() == "ready"
            with _native.Node(str(tmp_path / "w"), 0, transport, [addr]) as other, \
                    _native.Node(str(tmp_path / "c"), 0, transport, [addr], dht_server=False) as client:
                other.bootstrap()
                other.start_providing(b"k")
                client.bootstrap()
                assert len(client.get_providers(b"k")) == 2
                doomed.kill()
                doomed.wait()
                killed = time.monotonic()
                waits = []  # (seconds since the kill when the lookup began, its duration)
                while time.monotonic() - killed < 12:
                    t0 = time.monotonic()
                    assert other.peer_id in [p for p, _ in client.get_providers(b"k")]
                    waits.append((t0 - killed, time.monotonic() - t0))
                    time.sleep(0.2)
                slow = [w for w in waits if w[1] > 1.0]
                # Lookups may wait on the dead peer until the connections to it are found dead
                # (5 s), or dial it once more meanwhile (3 s) ...
                assert len(slow) <= 2 and all(took < 6.5 for _, took in slow), waits
                # ... and none once they have been (both waits after the kill, plus a margin).
                assert all(took < 1.0 for began, took in waits if began > 10.0), waits
        finally:
            doomed.kill()
            doomed.wait()
            doomed.stdout.close()


# --- a worker serving SmolLM2 from Rust ---------------------------------------------------


@pytest.fixture(scope="module", params=["cpu", "torch-cpu"])
def smollm2_worker(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):  # noqa: ANN201
    """A node serving SmolLM2's 30 layers on the CPU path, then on the torch path (the same
    frames, sessions, budget and refusals), with a local model on the same path to compare:
    one session's rows through either path give the same bits every time."""
    device = request.param
    if device != "cpu":
        pytest.importorskip("torch")
    from meshpy.generation import Model
    from meshpy.models.config import read_config
    from meshpy.models.packaged import resolve_packaged
    from meshpy.models.source import open_model_source
    from meshpy.pipeline import LocalSpan

    path = resolve_packaged("smollm2")
    local = Model.load(path, threads=1, device=device)
    source = open_model_source(path)
    config = read_config(source)
    span = LocalSpan(source, config, range(0, config.n_layers), _native.ThreadPool(1), device=device)
    model_hash = hashlib.sha256(b"smollm2 test hash").digest()
    root = tmp_path_factory.mktemp("worker")
    worker = _native.Node(str(root / "w"), 0, "tcp", [], span.native, model_name="smollm2", model_hash=model_hash,
                          kv_budget_bytes=64 << 20, idle_timeout=300.0)
    client = _native.Node(str(root / "c"), 0, "tcp")
    client.dial(worker.listen_addrs()[0])
    yield local, config, worker, client, model_hash
    client.close()
    worker.close()


def remote_step(ctx, session: int, start: int, hidden: np.ndarray, dtype: str, step: int = 0) -> dict:  # noqa: ANN001
    local, config, worker, client, model_hash = ctx
    frame = forward(hidden, dtype, session, start, step, model_hash, (0, config.n_layers), "smollm2")
    return _native.decode_frame(client.request(worker.peer_id, frame, timeout=60.0))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_span_worker_matches_local_span(smollm2_worker, dtype: str) -> None:  # noqa: ANN001
    local, config, worker, client, model_hash = smollm2_worker
    session_id = int.from_bytes(os.urandom(16), "little")
    ids = local.encode("Write a short poem about the sea.")
    session = local.new_session()
    hidden = local.end.embed(ids)
    want = local.pipeline.forward(session, hidden)
    got = remote_step(smollm2_worker, session_id, 0, hidden, dtype)
    assert got["kind"] == "forward_result", got
    if dtype == "f32":
        np.testing.assert_array_equal(got["hidden"], want)
    else:
        np.testing.assert_allclose(got["hidden"], want, rtol=0.05, atol=0.05 * np.abs(want).max())
    pos = len(ids)
    tok_local = tok_remote = int(np.argmax(local.end.logits(want[-1:])[0]))
    for step in range(1, 5):
        want = local.pipeline.forward(session, local.end.embed([tok_local]))
        got = remote_step(smollm2_worker, session_id, pos, local.end.embed([tok_remote]), dtype, step)
        assert got["kind"] == "forward_result", got
        tok_local = int(np.argmax(local.end.logits(want)[0]))
        tok_remote = int(np.argmax(local.end.logits(got["hidden"])[0]))
        if dtype == "f32":
            np.testing.assert_array_equal(got["hidden"], want)
        assert tok_remote == tok_local
        pos += 1
    assert worker.session_count() >= 1
    closed = _native.decode_frame(client.request(worker.peer_id, _native.encode_close_session([session_id, 12345])))
    assert closed == {"kind": "close_session_ack", "sessions": [session_id]}
    assert remote_step(smollm2_worker, session_id, pos, local.end.embed([1]), dtype)["code"] == "unknown_session"


def test_span_worker_info(smollm2_worker) -> None:  # noqa: ANN001
    local, config, worker, client, model_hash = smollm2_worker
    info = client.info(worker.peer_id)
    assert {k: info[k] for k in ("mode", "model_name", "model_hash", "first_layer", "n_layers", "hidden")} == {
        "mode": "span", "model_name": "smollm2", "model_hash": model_hash.hex(), "first_layer": 0,
        "n_layers": config.n_layers, "hidden": HIDDEN,
    }
    assert info["kv_budget_bytes"] == 64 << 20 and info["max_positions"] == config.max_positions
    assert info["sessions"] == worker.session_count()
    sid = 7100
    remote_step(smollm2_worker, sid, 0, local.end.embed([1, 2, 3, 4]), "bf16")
    after = client.info(worker.peer_id)
    assert after["sessions"] == info["sessions"] + 1
    assert after["kv_used_bytes"] == info["kv_used_bytes"] + 4 * 30 * 2 * 192 * 2  # f16 keys and values
    client.request(worker.peer_id, _native.encode_close_session([sid]))
    assert client.info(worker.peer_id)["kv_used_bytes"] == info["kv_used_bytes"]


def test_span_worker_refusals(smollm2_worker) -> None:  # noqa: ANN001
    local, config, worker, client, model_hash = smollm2_worker
    x = local.end.embed([1, 2, 3])
    before = worker.session_count()
    assert remote_step(smollm2_worker, 901, 5, x, "bf16")["code"] == "unknown_session"
    frame = forward(x, "bf16", 902, 0, 0, hashlib.sha256(b"other").digest(), (0, config.n_layers), "smollm2")
    assert _native.decode_frame(client.request(worker.peer_id, frame))["code"] == "wrong_model"
    frame = forward(x, "bf16", 903, 0, 0, model_hash, (25, 10), "smollm2")
    reply = _native.decode_frame(client.request(worker.peer_id, frame))
    assert reply["code"] == "wrong_span" and "serves layers 0..30" in reply["message"] and "25..35" in reply["message"]
    assert worker.session_count() == before, "refused requests create no session"
    assert remote_step(smollm2_worker, 904, 0, x, "bf16")["kind"] == "forward_result"
    assert remote_step(smollm2_worker, 904, 5, x[:1], "bf16")["code"] == "step_mismatch"
    assert remote_step(smollm2_worker, 904, 3, x[:1], "bf16")["kind"] == "forward_result", "a refusal changes nothing"
    narrow = np.ones((1, 100), np.float32)
    assert remote_step(smollm2_worker, 905, 0, narrow, "bf16")["code"] == "invalid_request"
    # Budget: 64 MiB of KV at 30 layers x 2 x 192 values x 2 bytes (f16: 23040 bytes) per
    # position is about 2912 positions; a 3000-token prefill cannot be held.
    big = np.zeros((3000, HIDDEN), np.float32)
    assert remote_step(smollm2_worker, 906, 0, big, "bf16")["code"] == "cannot_hold_session"
    assert _native.decode_frame(client.request(worker.peer_id, _native.encode_close_session([904])))["sessions"] == [904]
    # A prefill slower than the caller's timeout: the call raises, the worker carries on.
    prefill = forward(np.zeros((128, HIDDEN), np.float32), "bf16", 907, 0, 0, model_hash, (0, config.n_layers), "smollm2")
    with pytest.raises(RequestTimeoutError):
        client.request(worker.peer_id, prefill, timeout=0.01)
    assert _native.decode_frame(client.request(worker.peer_id, _native.encode_ping(3))) == {"kind": "pong", "nonce": 3}
    client.request(worker.peer_id, _native.encode_close_session([907]))


def test_node_forward_is_one_hop_with_typed_refusals(smollm2_worker) -> None:  # noqa: ANN001
    """`Node.forward`, the End node's per-hop call: the worker's values (bit-equal to the local
    span in f32), refusals as WorkerError carrying the wire code and whether another provider
    could serve it, mismatched rows refused before anything is sent."""
    from meshpy.errors import ShapeError, WorkerError

    local, config, worker, client, model_hash = smollm2_worker
    x = local.end.embed([5, 6, 7])
    session = local.new_session()
    want = local.pipeline.forward(session, x)

    def hop(sid: int, start: int, rows: np.ndarray, step: int = 0, digest: bytes = model_hash, dtype: str = "f32") -> np.ndarray:
        return client.forward(worker.peer_id, digest, "smollm2", 0, config.n_layers, [(sid, step, start, len(rows))], rows,
                              wire_dtype=dtype, timeout=60.0)

    got = hop(950, 0, x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(hop(951, 0, x, dtype="bf16"), want, rtol=0.05, atol=0.05 * np.abs(want).max())
    with pytest.raises(WorkerError) as gap:
        hop(950, 7, x[:1], step=1)
    assert (gap.value.code, gap.value.recoverable, gap.value.peer) == ("step_mismatch", True, worker.peer_id)
    with pytest.raises(WorkerError) as wrong:
        hop(952, 0, x, digest=hashlib.sha256(b"other").digest())
    assert (wrong.value.code, wrong.value.recoverable) == ("wrong_model", False)
    assert "this worker serves" in str(wrong.value)
    before = worker.session_count()
    with pytest.raises(ShapeError):
        client.forward(worker.peer_id, model_hash, "smollm2", 0, config.n_layers, [(953, 0, 0, 2)], x)
    assert worker.session_count() == before
    client.request(worker.peer_id, _native.encode_close_session([950, 951]))


def test_span_worker_serves_sub_spans_like_the_whole_span(smollm2_worker) -> None:  # noqa: ANN001
    """Spans 0..10, 10..20, 20..30 of the 30-layer worker, one session each, chained, give
    the whole span's answer bit for bit (f32 on the wire), prefill and decode."""
    local, config, worker, client, model_hash = smollm2_worker
    assert config.n_layers == 30
    ids = local.encode("The sea is")
    x = local.end.embed(ids)
    whole_sid, part_sids = 5000, (5001, 5002, 5003)
    before = worker.session_count()
    pos = 0
    for step in range(3):
        whole = remote_step(smollm2_worker, whole_sid, pos, x, "f32", step)
        assert whole["kind"] == "forward_result", whole
        y = x
        for sid, first in zip(part_sids, (0, 10, 20)):
            frame = forward(y, "f32", sid, pos, step, model_hash, (first, 10), "smollm2")
            part = _native.decode_frame(client.request(worker.peer_id, frame, timeout=60.0))
            assert part["kind"] == "forward_result", part
            y = part["hidden"]
        np.testing.assert_array_equal(y, whole["hidden"])
        pos += x.shape[0]
        x = local.end.embed([int(np.argmax(local.end.logits(whole["hidden"][-1:])[0]))])
    assert worker.session_count() == before + 4
    # A session keeps the layers it started with.
    frame = forward(x, "f32", part_sids[0], pos, 3, model_hash, (0, 20), "smollm2")
    reply = _native.decode_frame(client.request(worker.peer_id, frame))
    assert reply["code"] == "wrong_span" and "runs layers 0..10" in reply["message"]
    closed = _native.decode_frame(client.request(worker.peer_id, _native.encode_close_session([whole_sid, *part_sids])))
    assert sorted(closed["sessions"]) == [whole_sid, *part_sids]


def test_span_worker_answers_a_repeated_step_again(smollm2_worker) -> None:  # noqa: ANN001
    """A client that lost an answer sends the step again: the worker cuts the session back to
    that position and runs it again, with the same answer; the session then continues."""
    local, config, worker, client, model_hash = smollm2_worker
    session = local.new_session()
    ids = local.encode("One, two, three,")
    sid = 6000
    want = local.pipeline.forward(session, local.end.embed(ids))
    for _ in range(2):
        got = remote_step(smollm2_worker, sid, 0, local.end.embed(ids), "f32")
        np.testing.assert_array_equal(got["hidden"], want)
    pos = len(ids)
    token = int(np.argmax(local.end.logits(want[-1:])[0]))
    for step in range(1, 4):
        want = local.pipeline.forward(session, local.end.embed([token]))
        first = remote_step(smollm2_worker, sid, pos, local.end.embed([token]), "f32", step)
        again = remote_step(smollm2_worker, sid, pos, local.end.embed([token]), "f32", step)
        np.testing.assert_array_equal(first["hidden"], want)
        np.testing.assert_array_equal(again["hidden"], first["hidden"])
        token = int(np.argmax(local.end.logits(want)[0]))
        pos += 1
    assert remote_step(smollm2_worker, sid, pos + 1, local.end.embed([token]), "f32")["code"] == "step_mismatch"
    client.request(worker.peer_id, _native.encode_close_session([sid]))


def test_span_worker_survives_garbage_while_a_session_runs(smollm2_worker) -> None:  # noqa: ANN001
    local, config, worker, client, model_hash = smollm2_worker
    session = local.new_session()
    ids = local.encode("Name three colours.")
    want = [local.pipeline.forward(session, local.end.embed(ids))]
    errors: list[str] = []

    def garbage() -> None:
        rng = random.Random(11)
        good = forward(local.end.embed([5]), "bf16", 7777, 0, 0, model_hash, (0, config.n_layers), "smollm2")
        for i in range(40):
            if i % 2:
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            else:
                junk = good[: rng.randrange(1, len(good))]
            reply = _native.decode_frame(client.request(worker.peer_id, junk, timeout=30.0))
            if reply["kind"] != "error":
                errors.append(f"garbage got {reply['kind']}")

    thread = threading.Thread(target=garbage)
    thread.start()
    sid = 4242
    got = remote_step(smollm2_worker, sid, 0, local.end.embed(ids), "f32")
    pos, token = len(ids), int(np.argmax(local.end.logits(got["hidden"][-1:])[0]))
    for step in range(1, 4):
        want.append(local.pipeline.forward(session, local.end.embed([token])))
        got = remote_step(smollm2_worker, sid, pos, local.end.embed([token]), "f32", step)
        np.testing.assert_array_equal(got["hidden"], want[-1])
        token = int(np.argmax(local.end.logits(got["hidden"])[0]))
        pos += 1
    thread.join()
    assert not errors, errors
    client.request(worker.peer_id, _native.encode_close_session([sid]))


def test_span_worker_over_quic_expires_idle_sessions(smollm2_worker, tmp_path: Path) -> None:  # noqa: ANN001
    """A second worker serving the same span object, over QUIC, with a 0.5 s idle timeout."""
    from meshpy.models.config import read_config
    from meshpy.models.packaged import resolve_packaged
    from meshpy.models.source import open_model_source
    from meshpy.pipeline import LocalSpan

    local, config, _, _, model_hash = smollm2_worker
    source = open_model_source(resolve_packaged("smollm2"))
    span = LocalSpan(source, read_config(source), range(10, 20), _native.ThreadPool(1))
    with _native.Node(str(tmp_path / "w"), 0, "quic", [], span.native, model_name="smollm2", model_hash=model_hash,
                      idle_timeout=0.5) as worker, _native.Node(str(tmp_path / "c"), 0, "quic") as client:
        client.dial(worker.listen_addrs()[0])
        x = np.random.default_rng(1).standard_normal((4, HIDDEN)).astype(np.float32)
        frame = forward(x, "f32", 55, 0, 0, model_hash, (10, 10), "smollm2")
        got = _native.decode_frame(client.request(worker.peer_id, frame))
        np.testing.assert_array_equal(got["hidden"], span.forward(x, span.new_cache(64)))
        assert worker.session_count() == 1
        deadline = time.monotonic() + 10
        while worker.session_count() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.session_count() == 0, "an idle session expires without further requests"
        frame = forward(x[:1], "f32", 55, 4, 1, model_hash, (10, 10), "smollm2")
        assert _native.decode_frame(client.request(worker.peer_id, frame))["code"] == "unknown_session"


def test_a_node_starts_serving_layers_after_it_joined(smollm2_worker, tmp_path: Path) -> None:  # noqa: ANN001
    """A worker joins with no handler, then loads layers 20..22 and serves them; later it
    stops serving, then echoes."""
    from meshpy.models.config import read_config
    from meshpy.models.packaged import resolve_packaged
    from meshpy.models.source import open_model_source
    from meshpy.pipeline import LocalSpan

    _, _, _, _, model_hash = smollm2_worker
    x = np.random.default_rng(2).standard_normal((3, HIDDEN)).astype(np.float32)
    with _native.Node(str(tmp_path / "w"), 0, "tcp", info={"device": "cpu"}) as worker, \
            _native.Node(str(tmp_path / "c"), 0, "tcp") as client:
        client.dial(worker.listen_addrs()[0])
        frame = forward(x, "f32", 81, 0, 0, model_hash, (20, 2), "smollm2")
        assert _native.decode_frame(client.request(worker.peer_id, frame))["code"] == "invalid_request"
        assert client.info(worker.peer_id)["mode"] == "none"

        source = open_model_source(resolve_packaged("smollm2"))
        span = LocalSpan(source, read_config(source), range(20, 22), _native.ThreadPool(1))
        with pytest.raises(InvalidArgumentError, match="model_name and model_hash"):
            worker.serve(span.native)
        worker.serve(span.native, model_name="smollm2", model_hash=model_hash, kv_budget_bytes=1 << 20,
                     info={"layers_nbytes": span.native.nbytes})
        got = _native.decode_frame(client.request(worker.peer_id, frame))
        np.testing.assert_array_equal(got["hidden"], span.forward(x, span.new_cache(64)))
        info = client.info(worker.peer_id)
        assert (info["mode"], info["first_layer"], info["n_layers"], info["sessions"]) == ("span", 20, 2, 1)
        assert (info["device"], info["layers_nbytes"], info["kv_budget_bytes"]) == ("cpu", span.native.nbytes, 1 << 20)

        worker.serve(None)
        assert worker.session_count() == 0, "the old handler's sessions went with it"
        assert _native.decode_frame(client.request(worker.peer_id, frame))["code"] == "invalid_request"
        assert client.info(worker.peer_id)["mode"] == "none"
        worker.serve("echo")
        assert _native.decode_frame(client.request(worker.peer_id, frame))["kind"] == "forward_result"
        with pytest.raises(InvalidArgumentError, match="serve must be"):
            worker.serve("layers")


def test_stub_section_matches_the_node_class() -> None:
    """The `# net` section of _native.pyi names the Node class's public members."""
    import ast

    stub = Path(_native.__file__).with_name("_native.pyi").read_text()
    section = stub.split("# net (rust/src/py/net.rs)")[1]
    (cls,) = [n for n in ast.parse(section).body if isinstance(n, ast.ClassDef)]
    stubbed = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)} - {"__init__", "__enter__", "__exit__"}
    actual = {name for name in dir(_native.Node) if not name.startswith("_")}
    assert stubbed == actual


def test_close_leaves_no_threads(tmp_path: Path) -> None:
    """Closing a node joins its thread and its runtime's blocking pool (libp2p's one global
    timer thread is started by the first node and shared)."""
    def n_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    with echo_node(tmp_path / "warm", "both") as a, echo_node(tmp_path / "warm2", "both") as b:
        b.dial(a.listen_addrs()[0])
        b.request(a.peer_id, _native.encode_ping(1))
    before = n_threads()
    for i in range(3):
        with echo_node(tmp_path / f"a{i}", "both") as a, echo_node(tmp_path / f"b{i}", "both") as b:
            b.dial(a.listen_addrs()[1])
            b.request(a.peer_id, _native.encode_ping(i))
    assert n_threads() == before
