"""Prompt caching (issue 16, part 6): a prompt that starts as a recent one did (a long system
prompt, a growing chat) reuses the KV caches of that start, in one process and on the
workers of a mesh, and `usage.prompt_tokens_details.cached_tokens` says how many tokens it
did not prefill. The replies are the tokens a whole prefill gives; kept sessions are bounded
and closed, least recently used first. The speed-up is measured by
benches/bench_prompt_cache.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from meshpy.generation import Model
from meshpy.mesh.launcher import LocalMesh
from meshpy.prompt_cache import MIN_REUSED_TOKENS, PromptCache
from meshpy.server import AppServer, create_app
from tests.test_server import assert_openai_type, client_for, sse_chunks

#: A system prompt of some 1,000 tokens, as agents and chat UIs send with every request.
SYSTEM = "You are a careful assistant for a hardware shop. " + " ".join(
    f"Rule {i}: when asked about item {i}, answer in one short sentence and mention its shelf {i % 7}." for i in range(40))
QUESTIONS = ["What is on shelf 3?", "Do you sell hammers?", "What is on shelf 3?"]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Model]:
    with Model.load(smollm2_gguf, threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def uncached(model: Model) -> dict[str, list[int]]:
    """Each question's greedy reply with every prompt prefilled whole."""
    cache, model.prompt_cache = model.prompt_cache, None
    try:
        return {q: model.generate(chat(q), max_tokens=12).token_ids for q in QUESTIONS}
    finally:
        model.prompt_cache = cache


def test_a_repeated_system_prompt_is_prefilled_once(model: Model, uncached: dict[str, list[int]]) -> None:
    assert model.prompt_cache is not None
    model.prompt_cache.clear()
    system_tokens = len(model.encode([{"role": "system", "content": SYSTEM}]))
    assert system_tokens > 900
    with AppServer(create_app(model, "smollm2"), port=0) as server, client_for(server) as client:
        cached = []
        for i, q in enumerate(QUESTIONS):
            if i < 2:
                reply = client.chat.completions.create(model="smollm2", messages=chat(q), max_tokens=12, temperature=0)
                assert_openai_type(ChatCompletion, reply.model_dump(mode="json", exclude_unset=True))
                usage = reply.usage
                text = reply.choices[0].message.content
            else:  # streamed: the usage chunk says it too
                chunks = sse_chunks(server.base_url + "/chat/completions", {
                    "model": "smollm2", "messages": chat(q), "max_tokens": 12, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}})
                usage = openai.types.CompletionUsage.model_validate(chunks[-1]["usage"], strict=True)
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == model.tokenizer.decode(uncached[q]), "the reply a whole prefill gives"
            assert usage.prompt_tokens_details is not None
            cached.append(usage.prompt_tokens_details.cached_tokens)
        assert cached[0] == 0
        # The second shares the system prompt; the third the second's too, up to its question.
        assert system_tokens - 8 <= cached[1] < usage.prompt_tokens
        assert cached[2] >= cached[1]
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert f"meshpy_prompt_cached_tokens_total {float(cached[1] + cached[2])}" in metrics
        assert "meshpy_prompt_cache_sessions 1.0" in metrics
    assert model.prompt_cache.sessions == 1, "one session, taken and kept again by each request"


def test_a_growing_chat_prefills_only_its_new_turn(model: Model) -> None:
    assert model.prompt_cache is not None
    messages: list[dict[str, str]] = [{"role": "user", "content": "Name three fruits, in one line."}]
    first = model.generate(messages, max_tokens=16)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And three vegetables?"}]
    second = model.stream(messages, max_tokens=8)
    text = "".join(second)
    prompt = model.encode(messages)
    # Everything up to the first answer's end was held (the answer re-encodes to its tokens
    # here), and the new turn was all that ran.
    assert second.stats.cached_tokens >= len(model.encode(messages[:1])) + len(first.token_ids) - 2
    assert second.stats.cached_tokens < len(prompt)
    cache, model.prompt_cache = model.prompt_cache, None
    try:
        assert model.generate(messages, max_tokens=8).text == text
    finally:
        model.prompt_cache = cache


def test_prompt_caching_can_be_turned_off(smollm2_gguf: Path) -> None:
    with Model.load(smollm2_gguf, threads=2) as m:
        m.keep_prompts(3)
        assert m.prompt_cache is not None and m.prompt_cache.max_sessions == 3
        m.keep_prompts(0)  # `meshpy serve --prompt-cache 0`
        assert m.prompt_cache is None
        for _ in range(2):
            assert m.generate(chat(QUESTIONS[0]), max_tokens=2).stats.cached_tokens == 0


def test_kept_sessions_are_bounded_and_the_least_recently_used_goes_first(model: Model) -> None:
    cache = PromptCache(model.pipeline, max_sessions=2, max_positions=10_000, max_idle=60)
    original, model.prompt_cache = model.prompt_cache, cache
    try:
        prompts = [f"Story number {i}: once upon a time, in a land far away, there lived a" for i in range(3)]
        for p in prompts:
            model.generate(p, max_tokens=2, raw=True)
        assert cache.sessions == 2
        # The first prompt's session went first: it is prefilled whole again.
        assert model.generate(prompts[0] + " king", max_tokens=1, raw=True).stats.cached_tokens == 0
        again = model.generate(prompts[2] + " queen", max_tokens=1, raw=True)
        assert again.stats.cached_tokens >= len(model.encode(prompts[2], raw=True)) - 1
        # A short prompt is not worth a session; a prompt scored whole never takes one.
        assert len(model.encode("Hi", raw=True)) < MIN_REUSED_TOKENS
        cache.max_idle = 0.0
        time.sleep(0.01)
        assert cache.take(model.encode(prompts[1], raw=True)) is None and cache.sessions == 0, "idle ones expire"
        cache.max_positions = 30
        model.generate(prompts[1] + " dragon and a very long story with many words that run past thirty tokens",
                       max_tokens=12, raw=True)
        assert cache.sessions == 0, "a session holding more than the bound is closed"
        # Idle ones are closed while nothing else happens, too.
        model.prompt_cache = idle = PromptCache(model.pipeline, max_idle=0.3)
        model.generate(prompts[1], max_tokens=2, raw=True)
        assert idle.sessions == 1
        time.sleep(1.0)
        assert idle.sessions == 0, "closed by the sweeper"
        idle.close()
    finally:
        cache.close()
        model.prompt_cache = original


@pytest.mark.slow
def test_mesh_workers_reuse_the_kept_caches(smollm2_gguf: Path, uncached: dict[str, list[int]]) -> None:
    """On a 2-worker mesh the kept session's caches stay on its workers: the second request
    sends only its new tokens and gets the tokens a whole prefill gives; a worker without
    room for a new session gets the kept ones back first; clearing the cache frees the
    sessions on every worker."""
    from meshpy.mesh import connect

    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        # Room for about 1,450 positions: one kept session of the system prompt, not two.
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1, kv_budget="16MiB")
        mesh.add_worker(smollm2_gguf, layers="15-29", threads=1, kv_budget="16MiB")
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
            assert model.prompt_cache is not None

            def worker_sessions() -> list[int]:
                return [p.sessions for p in model.pipeline.refresh()]  # type: ignore[attr-defined]

            stats: list[Any] = []
            for q in QUESTIONS:
                gen = model.stream(chat(q), max_tokens=12)
                "".join(gen)
                assert gen.token_ids == uncached[q]
                stats.append(gen.stats)
            assert stats[0].cached_tokens == 0 and stats[1].cached_tokens > 900 and stats[2].cached_tokens > 900
            assert worker_sessions() == [1, 1]
            other = [{"role": "user", "content": "Summarise these rules: " + SYSTEM}]  # shares no start
            gen = model.stream(other, max_tokens=4)
            "".join(gen)
            assert gen.stats.cached_tokens == 0 and gen.stats.completion_tokens == 4
            assert worker_sessions() == [1, 1], "the kept session made room for it, and it is kept now"
            model.prompt_cache.clear()
            assert worker_sessions() == [0, 0]
