"""The CPU path never imports torch (issue 17, part 4): generating, serving (structured output
included) and a worker's modules run without it, so a CPU box needs neither torch nor its
gigabytes. Checked in a fresh interpreter, where nothing else has imported it. And a torch
device asked for without torch, or CUDA without a GPU, is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CODE = """
import sys
import meshpy.cli, meshpy.mesh.worker, meshpy.mesh.client
from meshpy.constraint import Grammar
from meshpy.generation import load_model
from meshpy.server import create_app
model = load_model("smollm2")
create_app(model, "smollm2")
grammar = Grammar.from_response_format({"type": "json_object"}, model.tokenizer)
assert model.generate("Hi", max_tokens=2).text
print(sorted(m for m in ("torch", "transformers", "triton") if m in sys.modules))
"""


def test_the_cpu_path_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


MISSING_TORCH = """
import sys
sys.modules["torch"] = None  # as if it were not installed
from meshpy.errors import InvalidArgumentError
from meshpy.generation import Model
for device in ("cuda", "torch-cpu", "cuda:1"):
    try:
        Model.load("smollm2", device=device)
    except InvalidArgumentError as e:
        print(e)
try:
    Model.load("smollm2", device="tpu")
except InvalidArgumentError as e:
    print(e)
"""


def test_a_torch_device_without_torch_is_a_clear_error() -> None:
    done = subprocess.run([sys.executable, "-c", MISSING_TORCH], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[:3] == [f"--device {d} needs PyTorch: pip install 'meshpy-llm[cuda]'" for d in ("cuda", "torch-cpu", "cuda:1")]
    assert lines[3] == "unknown device 'tpu': use cpu, cuda, cuda:N or torch-cpu"


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    """Where torch sees no GPU (this machine, CI), `--device cuda` says so before loading."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    from meshpy.errors import InvalidArgumentError
    from meshpy.generation import Model

    with pytest.raises(InvalidArgumentError, match=r"--device cuda: no CUDA GPU is visible to PyTorch"):
        Model.load("smollm2", device="cuda")
