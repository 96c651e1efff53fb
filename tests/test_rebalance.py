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
