"""The OpenAI-compatible server, driven by the official `openai` package (and httpx for
raw bytes): a server in this process on 127.0.0.1, port 0, serving SmolLM2 Q4_1.

Most tests serve a model whose layers run in this process; the ones marked slow serve one
whose layers run on a 2-worker mesh (worker processes), to check that concurrent
streams get the tokens they would get alone and that a dropped stream frees the KV caches
on the workers. Answers are checked against the library itself (`Model.generate`, greedy).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from meshpy.generation import Model
from meshpy.mesh.launcher import LocalMesh, MeshProcess
from meshpy.sampling import SamplingParams
from meshpy.server import AppServer, StopText, create_app, layer_coverage
from tests.conftest import client_for
from tests.test_speculation import QUOTING

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: A raw prompt the model continues for thousands of tokens: generations still running
#: when the client goes away.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
KEY = "test-key"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Polls `predicate` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s (last: {value!r})")
        time.sleep(0.05)


def health(server: AppServer) -> dict[str, Any]:
    return httpx.get(server.url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Model]:
    with Model.load(smollm2_gguf, threads=1) as m:
        yield m


def stream_text(chunks: Any) -> tuple[str, list[Any]]:
    """The text of a streamed chat completion and its chunks."""
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# --- answers -----------------------------------------------------------------------------


def test_chat_completion_is_the_greedy_reply(client: openai.OpenAI, model: Model) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=64)
    expected = model.generate(QUESTION, max_tokens=64)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text and "Paris" in expected.text
    assert choice.finish_reason == "stop" == expected.stats.finish_reason
    assert reply.object == "chat.completion" and reply.model == "smollm2" and reply.id.startswith("chatcmpl-")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(model.encode(QUESTION))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_whole_reply(client: openai.OpenAI, server: AppServer) -> None:
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=64)
    with client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=64, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        text, chunks = stream_text(stream)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    # The raw event stream: server-sent events ending with [DONE]; no usage chunk unless asked.
    body = {"model": "smollm2", "messages": QUESTION, "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last


def test_token_limits_end_with_length(client: openai.OpenAI, model: Model) -> None:
    expected = model.generate(QUESTION, max_tokens=3)
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}, {"max_completion_tokens": 3, "max_tokens": 50}):
        reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, **limit)
        assert reply.choices[0].finish_reason == "length", limit
        assert reply.choices[0].message.content == expected.text
        assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_stop_strings_cut_the_text(client: openai.OpenAI, model: Model) -> None:
    full = model.generate(QUESTION, max_tokens=64).text  # "The capital of France is Paris."
    cut = full.index(" of France")
    for stop in (" of France", ["zzz", "of Fr", " of"]):
        reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=64, stop=stop)
        assert reply.choices[0].message.content == full[:cut]
        assert reply.choices[0].finish_reason == "stop"
        with client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=64, stop=stop,
                                            stream=True) as stream:
            assert stream_text(stream)[0] == full[:cut]
    # A stop string that never appears changes nothing.
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=64, stop="London")
    assert reply.choices[0].message.content == full


def test_stop_text_holds_back_what_may_start_a_stop_string() -> None:
    stops = StopText(["</end>", "xyz"])
    pieces = ["Hello <", "/e", "nd> tail"]
    assert [stops.add(p) for p in pieces] == ["Hello ", "", ""] and stops.stopped and stops.flush() == ""
    stops = StopText(["</end>"])
    assert stops.add("a </e") == "a " and stops.add("x") == "</ex" and stops.add("</") == "" and stops.flush() == "</"
    assert StopText([]).add("anything") == "anything"


def test_completion_of_raw_text(client: openai.OpenAI, model: Model) -> None:
    prompt = "The capital of France is"
    expected = model.generate(prompt, max_tokens=12, raw=True)
    reply = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.stats.finish_reason
    assert reply.usage is not None and reply.usage.prompt_tokens == len(model.encode(prompt, raw=True))
    with client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12, stream=True,
                                   stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage == reply.usage
    # Token ids as the prompt.
    ids = model.encode(prompt, raw=True)
    by_ids = client.completions.create(model="smollm2", prompt=ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == expected.text


def test_seeded_sampling_repeats(client: openai.OpenAI, model: Model) -> None:
    kwargs: dict[str, Any] = dict(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    expected = model.generate("Once upon a time", max_tokens=16, raw=True,
                              sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=7))
    assert first == expected.text


def test_models_list(client: openai.OpenAI, model: Model) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    extra = models[0].model_dump()
    assert extra["owned_by"] == "meshpy" and extra["context_length"] == model.config.max_positions
    assert extra["layers"] == {"n_layers": 30, "local": True, "missing_layers": []}


# --- errors ------------------------------------------------------------------------------


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "code"),
    [
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"temperature": 3}, 400, "temperature", "invalid_value"),
        ({"top_p": 1.5}, 400, "top_p", "invalid_value"),
        ({"seed": -1}, 400, "seed", "invalid_value"),
        ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"n": 17}, 400, "n", "invalid_value"),
        ({"max_tokens": 10_000}, 400, "max_tokens", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "messages", "context_length_exceeded"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
        ({"messages": []}, 400, "messages", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        # Never silently ignored: a schema that says nothing, a bias meshpy does not apply.
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format", "invalid_value"),
        ({"logit_bias": {"42": 5}}, 400, "logit_bias", "unsupported_parameter"),
        # SmolLM2's own chat template does not render tools: the model cannot be offered any.
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools", "unsupported_value"),
    ],
)
def test_request_errors(client: openai.OpenAI, kwargs: dict[str, Any], status: int, param: str, code: str) -> None:
    args: dict[str, Any] = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, **kwargs}
    expected_class = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(expected_class) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == status
    error = error_of(info.value)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_malformed_and_incomplete_bodies(server: AppServer) -> None:
    url = server.base_url + "/chat/completions"
    for body, param in ((b"{not json", None), (b"[1, 2]", None), (b'{"model": "smollm2"}', "messages"),
                        (json.dumps({"messages": QUESTION}).encode(), "model"),
                        (json.dumps({"model": "smollm2", "messages": QUESTION, "max_tokens": "many"}).encode(), "max_tokens")):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == param
    url = server.base_url + "/completions"
    for body, code in (({"model": "smollm2"}, "missing_required_parameter"),
                       ({"model": "smollm2", "prompt": "hello " * 9000}, "context_length_exceeded"),
                       ({"model": "smollm2", "prompt": [1, 2, 10**7]}, "invalid_value"),
                       ({"model": "smollm2", "prompt": ["one", "two"]}, "invalid_value"),
                       ({"model": "smollm2", "prompt": "hi", "suffix": "!"}, "unsupported_parameter"),
                       ({"model": "smollm2", "prompt": "hi", "response_format": {"type": "json_object"}},
                        "unsupported_parameter")):
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "suffix", "response_format")
        assert r.json()["error"]["code"] == code, r.json()
    r = httpx.get(server.base_url + "/embeddings", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def assert_openai_type(cls: type, body: dict[str, Any]) -> None:
    """`body` validates strictly as the openai package's `cls`, and carries no field that type
    (or any type nested in it) lacks."""
    from pydantic import BaseModel

    def no_extra(obj: object, where: str) -> None:
        if isinstance(obj, BaseModel):
            assert not obj.model_extra, f"{where} ({type(obj).__name__}) has fields the openai types lack: {sorted(obj.model_extra)}"
            for name in type(obj).model_fields:
                no_extra(getattr(obj, name), f"{where}.{name}")
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                no_extra(item, f"{where}[{i}]")

    no_extra(cls.model_validate(body, strict=True), cls.__name__)


def sse_chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed response, up to `data: [DONE]` (which must come)."""
    chunks, done = [], False
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done
    return chunks


def test_every_response_is_the_openai_types_field_for_field(server: AppServer) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    chat = {"model": "smollm2", "messages": QUESTION, "max_tokens": 6, "temperature": 0}
    whole = httpx.post(server.base_url + "/chat/completions", json=chat, timeout=60).json()
    assert_openai_type(ChatCompletion, whole)
    as_text = {**chat, "response_format": {"type": "text"}}  # plain text asked for explicitly: fine
    assert httpx.post(server.base_url + "/chat/completions", json=as_text, timeout=60).json()["choices"] == whole["choices"]
    assert whole["choices"][0]["message"]["refusal"] is None, "the message carries refusal, as the API's does"
    chunks = sse_chunks(server.base_url + "/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        assert_openai_type(ChatCompletionChunk, chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": chunks[0]["choices"][0]["delta"]["content"],
                                                 "refusal": None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
        whole["choices"][0]["message"]["content"]
    text = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    whole = httpx.post(server.base_url + "/completions", json=text, timeout=60).json()
    assert_openai_type(Completion, whole)
    chunks = sse_chunks(server.base_url + "/completions", {**text, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        # The package types a streamed legacy completion chunk as `Completion`, whose
        # finish_reason leaves out the null the API streams until the last chunk (the client
        # builds stream chunks without validating them): check the rest of each chunk.
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        assert_openai_type(Completion, {**chunk, "choices": choices})
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    models = httpx.get(server.base_url + "/models", timeout=30).json()
    from openai.types import Model as OpenAIModel

    for entry in models["data"]:
        OpenAIModel.model_validate(entry, strict=True)  # our extra fields (context length, layers) are allowed here


def test_tokenize_and_detokenize_as_llama_server_does(server: AppServer, model: Model) -> None:
    tok = model.tokenizer
    text = "Hello world, <|im_start|> and ünïcode"
    r = httpx.post(server.url + "/tokenize", json={"content": text}, timeout=30)
    assert r.status_code == 200
    ids = r.json()["tokens"]
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.encode("<|im_start|>", add_special_tokens=False)[0] in ids, "special tokens in the text are matched"
    with_bos = httpx.post(server.url + "/tokenize", json={"content": text, "add_special": True}, timeout=30).json()["tokens"]
    assert with_bos == tok.encode(text, add_special_tokens=True)
    pieces = httpx.post(server.url + "/tokenize", json={"content": "Hello world", "with_pieces": True}, timeout=30).json()
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"
    assert [p["id"] for p in pieces["tokens"]] == tok.encode("Hello world", add_special_tokens=False)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=30)
    assert r.status_code == 200 and r.json() == {"content": text}
    for route, body, param in (("/tokenize", {"content": 5}, "content"), ("/tokenize", {}, "content"),
                               ("/tokenize", {"content": "x", "with_pieces": "yes"}, "with_pieces"),
                               ("/tokenize", {"content": "x", "parse_special": False}, "parse_special"),
                               ("/detokenize", {"tokens": "1 2"}, "tokens"), ("/detokenize", {"tokens": [1, True]}, "tokens"),
                               ("/detokenize", {"tokens": [1, 10**9]}, "tokens")):
        r = httpx.post(server.url + route, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, body, r.json())


def test_api_key(model: Model) -> None:
    with AppServer(create_app(model, "smollm2", api_key=KEY), port=0) as keyed:
        with client_for(keyed, "wrong") as c:
            with pytest.raises(openai.AuthenticationError) as info:
                c.models.list()
        assert info.value.status_code == 401
        error = error_of(info.value)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        # No key at all (the openai client always sends one).
        r = httpx.post(keyed.base_url + "/chat/completions", json={"model": "smollm2", "messages": QUESTION}, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        with client_for(keyed, KEY) as c:
            assert [m.id for m in c.models.list().data] == ["smollm2"]
            reply = c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4)
            assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert health(keyed)["status"] == "ok"  # /health needs no key


# --- disconnects -------------------------------------------------------------------------


def test_dropped_requests_cancel_their_generation(server: AppServer, client: openai.OpenAI) -> None:
    """A stream closed after a few chunks, and a plain request whose client gives up: both
    generations stop (counted as cancelled) long before their token limit."""
    before = health(server)["cancelled_generations"]
    with client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=4000, stream=True) as stream:
        for i, _chunk in enumerate(stream):
            if i == 3:
                assert health(server)["active_generations"] == 1
                break
    wait_until(lambda: health(server)["cancelled_generations"] == before + 1, what="cancelled stream")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", timeout=httpx.Timeout(30, read=2.0),
                   json={"model": "smollm2", "prompt": COUNTING, "temperature": 0, "max_tokens": 4000})
    wait_until(lambda: health(server)["cancelled_generations"] == before + 2, what="cancelled request")
    assert health(server)["active_generations"] == 0


def test_requests_beyond_the_limits_wait_then_get_429(model: Model) -> None:
    """One slot and one place in line: a second request waits for the running one, a third
    is refused at once with 429 (server_busy); the waiting one runs when the slot frees, and
    gives the same reply as alone."""
    import concurrent.futures

    with AppServer(create_app(model, "smollm2", max_concurrent=1, max_waiting=1), port=0) as busy, \
            client_for(busy) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        alone = c.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=8)
        with c.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=4000, stream=True) as stream:
            next(iter(stream))
            waiting = pool.submit(c.completions.create, model="smollm2", prompt="The capital of France is",
                                  temperature=0, max_tokens=8)
            wait_until(lambda: health(busy)["waiting_requests"] == 1, what="a waiting request")
            with pytest.raises(openai.RateLimitError) as refused:
                c.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
            assert refused.value.code == "server_busy"
            assert "busy" in refused.value.message
            assert not waiting.done()
        # Closing the stream cancels its generation, which frees the slot for the waiting one.
        assert waiting.result(timeout=60).choices[0].text == alone.choices[0].text
        state = health(busy)
        assert (state["active_generations"], state["waiting_requests"], state["refused_busy"]) == (0, 0, 1)


# --- the command ---------------------------------------------------------------------------


def serve_process(*args: str, env: dict[str, str] | None = None) -> tuple[MeshProcess, str]:
    """`meshpy serve ARGS` as a child process; its base URL once it serves."""
    proc = MeshProcess("serve", ["serve", "--port", "0", "--threads", "1", *args], env)
    try:
        url = proc.wait_for(r"^http://127\.0\.0\.1:\d+/v1$", 120, "stdout").group(0)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def test_cli_serve(smollm2_gguf: Path, model: Model, server: AppServer) -> None:
    proc, url = serve_process("--model", str(smollm2_gguf), env={**os.environ, "MESHPY_API_KEY": KEY})
    try:
        assert proc.wait_for(r"SmolLM2-135M-Instruct.Q4_1 \(in this process\); OpenAI base URL", 10, "stderr")
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120) as c:
            assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
            reply = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, temperature=0)
        assert reply.choices[0].message.content == model.generate(QUESTION).text
        assert httpx.get(url + "/models", timeout=30).status_code == 401
    finally:
        proc.stop()
    assert proc.proc.returncode == 130 and proc.wait_for("Application shutdown complete", 10)  # as after Ctrl-C
    # A port that is taken fails at once, before the model loads.
    r = subprocess.run([sys.executable, "-m", "meshpy", "serve", "--model", "smollm2", "--port", str(server.port)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in r.stderr, r.stderr


# --- through a mesh ------------------------------------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Name three rivers.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Hamlet?",
    "Describe a cat in one sentence.",
    "What color is the sky?",
]


@pytest.fixture(scope="module")
def mesh(smollm2_gguf: Path) -> Iterator[LocalMesh]:
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
        mesh.add_worker(smollm2_gguf, layers="15-29", threads=1)
        yield mesh


@pytest.fixture(scope="module")
def mesh_server(mesh: LocalMesh, smollm2_gguf: Path) -> Iterator[tuple[AppServer, Model]]:
    from meshpy.mesh import connect

    with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
        with AppServer(create_app(model, "smollm2", coverage=layer_coverage(model)), port=0) as server:
            yield server, model


def worker_sessions(model: Model) -> list[int]:
    return [p.sessions for p in model.pipeline.refresh()]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_mesh_models_list_reports_layer_coverage(mesh_server: tuple[AppServer, Model]) -> None:
    server, _ = mesh_server
    with client_for(server) as c:
        layers = c.models.list().data[0].model_dump()["layers"]
    assert layers["n_layers"] == 30 and layers["missing_layers"] == []
    assert [p["layers"] for p in layers["providers"]] == [[0, 14], [15, 29]]


def eight_streams_match_alone(server: AppServer, model: Model) -> None:
    """Eight concurrent greedy chat streams give the texts the same requests give one at a
    time, while /health answers and shows them running together; the scheduler ran them in
    shared iterations."""
    args: dict[str, Any] = dict(model="smollm2", temperature=0, max_tokens=24)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=True, **args)
        async with stream:
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def alone() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
            return [await one(client, p) for p in PROMPTS]

    async def together() -> tuple[list[str], list[int]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client, \
                httpx.AsyncClient(timeout=30) as http:
            streams = asyncio.gather(*(one(client, p) for p in PROMPTS))
            active = []
            while not streams.done():  # /health answers while the 8 generations run
                active.append((await http.get(server.url + "/health")).json()["active_generations"])
                await asyncio.wait([streams], timeout=0.05)
            return await streams, active

    expected = asyncio.run(alone())
    assert all(expected) and len(set(expected)) == len(PROMPTS)
    iterations, entries, _ = model.scheduler.counters()
    texts, active = asyncio.run(together())
    assert texts == expected
    assert max(active) > 1, active
    assert health(server)["active_generations"] == 0
    iterations2, entries2, _ = model.scheduler.counters()
    assert entries2 - entries > iterations2 - iterations, "some iterations carried several streams"


def test_eight_concurrent_streams_match_alone(server: AppServer, model: Model) -> None:
    eight_streams_match_alone(server, model)


@pytest.mark.slow
def test_mesh_eight_concurrent_streams_match_alone(mesh_server: tuple[AppServer, Model]) -> None:
    eight_streams_match_alone(*mesh_server)


def speculative_stream_matches_plain(server: AppServer, model: Model) -> None:
    """A greedy chat whose reply quotes its prompt streams, with drafts verified in shared
    passes (fewer iterations than tokens), the text plain greedy decoding gives."""
    messages = [{"role": "user", "content": QUOTING}]
    model.speculation = False
    try:
        plain = model.generate(messages, max_tokens=64)
    finally:
        model.speculation = True
    before, _, _ = model.scheduler.counters()
    # A fixed draft length: how long to draft is learned from timings (tested with the
    # speculator), which a loaded machine can talk out of drafting at all.
    model.draft_length = 8
    try:
        with client_for(server) as c:
            with c.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=64,
                                           stream=True) as stream:
                text, _ = stream_text(stream)
    finally:
        model.draft_length = None
    after, _, _ = model.scheduler.counters()
    assert text == plain.text
    assert after - before < len(plain.token_ids) * 2 // 3, (after - before, len(plain.token_ids))


def test_speculative_stream_matches_plain(server: AppServer, model: Model) -> None:
    speculative_stream_matches_plain(server, model)


@pytest.mark.slow
def test_mesh_speculative_stream_matches_plain(mesh_server: tuple[AppServer, Model]) -> None:
    speculative_stream_matches_plain(*mesh_server)


@pytest.mark.slow
def test_mesh_dropped_stream_frees_worker_sessions(mesh_server: tuple[AppServer, Model]) -> None:
    server, model = mesh_server
    # Sessions of earlier tests are kept for their prompts (one may still be on its way to the
    # cache as their generations close): cleared until the workers hold none.
    wait_until(lambda: not model.prompt_cache.clear() and worker_sessions(model) == [0, 0], what="idle workers")
    before = health(server)["cancelled_generations"]
    with client_for(server) as c:
        with c.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=4000, stream=True) as stream:
            for i, _chunk in enumerate(stream):
                if i == 5:
                    assert worker_sessions(model) == [1, 1]  # the session holds a KV cache on each
                    break
    # Freed, or kept (the prompt cache's, which clearing it frees on every worker).
    wait_until(lambda: worker_sessions(model) == [model.prompt_cache.sessions] * 2 == [1, 1], what="the session kept")
    model.prompt_cache.clear()
    wait_until(lambda: worker_sessions(model) == [0, 0], what="sessions freed on every worker")
    assert health(server)["cancelled_generations"] == before + 1


@pytest.mark.slow
def test_mesh_cli_serve(mesh: LocalMesh, smollm2_gguf: Path, model: Model) -> None:
    proc, url = serve_process("--model", str(smollm2_gguf), "--bootstrap", mesh.bootstrap_addr, "--model-name", "smol",
                              env=mesh.env)
    try:
        assert proc.wait_for("layers on the mesh via", 10, "stderr")
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as c:
            layers = c.models.list().data[0].model_dump()["layers"]
            assert [p["layers"] for p in layers["providers"]] == [[0, 14], [15, 29]]
            reply = c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=32)
        assert reply.choices[0].message.content == model.generate(QUESTION, max_tokens=32).text
    finally:
        proc.stop()


@pytest.mark.slow
def test_mesh_without_a_route_answers_503(smollm2_gguf: Path) -> None:
    """A worker leaves after the server connected: requests get 503 naming its layers."""
    from meshpy.mesh import connect

    with LocalMesh(transport="tcp") as mesh:
        addr = mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
        second = mesh.add_worker(smollm2_gguf, layers="15-29", threads=1)
        with connect(smollm2_gguf, addr, threads=1, route_timeout=60) as model, \
                AppServer(create_app(model, "smollm2", coverage=layer_coverage(model)), port=0) as server, \
                client_for(server) as c:
            assert c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4).choices
            second.stop()
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as info:
                    c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, stream=stream)
                assert info.value.status_code == 503
                error = error_of(info.value)
                assert (error["type"], error["code"]) == ("server_error", "no_route")
                assert "no worker serves layers 15-29" in error["message"]
            layers = c.models.list().data[0].model_dump()["layers"]
            assert layers["missing_layers"] == list(range(15, 30))
