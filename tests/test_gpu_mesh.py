"""The torch path end to end, on torch's CPU device (no GPU needed): every family's tiny
checkpoint through `Model.load(device="torch-cpu")` gives transformers' stored logits, as the
CPU path does, whole and cut into spans; and a mesh of one CPU-path worker and one
torch-path worker gives the one-process greedy tokens, on the tiny checkpoints (f32
weights) and on SmolLM2 (Q4_1)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tests.family_checks as checks

pytest.importorskip("torch")

DATA = Path(__file__).parent / "data"
TINY = sorted(p.name for p in DATA.glob("tiny-*") if (p / "reference_logits.npz").exists())

#: Where each tiny checkpoint is cut for the mixed mesh: the CPU path serves the first range,
#: torch the second (Gemma 4 PLE: inside its KV-sharing group, so keys and values cross).
MESH_SPLITS = {"tiny-gemma4-ple": ["0-3", "4-5"], "tiny-gemma4": ["0-2", "3-4"], "tiny-gemma4-moe": ["0-1", "2-3"]}


@pytest.mark.parametrize("variant", TINY)
def test_torch_gives_the_stored_reference(variant: str) -> None:
    """f32 weights on torch's CPU device: transformers' logits to `LOGIT_ATOL` (1e-4), the
    bound the CPU path meets, for prefill and decode steps."""
    checks.check_stored_reference(DATA / variant, device="torch-cpu")


@pytest.mark.parametrize("variant", ["tiny-llama", "tiny-gemma4-ple", "tiny-qwen3-moe-mixed", "tiny-gpt-oss"])
def test_torch_spans_give_the_stored_reference(variant: str) -> None:
    """Cut into two and three torch spans (Gemma 4 PLE: the carried keys and values)."""
    for n_spans in (2, 3):
        checks.check_stored_reference(DATA / variant, device="torch-cpu", n_spans=n_spans)


@pytest.mark.slow
@pytest.mark.parametrize("variant", TINY)
def test_a_mesh_of_cpu_and_torch_workers_gives_the_one_process_tokens(variant: str, tmp_path: Path) -> None:
    """Layers on a CPU-path worker, then on a torch-path one: the one-process tokens."""
    n_layers = {"tiny-gemma4-ple": 6, "tiny-gemma4": 5, "tiny-gemma4-moe": 4}.get(variant, 3)
    layers = MESH_SPLITS.get(variant, ["0-0", f"1-{n_layers - 1}"])
    checks.check_mesh_gives_the_one_process_tokens(DATA / variant, layers, tmp_path, devices=["cpu", "torch-cpu"])


def test_a_mesh_of_torch_then_cpu_workers_gives_the_one_process_tokens(tmp_path: Path) -> None:
    """The other order, on a fast default-suite pair of families (the first with the End
    node's embedding and head on torch too)."""
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-qwen3-tied", ["0-1", "2-2"], tmp_path, devices=["torch-cpu", "cpu"],
                                                   end_device="torch-cpu")
    checks.check_mesh_gives_the_one_process_tokens(DATA / "tiny-gemma4-ple", ["0-3", "4-5"], tmp_path / "g", devices=["torch-cpu", "cpu"])


@pytest.mark.slow
def test_smollm2_on_a_mesh_of_cpu_and_torch_workers_gives_the_one_process_tokens(smollm2_gguf: Path, tmp_path: Path) -> None:
    """SmolLM2 (Q4_1): the torch worker multiplies the dequantized weights in f32 while the
    CPU path rounds activations to 16-bit blocks; the greedy tokens still agree."""
    checks.check_mesh_gives_the_one_process_tokens(smollm2_gguf, ["0-14", "15-29"], tmp_path, devices=["cpu", "torch-cpu"])


def decode(model, session, tokens: list[int], n: int) -> None:  # noqa: ANN001
    """`n` greedy steps of `session`, appended to `tokens` (whose last is not yet fed)."""
    for _ in range(n):
        logits = model.step(session, tokens[-1])
        tokens.append(int(np.argmax(model.end.samplable(logits))))


@pytest.mark.slow
@pytest.mark.parametrize("leaving_device", ["torch-cpu", "cpu"])
def test_a_session_hands_over_between_a_torch_and_a_cpu_worker(smollm2_gguf: Path, leaving_device: str) -> None:
    """Layers 10-19 on a torch worker and on a CPU one (as `meshpy status` shows them): the
    worker on the route leaves mid-stream and hands the session (its KV state: the same bytes
    on either path) to the other, which carries on with no position replayed; then a session
    forked there (as `n` > 1 choices fork the prompt) continues as its source does. The
    tokens are one process's."""
    from meshpy.generation import Model
    from meshpy.mesh import connect
    from meshpy.mesh.launcher import LocalMesh
    from tests.test_mesh import N_TOKENS, PROMPT, greedy, greedy_on

    want = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, N_TOKENS)
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-9", threads=1)
        other = "cpu" if leaving_device == "torch-cpu" else "torch-cpu"
        leaving = mesh.add_worker(smollm2_gguf, layers="10-19", threads=1, extra=("--device", leaving_device))
        mesh.add_worker(smollm2_gguf, layers="20-29", threads=1)
        # The star route: the End node owns the session on every worker, so the leaving one
        # waits for it (on a chain its relay learns first; the worker may be gone before the
        # End node follows, which is then a replay: tests/test_handover.py covers chains).
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route="star", route_timeout=60) as model:
            session = model.new_session()
            logits = model.prefill(session, model.encode(PROMPT))
            tokens = [int(np.argmax(model.end.samplable(logits)))]
            decode(model, session, tokens, 9)
            stays = mesh.add_worker(smollm2_gguf, layers="10-19", threads=1, extra=("--device", other))
            # `meshpy status` shows where each worker's layers run.
            out = subprocess.run([sys.executable, "-m", "meshpy", "status", "--json", "--bootstrap", mesh.bootstrap_addr],
                                 capture_output=True, text=True, timeout=120, env=mesh.env, check=True).stdout
            devices = sorted((w["first_layer"], w["device"]) for w in json.loads(out)["workers"])
            assert devices == [(0, "cpu"), (10, "cpu"), (10, "torch-cpu"), (20, "cpu")], devices
            leaving.proc.send_signal(signal.SIGTERM)
            leaving.wait_for(r"handed session [0-9a-f]{32} over to (\S+)", 60)
            decode(model, session, tokens, 1)  # follows the session to the worker that stays
            assert session.hops[1].provider.peer_id in "\n".join(stays.stdout)
            assert model.pipeline.recovery["replayed_positions"] == 0, "\n".join(leaving.stdout[-30:])
            fork = model.pipeline.fork(session, session.n_positions)
            rest = greedy_on(model, session, tokens)
            assert tokens + rest == want
            assert greedy_on(model, fork, tokens) == rest


def test_the_end_node_on_torch_gives_the_cpu_paths_rows_logits_and_tokens(smollm2_gguf: Path) -> None:
    """SmolLM2's embedding and tied head (Q4_1) on torch: the embedded rows bit for bit (the
    torch dequantizers are ggml's), logits within 1e-3 relative RMS of the CPU path's (which
    rounds the head's input to 16-bit blocks; measured 2e-4), and the same greedy tokens,
    with the layers on either path."""
    from meshpy.generation import Model
    from tests.family_checks import relative_rms
    from tests.test_mesh import PROMPT, greedy

    cpu = Model.load(smollm2_gguf, threads=2)
    torch_end = Model.load(smollm2_gguf, threads=2, device="torch-cpu")
    assert torch_end.end.device == "torch-cpu" and cpu.end.device == "cpu"
    ids = cpu.encode(PROMPT)
    np.testing.assert_array_equal(torch_end.end.embed(ids), cpu.end.embed(ids))
    hidden = np.random.default_rng(0).standard_normal((5, cpu.config.hidden)).astype(np.float32)
    assert relative_rms(torch_end.end.logits(hidden), cpu.end.logits(hidden)) < 1e-3
    assert greedy(torch_end, PROMPT, 32) == greedy(cpu, PROMPT, 32)


def test_matrices_kept_in_their_blocks_give_the_dense_outputs(gemma3_gguf: Path) -> None:
    """Gemma 3 270M (Q4_K_M): the matrices stored in a type the GPU kernels serve stay in
    their GGUF blocks (what a GPU worker holds, multiplied by the dequantizing kernels; here
    their dequantize-and-matmul fallback), the others dequantized: the span's outputs equal the
    all-dense span's to f32 rounding, and it holds those matrices' stored bytes."""
    from meshpy import _native
    from meshpy.gpu.backend import BLOCK_ROLES, torch_span
    from meshpy.gpu.quant import KERNEL_TYPES
    from meshpy.models.config import read_config
    from meshpy.models.source import open_model_source
    from meshpy.pipeline import LocalSpan

    source = open_model_source(gemma3_gguf)
    config = read_config(source)
    cpu = LocalSpan(source, config, range(0, 3), _native.ThreadPool(2))
    names = [config.layer_names(i) for i in range(3)]
    span_config = config.span_config(None, None)
    blocks, blocks_bytes = torch_span(cpu.native, span_config, "torch-cpu", source.checkpoint, names, keep_quantized=True)
    dense, dense_bytes = torch_span(cpu.native, span_config, "torch-cpu", source.checkpoint, names, keep_quantized=False)
    kept = [source.checkpoint.tensor_info(n) for names_i in names for r, n in names_i.items() if r in BLOCK_ROLES]
    kept = [(ty, shape) for ty, shape in kept if ty in KERNEL_TYPES]
    assert kept  # Q5_0 and Q4_K in this file
    saved = sum(4 * int(np.prod(shape)) - _native.tensor_nbytes(ty, list(shape)) for ty, shape in kept)
    assert blocks_bytes == dense_bytes - saved
    rows = np.random.default_rng(0).standard_normal((6, config.hidden)).astype(np.float32)
    caches = (blocks.new_cache(16), dense.new_cache(16))
    for step in (rows[:5], rows[5:]):
        got, want = blocks.forward(step, caches[0]), dense.forward(step, caches[1])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
