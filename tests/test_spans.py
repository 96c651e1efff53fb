"""A model run as one span equals the same model cut into spans fed one after another."""

from __future__ import annotations

from pathlib import Path

from meshpy.generation import Model
from meshpy.pipeline import split_layers

PROMPT = "Write a short poem about the sea."


def test_split_layers_covers_in_order() -> None:
    assert split_layers(30, 3) == [range(0, 10), range(10, 20), range(20, 30)]
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]


def test_greedy_64_tokens_one_span_equals_three_spans(smollm2_gguf: Path) -> None:
    one = Model.load(smollm2_gguf, threads=2, n_spans=1)
    three = Model.load(smollm2_gguf, threads=2, n_spans=3)
    assert [s.layers for s in three.pipeline.spans] == [range(0, 10), range(10, 20), range(20, 30)]
    prompt = one.encode(PROMPT)
    a = list(one.generate_ids(prompt, 64))
    b = list(three.generate_ids(prompt, 64))
    assert len(a) == 64, "greedy reply ended early; pick a prompt with a longer answer"
    assert a == b


RSS_SCRIPT = """
import sys
from meshpy import _native
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.pipeline import LocalSpan

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

source = open_model_source(sys.argv[1])
config = read_config(source)
pool = _native.ThreadPool(1)
before = rss()
span = LocalSpan(source, config, range(0, int(sys.argv[2])), pool)
print(rss() - before, span.native.nbytes)
"""


def span_rss(model: Path, n_layers: int) -> tuple[int, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model), str(n_layers)], capture_output=True, text=True, check=True)
    grown, weights = out.stdout.split()
    return int(grown), int(weights)


def test_span_memory_grows_with_its_layers(smollm2_gguf: Path) -> None:
    """Loading layers 0-9 makes resident about their weights, not the model's."""
    grown10, weights10 = span_rss(smollm2_gguf, 10)
    grown30, weights30 = span_rss(smollm2_gguf, 30)
    print(f"\nRSS growth: 10 layers {grown10 / 2**20:.1f} MiB ({weights10 / 2**20:.1f} MiB weights), "
          f"30 layers {grown30 / 2**20:.1f} MiB ({weights30 / 2**20:.1f} MiB weights)")
    assert weights10 * 2.9 < weights30 < weights10 * 3.1
    # Loading may touch each tensor (checks, repacking) but nothing beyond the span's own.
    assert grown10 <= weights10 + 8 * 2**20
    assert grown10 < 0.5 * grown30
