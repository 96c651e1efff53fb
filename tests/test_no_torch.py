"""The CPU path never imports torch (issue 17, part 4): generating, serving (structured output
included) and a worker's modules run without it, so a CPU box needs neither torch nor its
gigabytes. Checked in a fresh interpreter, where nothing else has imported it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
