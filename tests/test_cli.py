"""`meshpy generate` as a user runs it, and the errors a user sees for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meshpy import SamplingParams, load_model
from meshpy.errors import (
    CheckpointFormatError,
    ContextOverflowError,
    MissingTensorError,
    UnsupportedArchitectureError,
    UnsupportedTypeError,
)


def meshpy_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshpy", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_generate_streams_reply_and_prints_speeds(smollm2_gguf: Path) -> None:
    run = meshpy_cli("generate", "--model", str(smollm2_gguf), "--prompt", "Name a color.", "--max-tokens", "12", "--threads", "2")
    assert run.returncode == 0, run.stderr
    model = load_model(smollm2_gguf, threads=2)
    expected = model.generate("Name a color.", max_tokens=12).text
    assert run.stdout == expected + "\n"
    assert "tok/s" in run.stderr and "prompt" in run.stderr


def test_packaged_name_and_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPY_MAX_TOKENS", "3")
    run = meshpy_cli("generate", "-m", "smollm2", "-p", "Hi", "--raw")
    assert run.returncode == 0, run.stderr
    assert "generated 3 tokens" in run.stderr or "finish: stop" in run.stderr


def test_version() -> None:
    from meshpy import _native

    done = meshpy_cli("--version", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("meshpy-llm ") and f"(core {_native.__version__})" in done.stdout, done.stdout


def test_bad_flag_values_are_rejected_clearly() -> None:
    run = meshpy_cli("generate", "-m", "smollm2", "-p", "x", "--temperature", "-1")
    assert run.returncode == 2
    assert "--temperature" in run.stderr and "outside" in run.stderr
    run = meshpy_cli("generate", "-m", "smollm2", "-p", "x", "--max-tokens", "many")
    assert run.returncode == 2 and "--max-tokens" in run.stderr


def test_truncated_gguf_names_file(tmp_path: Path, smollm2_gguf: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes()[: 3_000_000])
    run = meshpy_cli("generate", "-m", str(bad), "-p", "hi")
    assert run.returncode == 2
    assert str(bad) in run.stderr and "error" in run.stderr
    with pytest.raises(CheckpointFormatError, match="cut.gguf"):
        load_model(bad)


@pytest.fixture
def tiny_copy(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir, out)
    return out


def test_missing_tensor_lists_names(tiny_copy: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tiny_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tiny_copy / "model.safetensors")
    with pytest.raises(MissingTensorError) as err:
        load_model(tiny_copy)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.1.mlp.gate_proj.weight" in str(err.value)  # a listed neighbour


def test_unsupported_architecture_lists_supported(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM.*supported: .*llama"):
        load_model(tiny_copy)


def test_unsupported_weight_type_lists_supported(tiny_copy: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tiny_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.int32)
    save_file(tensors, tiny_copy / "model.safetensors")
    with pytest.raises(UnsupportedTypeError, match="q_proj.*supported"):
        load_model(tiny_copy)


def test_prompt_longer_than_context(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir, threads=2)
    ids = [5] * (model.config.max_positions + 1)
    with pytest.raises(ContextOverflowError, match=f"{len(ids)} tokens.*{model.config.max_positions}"):
        list(model.generate_ids(ids, 4))
    # The model still works after the refused request.
    assert len(list(model.generate_ids([5, 6, 7], 4, SamplingParams()))) <= 4


def test_generation_stops_at_context_end(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir, threads=2)
    n = model.config.max_positions
    out = list(model.generate_ids([5] * (n - 3), 50))
    assert len(out) <= 3


def test_stream_equals_generate_and_seed_reproduces(smollm2_gguf: Path) -> None:
    model = load_model(smollm2_gguf, threads=2)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    a = model.generate("Tell me a fact.", max_tokens=24, sampling=sampling)
    b = "".join(model.stream("Tell me a fact.", max_tokens=24, sampling=sampling))
    assert a.text == b
    assert a.stats.completion_tokens == len(a.token_ids) > 0
    assert a.stats.prompt_tokens == len(model.encode("Tell me a fact."))
