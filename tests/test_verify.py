"""Honest-worker checks (issue 12 part 3), with real processes on 127.0.0.1: a worker that lies
(the test adversary `MESHPY_TEST_LIAR`, negating its outputs on half its steps) among honest
providers of the same layers. With `verify=1.0` every session's text equals one process's, the
liar is caught by a third provider and banned, sessions go on without it, and `meshpy status`
shows the ban and why. The tolerance rule itself is checked on its own."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.errors import VerificationError
from meshpy.generation import Model
from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from meshpy.mesh.verify import VERIFY_TOLERANCE, disagreement
from tests.test_mesh import greedy
from tests.test_private_mesh import PROMPT, meshpy

LIAR = {"MESHPY_TEST_LIAR": "0.5"}


def test_disagreement_is_the_largest_row_difference_relative_to_the_row() -> None:
    b = np.array([[3.0, 4.0], [0.0, 10.0]], np.float32)
    assert disagreement(b, b) == 0.0
    assert disagreement(b + np.array([[0.05, 0.0], [0.0, 0.0]], np.float32), b) == pytest.approx(0.01)
    assert disagreement(b + np.array([[0.0, 0.0], [0.0, 0.2]], np.float32), b) == pytest.approx(0.02)
    assert disagreement(-b, b) == pytest.approx(2.0)
    assert disagreement(b[:1], b) == float("inf")
    nan = b.copy()
    nan[1, 1] = np.nan
    assert disagreement(nan, b) == float("inf")
    assert VERIFY_TOLERANCE == 1e-2


@pytest.mark.slow
def test_a_lying_worker_is_caught_banned_and_never_changes_a_verified_session(smollm2_gguf: Path) -> None:
    want = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, 16)
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        honest = mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
        liar = mesh.add_worker(smollm2_gguf, layers="0-14", threads=1, env=LIAR)
        mesh.add_worker(smollm2_gguf, layers="15-29", threads=1)
        assert liar.wait_for("a test adversary", 10)
        liar_id = liar.wait_for(r"meshpy worker (\S+) listening").group(1)
        honest_id = honest.wait_for(r"meshpy worker (\S+) listening").group(1)
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60, verify=1.0) as model:
            pipeline = model.pipeline
            # The adversary bites: the same steps on the liar and on the honest worker differ
            # (on about half of them; which ones depends on session and step).
            x = model.end.embed(model.encode(PROMPT))
            gaps = []
            for session in range(100, 108):
                entries = [(session, 0, 0, len(x))]
                honest_out, liar_out = (
                    pipeline.node.forward(peer, pipeline.model.digest, pipeline.model.name, 0, 15, entries, x)
                    for peer in (honest_id, liar_id)
                )
                gaps.append(disagreement(liar_out, honest_out))
            assert any(g > 1.0 for g in gaps) and any(g == 0.0 for g in gaps), gaps
            for peer in (honest_id, liar_id):
                pipeline.node.request(peer, _native.encode_close_session(list(range(100, 108))))
            # Two providers of layers 0-14 now, so every session's shadow pairs the liar with
            # the honest worker; without a third they cannot tell who lies.
            with pytest.raises(VerificationError, match="no third provider"):
                greedy(model, PROMPT, 16)
            referee = mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
            referee_id = referee.wait_for(r"meshpy worker (\S+) listening").group(1)
            for _ in range(3):
                assert greedy(model, PROMPT, 16) == want
            assert list(pipeline.bans.reasons()) == [liar_id]
            reason = pipeline.bans.reasons()[liar_id]
            assert re.search(rf"differed from ({honest_id} and {referee_id}|{referee_id} and {honest_id})'s", reason), reason
            assert pipeline.verify_counts["mismatches"] >= 1 and pipeline.verify_counts["sessions"] == 4
            # Closed sessions left nothing behind: primaries, shadows and referees alike.
            for peer in (honest_id, liar_id, referee_id):
                assert pipeline.node.info(peer)["sessions"] == 0, peer
            status = meshpy("status", "--bootstrap", mesh.bootstrap_addr)
            assert status.returncode == 0, status.stderr
            assert "checks 100% of its sessions; 1 worker(s) banned" in status.stdout, status.stdout
            lines = status.stdout.splitlines()
            at = next(i for i, line in enumerate(lines) if line.startswith(liar_id))
            banned = next(line for line in lines[at:] if "BANNED by End node" in line)
            assert "its output differed from" in banned and "tolerance 0.01" in banned, status.stdout
