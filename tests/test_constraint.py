"""Structured output (issue 16, part 5): llguidance's constraint decoding of ``response_format``
with the packaged SmolLM2, greedy. Every output must parse and validate against its schema
(checked by the independent ``jsonschema`` package); llguidance's view of the vocabulary must
agree with the tokenizer's bytes on every id."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import openai
import pytest
from openai.types.chat import ChatCompletion

from meshpy.constraint import ConstraintError, Grammar, Matcher, _disagreeing_ids, _lltokenizer_from_bytes, _Vocabulary, _vocabulary
from meshpy.generation import Model
from meshpy.tokenizer import Tokenizer
from tests.conftest import DATA
from tests.test_server import assert_openai_type, error_of

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Model]:
    with Model.load(smollm2_gguf, threads=2) as m:
        yield m


def response_format(schema: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def greedy(model: Model, grammar: Grammar, prompt: str, timings: list[float] | None = None) -> tuple[str, bool]:
    """Greedy decoding under ``grammar``: the text, and whether the matcher ended it (done,
    or a stop id where the grammar allowed it) rather than MAX_TOKENS."""
    tokenizer = model.tokenizer
    session = model.new_session()
    matcher = grammar.start()
    out: list[int] = []
    ended = False
    try:
        logits = model.prefill(session, model.encode([{"role": "user", "content": prompt}]))
        for _ in range(MAX_TOKENS):
            start = time.perf_counter()
            matcher.mask_logits(logits)
            if timings is not None:
                timings.append(time.perf_counter() - start)
            token = int(np.argmax(logits))
            if token in tokenizer.stop_ids:
                ended = True
                break
            matcher.accept(token)
            out.append(token)
            if matcher.done:
                ended = True
                break
            logits = model.step(session, token)
    finally:
        model.close_session(session)
    return tokenizer.decode(out), ended


def short(n: int = 20) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


def obj(properties: dict[str, Any], required: list[str] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **more,
    }


# (prompt, schema): nested objects, arrays with minItems/maxItems, enums, required and optional
# fields, numbers, integers, booleans, strings with maxLength, additionalProperties false.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("Give a person's name and age as JSON.", obj({"name": short(), "age": {"type": "integer", "minimum": 0, "maximum": 150}})),
    ("Describe a book as JSON: title, author, year and whether it is fiction.",
     obj({"title": short(40), "author": short(30), "year": {"type": "integer"}, "fiction": {"type": "boolean"}})),
    ("List three colors as JSON.", obj({"colors": {"type": "array", "items": short(12), "minItems": 3, "maxItems": 3}})),
    ("What is the weather like? Answer as JSON with a condition and a temperature in Celsius.",
     obj({"condition": {"type": "string", "enum": ["sunny", "cloudy", "rainy", "snowy"]},
          "temperature": {"type": "number", "minimum": -50, "maximum": 60}})),
    ("Give the address of a company as JSON.",
     obj({"company": short(30), "address": obj({"street": short(30), "city": short(20), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("Rate the movie Inception from 1 to 5 as JSON, with a short review.",
     obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5}, "review": short(60)})),
    ("Is the sky blue? Answer as JSON.", obj({"answer": {"type": "boolean"}})),
    ("Give a shopping list as JSON: items with a name and a quantity.",
     obj({"items": {"type": "array", "minItems": 1, "maxItems": 4,
                    "items": obj({"name": short(15), "quantity": {"type": "integer", "minimum": 1, "maximum": 20}})}})),
    ("Classify the sentiment of 'I love this phone' as JSON.",
     obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("Describe a dog as JSON. Only its name is required.",
     obj({"name": short(), "breed": short(), "age": {"type": "integer", "minimum": 0, "maximum": 30}}, required=["name"])),
    ("Give the coordinates of Paris as JSON.",
     obj({"city": short(), "lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}})),
    ("Give a user profile as JSON with a username and a list of up to three tags.",
     obj({"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
          "tags": {"type": "array", "items": short(10), "maxItems": 3}})),
    ("Describe a car as JSON: make, model, and its engine (cylinders and whether it is electric).",
     obj({"make": short(), "model": short(), "engine": obj({"cylinders": {"type": "integer", "minimum": 0, "maximum": 16}, "electric": {"type": "boolean"}})})),
    ("What day of the week comes after Monday? Answer as JSON.",
     obj({"day": {"type": "string", "enum": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]}})),
    ("Give two numbers and their sum as JSON.",
     obj({"a": {"type": "integer", "minimum": 0, "maximum": 100}, "b": {"type": "integer", "minimum": 0, "maximum": 100},
          "sum": {"type": "integer", "minimum": 0, "maximum": 200}})),
    ("Describe a team as JSON: its name and two or three members, each with a name and a role.",
     obj({"team": short(), "members": {"type": "array", "minItems": 2, "maxItems": 3,
                                       "items": obj({"name": short(15), "role": {"enum": ["lead", "developer", "designer", "tester"]}})}})),
    ("Give a recipe as JSON: its name, servings, and up to four ingredients.",
     obj({"name": short(30), "servings": {"type": "integer", "minimum": 1, "maximum": 12},
          "ingredients": {"type": "array", "minItems": 1, "maxItems": 4, "items": short(20)}, "vegetarian": {"type": "boolean"}})),
    ("Give an HTTP status as JSON: its code and its reason phrase.",
     obj({"code": {"type": "integer", "minimum": 100, "maximum": 599}, "reason": short(30)})),
    ("Give the price of a coffee as JSON, with the currency.",
     obj({"price": {"type": "number", "minimum": 0, "maximum": 100}, "currency": {"enum": ["USD", "EUR", "GBP"]}})),
    ("Describe a planet as JSON: name, number of moons, whether it has rings, and a nested fact.",
     obj({"name": short(), "moons": {"type": "integer", "minimum": 0, "maximum": 200}, "rings": {"type": "boolean"},
          "fact": obj({"text": short(50), "verified": {"type": "boolean"}})})),
]


def test_schema_list_is_varied() -> None:
    assert len(SCHEMAS) == 20
    text = json.dumps([s for _, s in SCHEMAS])
    for keyword in ("minItems", "maxItems", "enum", "maxLength", "required", '"number"', '"integer"', '"boolean"', "additionalProperties", "pattern"):
        assert keyword in text, keyword


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "schema"), SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_json_schema_output_validates(client: openai.OpenAI, prompt: str, schema: dict[str, Any]) -> None:
    """Through the official client, greedy: the reply parses and validates, and it ended on its
    own (the grammar complete), not at the token limit."""
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                           response_format=response_format(schema), temperature=0, max_tokens=MAX_TOKENS)
    assert_openai_type(ChatCompletion, reply.model_dump(mode="json", exclude_unset=True))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.slow
def test_json_object_output_is_a_dict_whole_streamed_and_sampled(client: openai.OpenAI, model: Model) -> None:
    args: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Describe a cat as a JSON object."}],
                            "response_format": {"type": "json_object"}, "max_tokens": MAX_TOKENS}
    whole = client.chat.completions.create(**args, temperature=0)
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    with client.chat.completions.create(**args, temperature=0, stream=True) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    # Log-probabilities stay the model's own (every value finite: the mask only limits the pick).
    scored = client.chat.completions.create(**args, temperature=0, logprobs=True, top_logprobs=5)
    assert scored.choices[0].message.content == whole.choices[0].message.content
    entries = scored.choices[0].logprobs.content
    assert entries and all(np.isfinite(e.logprob) and all(np.isfinite(t.logprob) for t in e.top_logprobs) for e in entries)
    assert any(len(e.top_logprobs) == 5 for e in entries)
    # Sampled, three choices sharing a prefill, each with its own grammar state.
    prompt, schema = SCHEMAS[0]
    sampled = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                             response_format=response_format(schema), temperature=1.0, seed=5, n=3,
                                             max_tokens=MAX_TOKENS)
    for choice in sampled.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    grammar = Grammar.from_response_format({"type": "json_object"}, model.tokenizer)
    assert grammar is not None
    timings: list[float] = []
    text, ended = greedy(model, grammar, "Describe a cat as a JSON object.", timings)
    assert ended and text == whole.choices[0].message.content, "the library alone gives the server's reply"
    us = np.array(timings) * 1e6
    print(
        f"\nmask_logits on {model.tokenizer.vocab_size} tokens over {len(us)} steps: "
        f"median {np.median(us):.0f} us, mean {us.mean():.0f} us, max {us.max():.0f} us"
    )


def test_bad_response_formats_are_400(client: openai.OpenAI) -> None:
    for fmt, where in (({"type": "xml"}, "response_format.type"), ({"type": "json_schema"}, "json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "compile")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                           response_format=fmt, max_tokens=4)
        error = error_of(info.value)
        assert error["param"] == "response_format" and where in error["message"], error


def test_text_is_no_grammar(model: Model) -> None:
    assert Grammar.from_response_format({"type": "text"}, model.tokenizer) is None


@pytest.mark.parametrize(
    ("response_format", "names"),
    [
        ("json", "response_format must be an object"),
        ({}, "response_format.type"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": []}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "response_format.json_schema.strict"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "maximum": float("nan")}}}, "not JSON"),
    ],
)
def test_bad_shapes_are_constraint_errors(model: Model, response_format: Any, names: str) -> None:
    with pytest.raises(ConstraintError, match=names):
        Grammar.from_response_format(response_format, model.tokenizer)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "foo"}, "Invalid type"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"$ref": "#/definitions/nope"}, "does not exist"),
        ({"type": "string", "format": "no-such-format"}, "Unknown format"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ({"not": {"type": "string"}}, "not"),
        (obj({"a": short()}, required=["b"]), "required"),
    ],
)
def test_schemas_llguidance_rejects_are_constraint_errors(model: Model, schema: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConstraintError, match=reason) as caught:
        Grammar.from_response_format(response_format(schema), model.tokenizer)
    assert isinstance(caught.value, ValueError)  # the server answers ValueErrors with a 400


def test_token_bytes_equal_the_tokenizers(model: Model) -> None:
    tokenizer = model.tokenizer
    lltokenizer = _vocabulary(tokenizer).lltokenizer
    assert lltokenizer.vocab_size == tokenizer.vocab_size
    assert sorted(lltokenizer.eos_tokens) == sorted(tokenizer.stop_ids)
    # Exactly equal on every id (no tolerated difference is needed for SmolLM2).
    differ = [i for i in range(tokenizer.vocab_size) if lltokenizer.decode_bytes([i]) != tokenizer.token_bytes(i)]
    assert differ == []
    assert _disagreeing_ids(lltokenizer, tokenizer) == []


def test_tokenizer_from_bytes_gives_the_same_masks(model: Model) -> None:
    """The fallback (built from token_bytes) reads SmolLM2 as the tokenizer.json route does."""
    tokenizer = model.tokenizer
    from_bytes = _lltokenizer_from_bytes(tokenizer, sorted(tokenizer.stop_ids))
    assert all(from_bytes.decode_bytes([i]) == tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size))
    grammar = Grammar.from_json_schema(SCHEMAS[1][1], tokenizer)
    other = _Vocabulary(tokenizer, from_bytes).grammar(SCHEMAS[1][1])
    text = '{"title": "Dune", "author": "Frank Herbert", "year": 1965, "fiction": true}'
    a, b = grammar.start(), other.start()
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert np.array_equal(a.allowed(tokenizer.vocab_size), b.allowed(tokenizer.vocab_size))
        a.accept(token)
        b.accept(token)
    assert a.done and b.done


def test_stop_ids_allowed_exactly_when_the_grammar_may_end(model: Model) -> None:
    tokenizer = model.tokenizer
    stop = sorted(tokenizer.stop_ids)
    n = tokenizer.vocab_size
    grammar = Grammar.from_json_schema({"type": "integer"}, tokenizer)
    matcher = grammar.start()
    allowed = matcher.allowed(n)
    assert not allowed[stop].any() and allowed.any()
    matcher.accept(tokenizer.encode("4", add_special_tokens=False)[0])
    # "4" is a whole integer, but more digits may follow: both stop ids and digits are allowed.
    allowed = matcher.allowed(n)
    assert allowed[stop].all() and not matcher.done and matcher.accepting
    assert allowed[tokenizer.encode("2", add_special_tokens=False)[0]]
    matcher.accept(stop[0])
    assert matcher.done

    obj_matcher = Grammar.from_response_format({"type": "json_object"}, tokenizer).start()  # type: ignore[union-attr]
    for token in tokenizer.encode('{"a": 1}', add_special_tokens=False):
        assert not obj_matcher.allowed(n)[stop].any()
        obj_matcher.accept(token)
    # The object is closed: nothing but a stop id may follow.
    assert obj_matcher.done
    assert np.flatnonzero(obj_matcher.allowed(n)).tolist() == stop
    logits = np.zeros(n, dtype=np.float32)
    obj_matcher.mask_logits(logits)
    assert np.flatnonzero(np.isfinite(logits)).tolist() == stop


def test_rollback_returns_to_an_earlier_mask(model: Model) -> None:
    tokenizer = model.tokenizer
    n = tokenizer.vocab_size
    matcher = Grammar.from_response_format({"type": "json_object"}, tokenizer).start()  # type: ignore[union-attr]
    tokens = tokenizer.encode('{"a": [1, 2]}', add_special_tokens=False)
    masks = []
    for token in tokens:
        masks.append(matcher.allowed(n))
        matcher.accept(token)
    assert matcher.done
    matcher.rollback(3)
    assert not matcher.done
    assert np.array_equal(matcher.allowed(n), masks[-3])
    for token in tokens[-3:]:
        matcher.accept(token)
    assert matcher.done


def test_wider_logits_rows_mask_the_extra_columns(model: Model) -> None:
    n = model.tokenizer.vocab_size
    matcher = Grammar.from_response_format({"type": "json_object"}, model.tokenizer).start()  # type: ignore[union-attr]
    allowed = matcher.allowed(n + 64)
    assert allowed.shape == (n + 64,) and not allowed[n:].any() and allowed[:n].any()
    logits = np.ones(n + 64, dtype=np.float32)
    matcher.mask_logits(logits)
    assert np.array_equal(np.isfinite(logits), allowed)


def test_disallowed_token_is_a_constraint_error(model: Model) -> None:
    tokenizer = model.tokenizer
    matcher = Grammar.from_response_format({"type": "json_object"}, tokenizer).start()  # type: ignore[union-attr]
    with pytest.raises(ConstraintError, match="does not fit"):
        matcher.accept(tokenizer.encode("hello", add_special_tokens=False)[0])
    with pytest.raises(ConstraintError, match="outside the vocabulary"):
        matcher.accept(tokenizer.vocab_size)


def test_grammars_are_cached_and_timed(model: Model) -> None:
    tokenizer = model.tokenizer
    schema = obj({"id": {"type": "integer"}, "label": short(), "when": {"type": "string", "maxLength": 9, "pattern": "^[0-9-]+$"}})
    start = time.perf_counter()
    first = Grammar.from_response_format(response_format(schema), tokenizer)
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    again = Grammar.from_response_format(response_format(schema, strict=False), tokenizer)
    cached = time.perf_counter() - start
    assert first is again
    print(f"\ngrammar compile {compiled * 1e3:.2f} ms, cached {cached * 1e6:.0f} us")


def test_matchers_start_from_many_threads(model: Model) -> None:
    tokenizer = model.tokenizer
    grammar = Grammar.from_response_format({"type": "json_object"}, tokenizer)
    assert grammar is not None
    tokens = tokenizer.encode('{"k": [1, 2, {"x": null}]}', add_special_tokens=False)
    results: list[bool] = []

    def run() -> None:
        for _ in range(5):
            matcher: Matcher = grammar.start()
            for token in tokens:
                matcher.allowed(tokenizer.vocab_size)
                matcher.accept(token)
            results.append(matcher.done)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 40


@pytest.mark.parametrize("checkpoint", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-phi3", "tiny-gpt-oss"])
def test_token_bytes_agree_for_tokenizer_json_checkpoints(checkpoint: str) -> None:
    """Where a tokenizer keeps only each token's text (no byte table), llguidance's bytes
    decode to that text; its own bytes are the exact ones."""
    tokenizer = Tokenizer.from_hf_dir(DATA / checkpoint)
    lltokenizer = _vocabulary(tokenizer).lltokenizer
    assert _disagreeing_ids(lltokenizer, tokenizer) == []
    assert lltokenizer.vocab_size == tokenizer.vocab_size
    assert sorted(lltokenizer.eos_tokens) == sorted(tokenizer.stop_ids)


@pytest.mark.slow
def test_token_bytes_agree_for_gemma3(gemma3_gguf: Path) -> None:
    """A SentencePiece vocabulary with byte fallback, read from GGUF metadata."""
    tokenizer = Model.load(gemma3_gguf, threads=2).tokenizer
    lltokenizer = _vocabulary(tokenizer).lltokenizer
    assert _disagreeing_ids(lltokenizer, tokenizer) == []
    # Only <0xFF> differs: llguidance keeps that byte to mark special tokens.
    assert [i for i in range(tokenizer.vocab_size) if lltokenizer.decode_bytes([i]) != tokenizer.token_bytes(i)] == [
        tokenizer.token_to_id("<0xFF>")
    ]
