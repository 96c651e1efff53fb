"""Every running generation advances in shared iterations (`meshpy.scheduler`): each
generation gets exactly the tokens it gets alone, iterations really carry several of them, a
long prompt is prefilled in chunks between other streams' tokens, and a generation that fails
inside an iteration fails alone while the others carry on unchanged."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshpy.errors import InvalidArgumentError
from meshpy.generation import GenerationStats, Model
from meshpy.sampling import Sampler, SamplingParams
from meshpy.scheduler import PREFILL_CHUNK

N_TOKENS = 16


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Model:
    with Model.load(smollm2_gguf, threads=2) as m:
        # Every prompt prefilled whole: these tests time prefill against decoding, and run a
        # prompt alone before running it again (tests/test_prompt_cache.py tests the cache).
        m.prompt_cache = None
        yield m


class Recorder:
    """A TokenSink that keeps the tokens, and the tokens `others` had when each one came."""

    def __init__(self, others: Sequence[Recorder] = ()) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.others = others
        self.seen_at_first: list[int] | None = None
        self.ended = threading.Event()

    def token(self, token: int, logprob: object = None) -> bool:
        if not self.tokens:
            self.seen_at_first = [len(o.tokens) for o in self.others]
        self.tokens.append(token)
        return True

    def end(self, finish_reason: str | None, error: BaseException | None) -> None:
        self.reason, self.error = finish_reason, error
        self.ended.set()

    def closed(self) -> None:
        pass


def submit(model: Model, prompt: Sequence[int], sink: Recorder, n: int = N_TOKENS,
           sampling: SamplingParams | None = None) -> None:
    model.scheduler.submit(prompt, n, Sampler(sampling or SamplingParams()), frozenset(), sink,
                           GenerationStats(prompt_tokens=len(prompt)))


def alone(model: Model, prompt: Sequence[int], n: int = N_TOKENS) -> list[int]:
    sink = Recorder()
    submit(model, prompt, sink, n)
    assert sink.ended.wait(120) and sink.error is None
    return sink.tokens


def test_concurrent_generations_share_iterations_and_each_equals_its_run_alone(model: Model) -> None:
    prompts = [model.encode(f"Name {i + 2} rivers of Europe and say where each one flows.") for i in range(4)]
    want = [list(model.generate_ids(p, N_TOKENS)) for p in prompts]
    iterations, entries, _ = model.scheduler.counters()
    got: list[list[int] | None] = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, list(model.generate_ids(prompts[i], N_TOKENS))))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    iterations2, entries2, _ = model.scheduler.counters()
    assert entries2 - entries >= len(prompts) * N_TOKENS
    assert iterations2 - iterations < entries2 - entries, "some iterations carried several generations"


def test_a_long_prompt_is_prefilled_in_chunks_between_the_others_tokens(model: Model) -> None:
    """Three streams decode; a prompt of 1500 tokens arrives. It is prefilled a chunk per
    iteration alongside their decode rows, so each of them gets tokens while it prefills,
    and every generation (the long one too) equals its run alone."""
    shorts = [model.encode(f"Write a poem about the sea, number {i}.") for i in range(3)]
    long_prompt = model.encode(" ".join(f"Item {i} is a stone." for i in range(300)), raw=True)[:1500]
    assert len(long_prompt) == 1500
    n_short = 96
    want_short = [alone(model, p, n_short) for p in shorts]
    want_long = alone(model, long_prompt, 8)

    sinks = [Recorder() for _ in shorts]
    for p, sink in zip(shorts, sinks):
        submit(model, p, sink, n_short)
    deadline = time.monotonic() + 120
    while min(len(s.tokens) for s in sinks) < 4:  # all three decoding
        assert time.monotonic() < deadline and not any(s.ended.is_set() for s in sinks), "streams stalled"
        threading.Event().wait(0.005)
    at_submit = [len(s.tokens) for s in sinks]
    long_sink = Recorder(others=sinks)
    submit(model, long_prompt, long_sink, 8)
    for sink in [*sinks, long_sink]:
        assert sink.ended.wait(300) and sink.error is None
    assert [s.tokens for s in sinks] == want_short
    assert long_sink.tokens == want_long
    assert long_sink.seen_at_first is not None
    during = [b - a for a, b in zip(at_submit, long_sink.seen_at_first)]
    # Unchunked, the prompt would take ceil(1500 / PREFILL_CHUNK) iterations with no decode.
    print("tokens each stream got while the long prompt prefilled:", during)
    assert min(during) > -(-1500 // PREFILL_CHUNK), f"tokens each stream got while the prompt prefilled: {during}"


def test_a_generation_that_fails_in_an_iteration_fails_alone(model: Model) -> None:
    """A prompt with a token id outside the vocabulary fails (the embedding refuses it) in an
    iteration it shares with a good generation; the good one gets its tokens alone, as when
    run alone. A long prompt ahead of both makes them arrive in one iteration."""
    good = model.encode("Count from one to twenty.")
    want = alone(model, good, N_TOKENS)
    ahead = model.encode(" ".join(f"Line {i}." for i in range(200)), raw=True)[: PREFILL_CHUNK + 40]
    first, bad, ok = Recorder(), Recorder(), Recorder()
    iterations, entries, _ = model.scheduler.counters()
    submit(model, ahead, first, 4)
    submit(model, [*good[:3], 10**6, *good[3:]], bad)
    submit(model, good, ok)
    for sink in (first, bad, ok):
        assert sink.ended.wait(120)
    iterations2, entries2, _ = model.scheduler.counters()
    assert entries2 - entries > iterations2 - iterations, "some iteration held several generations"
    assert isinstance(bad.error, InvalidArgumentError) and not bad.tokens
    assert ok.error is None and ok.tokens == want
    assert first.error is None


def test_an_empty_prompt_is_refused_at_once(model: Model) -> None:
    with pytest.raises(ValueError, match="empty"):
        list(model.generate_ids([], 4))


def test_a_cancelled_generation_stops_and_frees_its_session(model: Model) -> None:
    prompt = model.encode("Tell me a long story about a lighthouse.")
    gen = model.generate_ids(prompt, 200)
    got = [next(gen) for _ in range(3)]
    gen.close()  # cancels, and returns once the session is closed
    assert len(got) == 3
    stats = GenerationStats()
    list(model.generate_ids(prompt, 4, stats=stats))
    assert stats.completion_tokens == 4
    assert model.scheduler.running == 0


def test_closing_the_model_ends_running_generations(smollm2_gguf: Path) -> None:
    """`Model.close` cancels what runs: a generation being iterated ends (finish reason
    `cancelled`) instead of hanging, and new submissions are refused."""
    m = Model.load(smollm2_gguf, threads=1)
    stats = GenerationStats()
    gen = m.generate_ids(m.encode("Tell me a long story."), 500, stats=stats)
    got = [next(gen)]
    m.close()
    got += list(gen)
    assert 1 <= len(got) < 500 and stats.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        list(m.generate_ids([1, 2, 3], 4))


def test_a_generation_dropped_on_a_scheduler_thread_does_not_wait_for_itself(model: Model) -> None:
    """A generator the garbage collector finalizes on a scheduler thread must not wait there
    for its own end (that thread may be the one to end it): it only cancels."""
    gen = model.generate_ids(model.encode("Tell me a long story."), 200)
    next(gen)
    closer = threading.Thread(target=gen.close, name="meshpy-scheduler-test")
    closer.start()
    closer.join(10)
    assert not closer.is_alive()
    deadline = time.monotonic() + 60
    while model.scheduler.running:  # the lane still ends it and frees its session
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_model_nobody_holds_is_freed_with_its_threads(smollm2_gguf: Path) -> None:
    before = set(threading.enumerate())
    m = Model.load(smollm2_gguf, threads=1)
    m.generate("Hi", max_tokens=4)
    assert any(t.name.startswith("meshpy-scheduler") for t in set(threading.enumerate()) - before)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 10
    while left := [t.name for t in set(threading.enumerate()) - before if t.name.startswith("meshpy-scheduler")]:
        assert time.monotonic() < deadline, f"threads left: {left}"
        time.sleep(0.01)
