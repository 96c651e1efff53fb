"""Leaving without losing work: a worker told to leave (SIGTERM) mid-stream hands each session
it holds, KV cache and all, to another worker serving the same layers; the End node follows it
there and replays nothing, and the tokens do not change. Timed: how long the stream paused."""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from tests.test_mesh import (
    N_TOKENS,
    PROMPT,
    greedy,
    greedy_until,
    local_tokens,
    serve_streams,
    serving_streams,
    start_with_two_middle_providers,
)

pytestmark = pytest.mark.slow

__all__ = ["local_tokens"]  # a fixture this module uses

LEAVE_AT = 21


@pytest.mark.parametrize("route", ["chain", "star"])
def test_a_leaving_worker_hands_its_sessions_over_and_the_stream_goes_on_unchanged(
    smollm2_gguf: Path, local_tokens: list[int], route: str
) -> None:
    with LocalMesh(transport="tcp") as mesh:
        middle = start_with_two_middle_providers(mesh, smollm2_gguf)
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route=route, route_timeout=60) as model:
            session = model.new_session()
            tokens, on_route, leaving = greedy_until(model, session, middle, LEAVE_AT)
            stays = next(w for w in middle if w is not leaving)
            # Told to leave while the stream runs: the steps go on at once.
            leaving.proc.send_signal(signal.SIGTERM)
            step_times = []
            while len(tokens) < N_TOKENS:
                t0 = time.perf_counter()
                logits = model.step(session, tokens[-1])
                step_times.append(time.perf_counter() - t0)
                tokens.append(int(np.argmax(model.end.samplable(logits))))
            assert tokens == local_tokens
            handed = leaving.wait_for(r"handed session [0-9a-f]{32} over to (\S+): (\d+) positions, (\d+) bytes, "
                                      r"requests held back ([\d.]+) ms", 20)
            new_peer = session.hops[1].provider.peer_id
            assert new_peer != on_route and new_peer == handed.group(1) and new_peer in "\n".join(stays.stdout)
            recovery = model.pipeline.recovery
            assert recovery["handovers"] == 1, recovery
            assert recovery["replayed_positions"] == 0 and recovery["reroutes"] == 0, recovery
            # A new session meanwhile starts on the worker that stays: the same tokens.
            assert greedy(model, PROMPT, N_TOKENS) == local_tokens
            model.close_session(session)
            leaving.wait_for(r"left: 1 sessions handed over", 30)
            assert leaving.proc.wait(30) == 0
        typical = statistics.median(step_times)
        print(f"\n{route}: session handed over at token {LEAVE_AT} ({handed.group(2)} positions, "
              f"{int(handed.group(3)) / 1024:.0f} KiB of KV state, its requests held back {float(handed.group(4)):.1f} ms "
              f"on the leaving worker); End node: longest step {max(step_times) * 1e3:.1f} ms vs median "
              f"{typical * 1e3:.1f} ms, {recovery['handover_wait_s'] * 1e3:.1f} ms waiting on 'moving', "
              f"0 positions replayed")


def test_a_leaving_worker_hands_over_every_served_stream_and_none_changes(smollm2_gguf: Path) -> None:
    """Six concurrent greedy chat streams through `create_app` and the openai client (their
    steps batched by the scheduler); the middle worker holding some of their sessions gets
    SIGTERM mid-decode. Each of its sessions moves with its KV cache, the batched iteration
    that meets a moved session falls back to each session's own forward, which follows it, and
    every stream's text equals the one-process reply; `/metrics` counts the hand-overs and no
    replayed position."""
    from prometheus_client.parser import text_string_to_metric_families

    n = 48
    with serving_streams(smollm2_gguf, ("green", "blue", "red", "clear", "brown", "white"), n) as s:
        left: list[tuple[object, int, list[int]]] = []  # (worker, its sessions, chunk counts)

        def leave(chunks: list[int]) -> None:
            held = {p.peer_id: p.sessions for p in s.model.pipeline.refresh() if p.layers.start == 10}
            peer, sessions = max(held.items(), key=lambda kv: kv[1])
            leaving = next(w for w in s.middle if peer in "\n".join(w.stdout))
            leaving.proc.send_signal(signal.SIGTERM)
            left.append((leaving, sessions, list(chunks)))

        got = serve_streams(s.server.base_url, s.prompts, n, leave)
        assert left, "the streams never all decoded"
        leaving, sessions, at = left[0]
        assert sessions >= 1 and max(at) < n - 4, f"left mid-decode: {left}"
        assert got == s.want
        leaving.wait_for(rf"left: {sessions} sessions handed over", 30)
        assert leaving.proc.wait(30) == 0
        recovery = s.model.pipeline.recovery
        assert recovery["replayed_positions"] == 0 and recovery["handovers"] == sessions, recovery
        metrics = {m.name: m.value for f in text_string_to_metric_families(httpx_get(s.server.url + "/metrics"))
                   for m in f.samples}
        assert metrics["meshpy_mesh_handovers_total"] == sessions
        assert metrics["meshpy_mesh_replayed_positions_total"] == 0
        print(f"\n{sessions} of {len(s.prompts)} streams handed over mid-decode (at chunks {at}); "
              f"{recovery['handover_wait_s'] * 1e3:.1f} ms waited on 'moving' in all, 0 positions replayed")


def httpx_get(url: str) -> str:
    """The body at `url`."""
    import httpx

    return httpx.get(url, timeout=10).text


def test_a_session_nobody_else_can_take_stays_and_finishes_on_the_leaving_worker(
    smollm2_gguf: Path, local_tokens: list[int]
) -> None:
    """The only provider of layers 10-19 is told to leave mid-stream: there is nobody to hand
    the session to, so it stays there (said in the log), the stream finishes on it unchanged,
    and the worker leaves once the session is closed."""
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        only = [mesh.add_worker(smollm2_gguf, layers=layers, threads=1) for layers in ("0-9", "10-19", "20-29")][1]
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
            session = model.new_session()
            tokens, on_route, leaving = greedy_until(model, session, [only], LEAVE_AT)
            leaving.proc.send_signal(signal.SIGTERM)
            leaving.wait_for(r"session [0-9a-f]{32} stays .*no other worker serves layers 10\.\.20", 20)
            while len(tokens) < N_TOKENS:
                logits = model.step(session, tokens[-1])
                tokens.append(int(np.argmax(model.end.samplable(logits))))
            assert tokens == local_tokens
            assert session.hops[1].provider.peer_id == on_route
            assert model.pipeline.recovery["handovers"] == 0 and model.pipeline.recovery["replayed_positions"] == 0
            model.close_session(session)
            leaving.wait_for(r"left: 0 sessions handed over, the others ended", 30)
            assert leaving.proc.wait(30) == 0
