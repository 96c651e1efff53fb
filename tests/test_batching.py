"""Concurrent decode steps in one process share passes (`meshpy.batching`): each generation
gets exactly the tokens it gets alone, the steps really ran together, and a step that fails
inside a batch fails alone while the others carry on unchanged."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshpy.errors import ContextOverflowError
from meshpy.generation import Model

N_TOKENS = 16


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Model:
    return Model.load(smollm2_gguf, threads=2)


def greedy(model: Model, ids: Sequence[int], n: int, session: Any = None) -> list[int]:
    own = session is None
    session = model.new_session() if own else session
    try:
        logits = model.prefill(session, ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = model.step(session, out[-1])
        return out
    finally:
        if own:
            model.close_session(session)


def test_concurrent_generations_batch_and_each_equals_its_run_alone(model: Model) -> None:
    prompts = [model.encode(f"Name {i + 2} rivers of Europe and say where each one flows.") for i in range(4)]
    want = [greedy(model, p, N_TOKENS) for p in prompts]
    batcher = model.step_batcher
    assert batcher is not None
    before = (batcher.batches, batcher.steps)
    got: list[list[int] | None] = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, greedy(model, prompts[i], N_TOKENS)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    batches, steps = batcher.batches - before[0], batcher.steps - before[1]
    assert steps == len(prompts) * N_TOKENS
    assert batches < steps, "some steps shared a pass"


def test_a_step_that_fails_in_a_batch_fails_alone(model: Model) -> None:
    """Session `full` has no room for another position; its step and session `ok`'s queue
    while a third session's step runs, so they share the next batch. `full` gets its
    ContextOverflowError, `ok` its logits, and `ok` then generates what it generates alone.
    (Tried up to 20 times: the pair must reach the queue before the third step ends.)"""
    prompt = model.encode("Count from one to twenty.")
    want = greedy(model, prompt, N_TOKENS)
    batcher = model.step_batcher
    assert batcher is not None
    shared = False
    for _ in range(20):
        full = model.pipeline.new_session(max_len=len(prompt))
        ok, busy = model.new_session(), model.new_session()
        try:
            first_full = int(np.argmax(model.prefill(full, prompt)))
            first_ok = int(np.argmax(model.prefill(ok, prompt)))
            model.prefill(busy, prompt)
            batches, steps = batcher.batches, batcher.steps
            results: dict[str, Any] = {}

            def run(name: str, session: Any, token: int) -> None:
                try:
                    results[name] = model.step(session, token)
                except ContextOverflowError as e:
                    results[name] = e

            go = threading.Event()

            def run_later(name: str, session: Any, token: int) -> None:
                go.wait()
                run(name, session, token)

            pair = [threading.Thread(target=run_later, args=("full", full, first_full)),
                    threading.Thread(target=run_later, args=("ok", ok, first_ok))]
            for t in pair:
                t.start()
            runner = threading.Thread(target=run, args=("busy", busy, first_ok))
            runner.start()
            while not batcher.busy:
                time.sleep(0)
            go.set()
            for t in [runner, *pair]:
                t.join()
            assert batcher.steps - steps == 3
            shared = batcher.batches - batches == 2  # the busy step, then the pair together
            assert isinstance(results["full"], ContextOverflowError)
            logits = results["ok"]
            assert isinstance(logits, np.ndarray)
            got = [first_ok]
            for _ in range(N_TOKENS - 1):
                got.append(int(np.argmax(logits)))
                logits = model.step(ok, got[-1])
            assert got == want
        finally:
            for s in (full, ok, busy):
                model.close_session(s)
        if shared:
            break
    assert shared, "the two steps never shared a batch"
