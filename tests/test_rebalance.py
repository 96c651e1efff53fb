"""A mesh that heals: when a layer range loses its only provider mid-generation, a spare worker
(one whose layers all have another provider) moves to it within seconds, and the generation
that was running finishes with exactly the tokens it would have had."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import numpy as np
import pytest

from meshpy.generation import Model
from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from meshpy.mesh.placement import RUNTIME_OVERHEAD, layer_nbytes
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from tests.fixtures.cpulimit import cpu_limited, why_no_cpu_limit
from tests.test_mesh import KV_BUDGET, PROMPT, greedy, ten_layer_memory

pytestmark = pytest.mark.slow

N_TOKENS = 40
KILL_AFTER = 8


def logged_at(line: str) -> float:
    """The Unix time of a worker's log line (`2026-12-07 07:14:33,668 INFO ...`)."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


@pytest.mark.parametrize("route", ["chain", "star"])
def test_a_spare_worker_takes_over_a_range_whose_only_provider_died(smollm2_gguf: Path, route: str) -> None:
    expected = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, N_TOKENS)
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        for layers in ("0-9", "10-19", "20-29"):  # pinned: these never move
            mesh.add_worker(smollm2_gguf, layers=layers, kv_budget=str(KV_BUDGET), threads=1)
        middle = mesh.workers[1]
        # Room for ten layers, placed by coverage: every layer has one provider, so it doubles
        # the first ten (the earliest of the least-covered windows).
        spare = mesh.add_worker(smollm2_gguf, memory=ten_layer_memory(smollm2_gguf), kv_budget=str(KV_BUDGET), threads=1)
        assert spare.layers == range(0, 10)
        model = connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route=route)
        try:
            session = model.new_session()
            logits = model.prefill(session, model.encode(PROMPT))
            tokens: list[int] = []
            for _ in range(N_TOKENS):
                tokens.append(int(np.argmax(model.end.samplable(logits))))
                if len(tokens) == KILL_AFTER:
                    middle.kill()  # layers 10-19 have no provider now
                    killed_at = time.time()
                logits = model.step(session, tokens[-1])
            model.close_session(session)
        finally:
            model.close()
        assert tokens == expected
        moved = spare.wait_for(r"moving from layers 0-9 to 10-19", 5).string
        covered = spare.wait_for(r"announcing layers 10-19 of ", 5).string
        took = logged_at(covered) - killed_at
        print(f"\n{route}: layers 10-19 covered again {took:.1f} s after their only provider was killed "
              f"(gap noticed {logged_at(moved) - killed_at:.1f} s after)")
        assert took < 30.0


def layers_memory(gguf: Path, count: int) -> int:
    """A --memory that holds `count` of the model's layers next to the KV budget."""
    source = open_model_source(gguf)
    config = read_config(source)
    layer = max(layer_nbytes(source, config, i) for i in range(config.n_layers))
    return RUNTIME_OVERHEAD + KV_BUDGET + int((count + 0.5) * layer)


def decode_ms(model, n: int = 24) -> tuple[list[int], float, list]:  # noqa: ANN001
    """`n` greedy tokens of PROMPT, the decode ms per token, and the route."""
    session = model.new_session()
    logits = model.prefill(session, model.encode(PROMPT))
    tokens: list[int] = []
    start = time.perf_counter()
    for _ in range(n):
        tokens.append(int(np.argmax(model.end.samplable(logits))))
        logits = model.step(session, tokens[-1])
    ms = (time.perf_counter() - start) * 1e3 / n
    hops = list(session.hops)
    model.close_session(session)
    return tokens, ms, hops


@pytest.mark.skipif(why_no_cpu_limit() is not None, reason=f"cannot slow a worker: {why_no_cpu_limit()}")
def test_a_spare_worker_moves_to_the_slowest_layers(smollm2_gguf: Path) -> None:
    """Layers 15-29 on a slow box (a process held to 10% of a core by a CPU cgroup), 0-14 on a
    fast one, and a spare with room for fifteen layers, placed by coverage on 0-14: every
    generation waits on the slow half, so the spare moves there (it measured its speed and
    reads the others'), and routes then take it over the slow one; tokens never change."""
    expected = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, 24)
    with LocalMesh() as mesh, cpu_limited(0.1) as slow:
        mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-14", kv_budget=str(KV_BUDGET), threads=1)
        slow_worker = mesh.add_worker(smollm2_gguf, layers="15-29", kv_budget=str(KV_BUDGET), threads=1, prefix=slow)
        model = connect(smollm2_gguf, mesh.bootstrap_addr, threads=1)
        try:
            before, slow_ms, _ = decode_ms(model)
            spare = mesh.add_worker(smollm2_gguf, memory=layers_memory(smollm2_gguf, 15), kv_budget=str(KV_BUDGET),
                                    threads=1)
            assert spare.layers == range(0, 15)
            spare.wait_for(r"layers 15-29 are the mesh's slowest; moving from layers 0-14 to them", 30)
            spare.wait_for(r"announcing layers 15-29 of ", 30)
            model.pipeline.refresh()
            after, fast_ms, hops = decode_ms(model)
        finally:
            model.close()
        assert before == expected and after == expected
        spare_peer = spare.wait_for(r"worker node (\S+) listening", 1).group(1)
        assert hops[-1].provider.peer_id == spare_peer, "routes take the fast provider of layers 15-29"
        speeds = {w.name: float(w.wait_for(r"a decode step: ([\d.]+) ms per layer", 1).group(1))
                  for w in (mesh.workers[0], slow_worker, spare)}
        print(f"\nmeasured decode ms per layer: {speeds}; End node decode {slow_ms:.1f} ms/token through the slow "
              f"worker, {fast_ms:.1f} ms/token after the spare moved to its layers")
        slow_worker.stop()  # out of the cgroup before it goes
