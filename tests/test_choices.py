"""Several choices of one prompt (`n`, issue 16 part 3), through the official openai client:
the prompt is prefilled once and each choice starts from a copy of its session (in one
process, and on a mesh, where each worker copies its cache: `ForkSession`); sampled choices
are each what a single request with their seed gives; streamed and whole, every response
validated strictly against the openai types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from meshpy.generation import Model
from meshpy.mesh.launcher import LocalMesh
from meshpy.server import AppServer, create_app
from tests.test_server import QUESTION, assert_openai_type, client_for, error_of, sse_chunks


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Model]:
    with Model.load(smollm2_gguf, threads=2) as m:
        # Each request prefills its prompt, and feeds only its own tokens: what is counted below.
        m.prompt_cache, m.speculation = None, False
        yield m


class EmbeddedTokens:
    """Counts the tokens the End model embeds (every row the layers run starts there)."""

    def __init__(self, model: Model) -> None:
        self.model, self.count, self._embed = model, 0, model.end.embed

    def __enter__(self) -> EmbeddedTokens:
        def counting(ids: Any) -> Any:
            self.count += len(ids)
            return self._embed(ids)

        self.model.end.embed = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.end.embed = self._embed  # type: ignore[method-assign]


def test_greedy_choices_share_one_prefill(client: openai.OpenAI, model: Model) -> None:
    prompt = len(model.encode(QUESTION))
    with EmbeddedTokens(model) as embedded:
        reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=10, temperature=0, n=3)
    assert_openai_type(ChatCompletion, reply.model_dump(mode="json", exclude_unset=True))
    expected = model.generate(QUESTION, max_tokens=10)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == expected.text for c in reply.choices)
    assert reply.usage.prompt_tokens == prompt, "the prompt counts once"
    assert reply.usage.completion_tokens == 3 * len(expected.token_ids)
    # The prompt ran once; then each choice's tokens (the last gives the end of turn).
    assert embedded.count == prompt + 3 * len(expected.token_ids), (embedded.count, prompt)


def test_sampled_choices_are_the_seeded_single_requests(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0,
                            "seed": 40}
    many = client.completions.create(**args, n=4)
    assert_openai_type(Completion, many.model_dump(mode="json", exclude_unset=True))
    texts = [c.text for c in many.choices]
    assert len(set(texts)) > 1, "sampled choices differ"
    for i, text in enumerate(texts):
        assert client.completions.create(**{**args, "seed": 40 + i}).choices[0].text == text, i
    assert [c.text for c in client.completions.create(**args, n=4).choices] == texts, "a seed repeats"


def test_streamed_choices_interleave_and_add_up(server: AppServer, client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0.8, "seed": 3,
                            "n": 2, "logprobs": True, "top_logprobs": 1}
    whole = client.chat.completions.create(**body)
    chunks = sse_chunks(server.base_url + "/chat/completions", {**body, "stream": True,
                                                                "stream_options": {"include_usage": True}})
    for chunk in chunks:
        assert_openai_type(ChatCompletionChunk, chunk)
    for i, choice in enumerate(whole.choices):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content") or "" for c in mine) == choice.message.content
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice.finish_reason]
        streamed = [e["token"] for c in mine for e in ((c["logprobs"] or {}).get("content") or [])]
        assert streamed == [e.token for e in choice.logprobs.content]
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, echo=True, n=2)


def test_each_choice_takes_a_generation_slot(model: Model) -> None:
    """`max_concurrent` bounds generations (and the sessions they hold), choices included: a
    request for more choices than the server runs at once is refused, one for as many runs."""
    with AppServer(create_app(model, "smollm2", max_concurrent=2), port=0) as server, client_for(server) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, n=3)
        assert error_of(info.value)["param"] == "n"
        assert len(client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, n=2).choices) == 2
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["active_generations"] == 0 and health["completed_generations"] == 2


@pytest.mark.slow
def test_mesh_choices_fork_the_workers_caches(smollm2_gguf: Path, model: Model) -> None:
    """On a 2-worker mesh the choices' sessions are copies of the first's on each worker: the
    prompt crosses the mesh once, and the tokens are those of one process."""
    from meshpy.mesh import connect

    prompt = model.encode(QUESTION)
    expected = model.generate(QUESTION, max_tokens=10).token_ids
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
        mesh.add_worker(smollm2_gguf, layers="15-29", threads=1)
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as remote:
            remote.prompt_cache, remote.speculation = None, False
            with AppServer(create_app(remote, "smollm2"), port=0) as server, client_for(server) as client:
                with EmbeddedTokens(remote) as embedded:
                    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=10,
                                                           temperature=0, n=3)
            assert all(c.message.content == model.tokenizer.decode(expected) for c in reply.choices)
            assert embedded.count == len(prompt) + 3 * len(expected)
            assert [p.sessions for p in remote.pipeline.refresh()] == [0, 0], "every copy closed"
