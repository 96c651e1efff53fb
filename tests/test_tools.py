"""Tool calling (issue 16, part 4): `tools` rendered through the model's own chat template,
calls read back from the formats the supported families write (Hermes/Qwen `<tool_call>`,
Llama 3 JSON, Mistral `[TOOL_CALLS]`), whole and streamed, and a two-turn conversation with
`tool` messages through the official openai client, with tiny Qwen3-style and Llama-3-style
templates (tests/data/templates) on SmolLM2; `tool_choice` "required" or a named function
forces a call by constrained decoding, so a model this small makes one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from meshpy.generation import Model
from meshpy.server import AppServer
from meshpy.server.protocol import ChatRequest
from meshpy.tools import HERMES, LLAMA3, MISTRAL, ToolCallParser, ToolFormat
from tests.conftest import DATA
from tests.test_server import assert_openai_type, client_for, error_of, sse_chunks

TEMPLATES = DATA / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]

PARSED = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me check.\n", ["get_weather", "get_time"]),
    (HERMES, "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\nand then\n<tool_call>\n'
             '{"name": "get_time", "arguments": {}}\n</tool_call>', "and then\n", ["get_weather", "get_time"]),
    (HERMES, '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>', []),  # not an offered tool
    (HERMES, "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
     ["get_weather", "get_time"]),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", ["get_weather"]),
    (LLAMA3, "The weather is {nice}", "The weather is {nice}", []),
    (LLAMA3, '{"name": "Ada", "born": 1815}', '{"name": "Ada", "born": 1815}', []),  # JSON, not a call
    (LLAMA3, "<b>bold</b> text", "<b>bold</b> text", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", ["get_weather"]),
    (MISTRAL, "Sunny [TOOL_CALLS] maybe", "Sunny [TOOL_CALLS] maybe", []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "names"), PARSED)
def test_calls_are_read_back_however_the_text_is_split(fmt: ToolFormat, text: str, content: str, names: list[str]) -> None:
    for split in range(len(text) + 1):
        for parts in ([text[:split], text[split:]], list(text) if split == 0 else []):
            if not parts:
                continue
            parser = ToolCallParser(fmt, ["get_weather", "get_time"])
            shown, calls = [], []
            for part in parts:
                c, k = parser.feed(part)
                shown.append(c)
                calls += k
            c, k = parser.finish()
            shown.append(c)
            calls += k
            assert "".join(shown) == content, (split, shown)
            assert [c.name for c in calls] == names, (split, calls)
            assert all(isinstance(json.loads(c.arguments), dict) and c.id.startswith("call_") for c in calls)


def test_the_format_comes_from_the_template() -> None:
    assert ToolFormat.for_template((TEMPLATES / "qwen3_style_tools.jinja").read_text()) is HERMES
    assert ToolFormat.for_template((TEMPLATES / "llama3_style_tools.jinja").read_text()) is LLAMA3
    assert ToolFormat.for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Model]:
    with Model.load(smollm2_gguf, threads=2) as m:
        yield m


@pytest.fixture(params=["qwen3_style_tools", "llama3_style_tools"])
def template(request: pytest.FixtureRequest, model: Model) -> Iterator[str]:
    own = model.end.chat_template
    model.end.chat_template = (TEMPLATES / f"{request.param}.jinja").read_text()
    try:
        yield request.param
    finally:
        model.end.chat_template = own


def test_a_two_turn_tool_conversation(server: AppServer, model: Model, template: str) -> None:
    with client_for(server) as client:
        # Turn 1: the model must call get_weather (a named tool_choice forces it).
        first = client.chat.completions.create(
            model="smollm2", messages=QUESTION, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert_openai_type(ChatCompletion, first.model_dump(mode="json", exclude_unset=True))
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and call.type == "function" and call.id.startswith("call_")
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
        # Streamed: the same call, as one tool_calls delta with index 0.
        chunks = sse_chunks(server.base_url + "/chat/completions", {
            "model": "smollm2", "messages": QUESTION, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 60,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "stream": True})
        for chunk in chunks:
            assert_openai_type(ChatCompletionChunk, chunk)
        deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
        assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == \
            [(0, "get_weather", args)]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
        # Turn 2: the call and its result go back; the model answers in text.
        messages: list[dict[str, Any]] = [*QUESTION, choice.message.model_dump(exclude_none=True),
                                          {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
        second = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME],
                                                temperature=0, max_tokens=30)
        assert_openai_type(ChatCompletion, second.model_dump(mode="json", exclude_unset=True))
        parsed = ChatRequest.parse({"model": "smollm2", "messages": messages, "tools": [WEATHER, TIME]})
        prompt = model.end.render(parsed.messages, [WEATHER, TIME])
        assert "18 C and sunny" in prompt and '"city": "' + args["city"] in prompt, "the template saw the call and result"
        assert second.choices[0].message.content and second.choices[0].message.tool_calls is None
        # "required": a call of one of the tools.
        required = client.chat.completions.create(model="smollm2", messages=QUESTION, tools=[WEATHER, TIME],
                                                  tool_choice="required", temperature=0, max_tokens=60)
        assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
        # "none": the tools are not offered, nothing is read as a call.
        none = client.chat.completions.create(model="smollm2", messages=QUESTION, tools=[WEATHER], tool_choice="none",
                                              temperature=0, max_tokens=8)
        assert none.choices[0].finish_reason in ("stop", "length") and none.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0].tool_call_id"),
])
def test_bad_tool_requests(server: AppServer, fields: dict[str, Any], param: str) -> None:
    with client_for(server) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": "smollm2", "messages": QUESTION, "max_tokens": 4, **fields})
    assert error_of(info.value)["param"] == param
