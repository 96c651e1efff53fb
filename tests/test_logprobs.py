"""Log-probabilities through the OpenAI API (issue 16, part 2): `logprobs` / `top_logprobs`
on chat, `logprobs` / `echo` on completions (the prompt's own log-probabilities, as
evaluation harnesses ask for them with `max_tokens` 0), streamed and whole, driven by the
official `openai` client and validated strictly against its types. The values are checked
against transformers' log-softmax, stored in tests/data (an independent reference)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from meshpy.generation import Model
from meshpy.server import AppServer
from tests.conftest import DATA
from tests.test_speculation import QUOTING
from tests.test_server import QUESTION, assert_openai_type, error_of, sse_chunks


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Model]:
    with Model.load(smollm2_gguf, threads=2) as m:
        yield m


def first_predicted(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its first token's null log-probability and alternatives (what the API and
    vLLM send for a prompt's first token with `echo`: nothing predicts it) replaced, since
    the package types them as numbers and objects only; the rest is checked as it is."""
    choices = []
    for choice in body["choices"]:
        lp = choice.get("logprobs")
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            lp = {**lp, "token_logprobs": [0.0, *lp["token_logprobs"][1:]], "top_logprobs": [{}, *lp["top_logprobs"][1:]]}
        choices.append({**choice, "logprobs": lp})
    return {**body, "choices": choices}


def test_prompt_logprobs_match_transformers(client: openai.OpenAI, model: Model) -> None:
    """`echo` with `max_tokens` 0 scores the prompt: each token's log-probability given the
    ones before it, as transformers computes it on the same GGUF (stored reference)."""
    stored = np.load(DATA / "smollm2_reference.npz")
    ids = stored["ids"][:96].tolist()
    reply = client.completions.create(model="smollm2", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    assert_openai_type(Completion, first_predicted(reply.model_dump(mode="json", exclude_unset=True)))
    choice = reply.choices[0]
    assert choice.text == model.tokenizer.decode(ids) and choice.finish_reason == "length"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens == [model.tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "nothing predicts the first token"
    # Against the reference where it holds the token (its top 64 at each position).
    errors, top1 = [], []
    for i in range(1, len(ids)):
        ref_ids, ref_logp = stored["top_ids"][i - 1], stored["top_logp"][i - 1]
        hit = np.flatnonzero(ref_ids == ids[i])
        if len(hit):
            errors.append(abs(lp.token_logprobs[i] - float(ref_logp[hit[0]])))
        top = lp.top_logprobs[i]
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert list(top.values()) == sorted(top.values(), reverse=True), "likeliest first"
        best = model.tokenizer.token_bytes(int(ref_ids[0])).decode("utf-8", errors="replace")
        top1.append(next(iter(top)) == best)
    print(f"\nprompt logprobs vs transformers: {len(errors)} tokens, mean |error| {np.mean(errors):.4f}, "
          f"max {np.max(errors):.4f}; top-1 agreement {np.mean(top1):.3f}")
    assert len(errors) >= 80
    assert np.mean(errors) < 0.01 and np.max(errors) < 0.05
    assert np.mean(top1) >= 0.95
    # Offsets: where each token starts in the text.
    assert lp.text_offset == np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]).tolist()


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI, server: AppServer, model: Model) -> None:
    args: dict[str, Any] = {"model": "smollm2", "messages": QUESTION, "temperature": 0, "max_tokens": 12,
                            "logprobs": True, "top_logprobs": 4}
    whole = client.chat.completions.create(**args)
    assert_openai_type(ChatCompletion, whole.model_dump(mode="json", exclude_unset=True))
    content = whole.choices[0].logprobs.content
    text = whole.choices[0].message.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == text
    expected = model.generate(QUESTION, max_tokens=12)
    assert len(content) == len(expected.token_ids) == whole.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 4 and entry.logprob <= 0
        # Greedy: the token chosen is the likeliest, and its log-probability is listed first.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    chunks = sse_chunks(server.base_url + "/chat/completions", {**args, "stream": True})
    for chunk in chunks:
        assert_openai_type(ChatCompletionChunk, chunk)
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert [(e["token"], e["logprob"]) for e in streamed] == [(e.token, e.logprob) for e in content]
    # Without `logprobs`, none: and `top_logprobs` alone is an error.
    plain = client.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text


def test_sampled_tokens_report_the_models_own_logprobs(client: openai.OpenAI, model: Model) -> None:
    """Sampled at a temperature, a token's log-probability is still the model's (the same
    value greedy decoding reports for the same token at the same place)."""
    args: dict[str, Any] = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "logprobs": 0}
    sampled = client.completions.create(**args, temperature=1.5, seed=7)
    lp = sampled.choices[0].logprobs
    ids = model.encode("The capital of France is", raw=True)
    generated = model.tokenizer.encode(sampled.choices[0].text, add_special_tokens=False)
    scored = client.completions.create(model="smollm2", prompt=ids + generated, max_tokens=0, echo=True, logprobs=0)
    reference = scored.choices[0].logprobs.token_logprobs[len(ids):]
    assert len(generated) == len(lp.token_logprobs), "this seed's text re-encodes to the tokens sampled"
    assert np.allclose(lp.token_logprobs, reference, atol=1e-4)
    assert min(lp.token_logprobs) < -1.0, "at this temperature, some token is not the likeliest"
    assert all(t == {} for t in lp.top_logprobs), "logprobs 0: no alternatives"


def test_drafted_tokens_report_the_logprobs_plain_decoding_does(client: openai.OpenAI, model: Model) -> None:
    """Tokens kept from a verified draft (several per pass) carry the same log-probabilities
    as when decoded one at a time."""
    args: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": QUOTING}], "temperature": 0,
                            "max_tokens": 48, "logprobs": True, "top_logprobs": 2}
    model.speculation = False
    try:
        plain = client.chat.completions.create(**args).choices[0].logprobs.content
    finally:
        model.speculation = True
    model.draft_length = 8
    before, _, _ = model.scheduler.counters()
    try:
        drafted = client.chat.completions.create(**args).choices[0].logprobs.content
    finally:
        model.draft_length = None
    after, _, _ = model.scheduler.counters()
    assert after - before < len(plain) * 2 // 3, "drafts were kept several at a time"
    assert [e.token for e in drafted] == [e.token for e in plain]
    assert np.allclose([e.logprob for e in drafted], [e.logprob for e in plain], atol=1e-4)
    assert [[t.token for t in e.top_logprobs] for e in drafted] == [[t.token for t in e.top_logprobs] for e in plain]


def test_completion_logprobs_streamed_with_echo(server: AppServer, client: openai.OpenAI) -> None:
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "logprobs": 2, "echo": True}
    whole = client.completions.create(**body)
    text = whole.choices[0].text
    assert text.startswith("The capital of France is")
    lp = whole.choices[0].logprobs
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert text[offset : offset + len(token)] == token
    chunks = sse_chunks(server.base_url + "/completions", {**body, "stream": True})
    for chunk in chunks:
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        assert_openai_type(Completion, first_predicted({**chunk, "choices": choices}))
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert [t for p in parts for t in p["tokens"]] == lp.tokens
    assert [o for p in parts for o in p["text_offset"]] == lp.text_offset
    assert [v for p in parts for v in p["token_logprobs"]] == lp.token_logprobs


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": "yes"}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"echo": 1}, "echo"),
    ],
)
def test_bad_logprob_requests(client: openai.OpenAI, route: str, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if route == "chat":
            client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, **fields)
        else:
            client.completions.create(model="smollm2", prompt="Hello", **{"max_tokens": 4, **fields})
    assert error_of(info.value)["param"] == param
