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
