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
from tests.test_mesh import N_TOKENS, PROMPT, greedy, greedy_until, local_tokens, start_with_two_middle_providers

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
