"""The OpenAI request and response bodies the server speaks.

Requests are parsed into `ChatRequest` / `CompletionRequest`, each field checked for type
and range; a bad one raises a 400 `APIError` naming the field (`param`). Responses and
stream chunks are built as plain dicts by the `*_body` / `*_chunk` functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshpy.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob
from meshpy.server.errors import invalid
from meshpy.tokenizer import Tokenizer

__all__ = [
    "Options",
    "ChatRequest",
    "CompletionRequest",
    "parse_json",
    "new_id",
    "usage_body",
    "chat_body",
    "chat_choice",
    "chat_chunk",
    "completion_body",
    "completion_choice",
    "completion_chunk",
    "chat_logprobs",
    "completion_logprobs",
]

#: Roles a chat message may have; "developer" is OpenAI's newer name for "system".
_ROLES = ("system", "user", "assistant", "developer", "tool")
#: Most stop strings a request may give (OpenAI's limit).
_MAX_STOPS = 4
#: Most choices one request may ask for (`n`): each is a generation with its own session.
MAX_CHOICES = 16


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 when it is not one."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# --- field checks ------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(body: Mapping[str, Any], name: str, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(f"'{name}' must be an integer, got {value!r}", name, "invalid_type")
    if minimum is not None and value < minimum:
        raise invalid(f"'{name}' must be >= {minimum}, got {value}", name, "invalid_value")
    return value


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid(f"'{name}' must be a number, got {value!r}", name, "invalid_type")
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", name, "invalid_value")
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean, got {value!r}", name, "invalid_type")
    return value


def _model(body: Mapping[str, Any]) -> str:
    value = body.get("model")
    if value is None:
        raise invalid("'model' is required", "model", "missing_required_parameter")
    if not isinstance(value, str):
        raise invalid(f"'model' must be a string, got {value!r}", "model", "invalid_type")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or a list of strings, got {value!r}", "stop", "invalid_type")
    if len(stops) > _MAX_STOPS:
        raise invalid(f"'stop' holds at most {_MAX_STOPS} strings, got {len(stops)}", "stop", "invalid_value")
    return tuple(s for s in stops if s)


def _reject_unsupported(body: Mapping[str, Any], extra: Sequence[tuple[str, object]] = ()) -> None:
    """400 for options that would change the answer but that meshpy does not implement."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name, 0.0, -2.0, 2.0)
        if value != 0.0:
            raise invalid(f"'{name}' is not supported (only 0)", name, "unsupported_value")
    for name, neutral in (("logit_bias", None), *extra):
        value = body.get(name)
        if value is not None and value != neutral and value != [] and value != {}:
            raise invalid(f"'{name}' is not supported", name, "unsupported_parameter")


def _top_count(body: Mapping[str, Any], name: str) -> int:
    """How many likeliest alternatives to list with each token (0 when not given)."""
    value = _int(body, name, minimum=0) or 0
    if value > MAX_TOP_LOGPROBS:
        raise invalid(f"'{name}' must be at most {MAX_TOP_LOGPROBS}, got {value}", name, "invalid_value")
    return value


@dataclass(frozen=True)
class Options:
    """What both endpoints share: the token limit, sampling, stop strings, streaming, and
    log-probabilities (each endpoint reads its own fields for them)."""

    model: str
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    #: Alternatives listed with each token's log-probability; None: no log-probabilities.
    logprobs: int | None = None
    #: Completions: the prompt comes first in the text (with its log-probabilities).
    echo: bool = False
    #: Choices to generate for the prompt (they share its prefill).
    n: int = 1
    #: Chat: the functions the model may call (rendered by its chat template), and
    #: `tool_choice`: "auto", "required", "none" or one function's name (None without tools).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    #: Whether a reply may call several tools (else only its first call counts).
    parallel_tool_calls: bool = True
    #: Chat: OpenAI's `response_format` (JSON, or JSON valid against a schema: constrained
    #: decoding, `meshpy.constraint`); None for text.
    response_format: dict[str, Any] | None = None

    def choice_sampling(self, index: int) -> SamplingParams:
        """Choice `index`'s sampling: a seeded request's choices differ (seeds `seed`,
        `seed + 1`, ...) and each repeats."""
        p = self.sampling
        if p.seed is None or index == 0:
            return p
        return dataclasses.replace(p, seed=p.seed + index)

    @classmethod
    def parse(cls, body: Mapping[str, Any], limit_fields: Sequence[str], min_tokens: int = 1) -> Options:
        """Reads the shared fields; `limit_fields` name the token limit, first found wins."""
        model = _model(body)
        max_tokens = None
        for name in limit_fields:
            max_tokens = _int(body, name, minimum=min_tokens)
            if max_tokens is not None:
                break
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        top_k = _int(body, "top_k", minimum=0) or 0  # not OpenAI's; vLLM and llama.cpp take it
        seed = _int(body, "seed", minimum=0)
        if top_p == 0.0:  # only the likeliest token is left: greedy
            temperature, top_p = 0.0, 1.0
        stream = _bool(body, "stream")
        n = _int(body, "n", minimum=1) or 1
        if n > MAX_CHOICES:
            raise invalid(f"'n' must be at most {MAX_CHOICES}, got {n}", "n", "invalid_value")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
            if not stream:
                raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
            include_usage = _bool(options, "include_usage")
        return cls(
            model=model,
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stop=_stop(body),
            stream=stream,
            include_usage=include_usage,
            n=n,
        )


def _content(value: object, where: str) -> str:
    """A message's text: a string, or text parts (`[{"type": "text", "text": ...}]`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}[{i}]: only text parts are supported", f"{where}[{i}]", "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where} must be a string or a list of text parts", where, "invalid_type")


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The request's `tools` (functions: name, description, JSON-schema parameters)."""
    value = body.get("tools")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise invalid("'tools' must be a list of tools", "tools", "invalid_type")
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise invalid(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where, "invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise invalid(f"{where}.function.name must be a distinct non-empty string", f"{where}.function.name",
                          "invalid_value")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters",
                          "invalid_type")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{where}.function.description must be a string", f"{where}.function.description",
                          "invalid_type")
        names.add(name)
        tools.append({"type": "function", "function": {k: v for k, v in fn.items() if k in ("name", "description", "parameters")}})
    return tools


def _tool_choice(body: Mapping[str, Any], tools: list[dict[str, Any]] | None) -> str | None:
    """`tool_choice`: "none", "auto", "required", or the name of the function to call; None
    without tools."""
    value = body.get("tool_choice")
    if tools is None:
        if value not in (None, "none"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        return None
    if value is None:
        return "auto"
    if value in ("none", "auto", "required"):
        return value
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}", "tool_choice", "invalid_value")
    if name not in {t["function"]["name"] for t in tools}:
        raise invalid(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice", "invalid_value")
    return name


def _tool_calls(value: object, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier `tool_calls`, their arguments decoded (templates write
    them with `tojson`)."""
    if not isinstance(value, list):
        raise invalid(f"{where} must be a list", where, "invalid_type")
    calls = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise invalid(f"{where}[{i}] must hold function.name and function.arguments (a JSON string)", f"{where}[{i}]",
                          "invalid_value")
        try:
            arguments = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            raise invalid(f"{where}[{i}].function.arguments is not JSON", f"{where}[{i}]", "invalid_value") from None
        calls.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return calls


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]]
    options: Options

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> ChatRequest:
        """Checks the body; 400 naming the first bad field."""
        raw = body.get("messages")
        if raw is None:
            raise invalid("'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(raw, list) or not raw:
            raise invalid("'messages' must be a non-empty list", "messages", "invalid_value")
        messages = []
        for i, m in enumerate(raw):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise invalid(f"{where} must be an object", where, "invalid_type")
            role = m.get("role")
            if role not in _ROLES:
                raise invalid(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", f"{where}.role",
                              "invalid_value")
            content = m.get("content")
            if content is None and role == "assistant":
                content = ""
            elif content is None:
                raise invalid(f"{where}.content is required", f"{where}.content", "missing_required_parameter")
            message: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                       "content": _content(content, f"{where}.content")}
            if role == "assistant" and m.get("tool_calls"):
                message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            if role == "tool":
                if not isinstance(m.get("tool_call_id"), str):
                    raise invalid(f"{where}.tool_call_id is required", f"{where}.tool_call_id",
                                  "missing_required_parameter")
                message["tool_call_id"] = m["tool_call_id"]
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
            messages.append(message)
        # A client asking for JSON, functions or audio must not get prose back as if it were.
        tools = _tools(body)
        tool_choice = _tool_choice(body, tools)
        parallel_calls = body.get("parallel_tool_calls") is None or _bool(body, "parallel_tool_calls")
        _reject_unsupported(body, [("functions", None), ("function_call", None), ("audio", None), ("prediction", None)])
        response_format = body.get("response_format")
        if response_format is not None and not isinstance(response_format, dict):
            raise invalid("'response_format' must be an object", "response_format", "invalid_type")
        if response_format == {"type": "text"}:
            response_format = None
        logprobs = None
        if _bool(body, "logprobs"):
            logprobs = _top_count(body, "top_logprobs")
        elif body.get("top_logprobs") is not None:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        options = Options.parse(body, ("max_completion_tokens", "max_tokens"))
        return cls(messages, dataclasses.replace(options, logprobs=logprobs, tools=tools, tool_choice=tool_choice,
                                                 parallel_tool_calls=parallel_calls, response_format=response_format))


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions: the prompt as text (no chat template) or as token ids."""

    prompt: str | list[int]
    options: Options

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> CompletionRequest:
        """Checks the body; 400 naming the first bad field."""
        prompt = body.get("prompt")
        if prompt is None:
            raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
            pass  # token ids
        elif not isinstance(prompt, str):
            raise invalid("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt",
                          "invalid_value")
        _reject_unsupported(body, [("suffix", None), ("best_of", 1), ("response_format", None), ("tools", None),
                                   ("tool_choice", None)])
        logprobs = None if body.get("logprobs") is None else _top_count(body, "logprobs")
        # `max_tokens` 0 with `echo`: the prompt's log-probabilities alone (log-likelihood scoring).
        options = Options.parse(body, ("max_tokens",), min_tokens=0)
        echo = _bool(body, "echo")
        if echo and options.n > 1:
            raise invalid("'echo' with 'n' > 1 is not supported", "echo", "unsupported_value")
        if options.max_tokens == 0 and not echo:
            raise invalid("'max_tokens' must be >= 1 (0 only with 'echo': true, to score the prompt)", "max_tokens",
                          "invalid_value")
        return cls(prompt, dataclasses.replace(options, logprobs=logprobs, echo=echo))


# --- responses ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id, e.g. `chatcmpl-3f2a...`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """Token counts; `cached_tokens`: prompt tokens whose KV caches were reused, not computed."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _head(id: str, object: str, model: str, created: int | None) -> dict[str, Any]:
    # `system_fingerprint`: the API's backend configuration tag; none here, as the API may send.
    return {"id": id, "object": object, "created": int(time.time()) if created is None else created, "model": model,
            "system_fingerprint": None}


def _spelling(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as text and as its UTF-8 bytes (which may be part of a character)."""
    data = tokenizer.token_bytes(token)
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tokens: Sequence[tuple[int, TokenLogprob | None]], tokenizer: Tokenizer) -> dict[str, Any]:
    """A chat choice's `logprobs`: each token with its log-probability and alternatives."""
    content = []
    for token, scored in tokens:
        text, data = _spelling(tokenizer, token)
        top = []
        for alt, logprob in scored.top if scored is not None else ():
            alt_text, alt_data = _spelling(tokenizer, alt)
            top.append({"token": alt_text, "logprob": logprob, "bytes": alt_data})
        content.append({"token": text, "logprob": scored.logprob if scored is not None else 0.0, "bytes": data,
                        "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[tuple[int, TokenLogprob | None]], offsets: Sequence[int],
                        tokenizer: Tokenizer) -> dict[str, Any]:
    """A text completion choice's `logprobs` (the legacy shape): the tokens, their
    log-probabilities (None for the prompt's first, with `echo`), the likeliest tokens at each
    place as {text: log-probability}, and where each token starts in the choice's text."""
    texts, values, tops = [], [], []
    for token, scored in tokens:
        texts.append(_spelling(tokenizer, token)[0])
        values.append(None if scored is None else scored.logprob)
        tops.append(None if scored is None else {_spelling(tokenizer, alt)[0]: lp for alt, lp in scored.top})
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": list(offsets)}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None = None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One choice of a whole chat completion (with the tool calls it made: then its content
    is null when it wrote nothing else)."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message.update(content=text or None, tool_calls=tool_calls)
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion (`choices` from `chat_choice`)."""
    return {**_head(id, "chat.completion", model, None), "choices": choices, "usage": usage}


def chat_chunk(
    id: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None, *, with_usage: bool = False, logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One chunk of a streamed chat completion: choice `index`'s delta or final finish
    reason, or (with `delta` None) the usage chunk, whose `choices` is empty."""
    chunk = _head(id, "chat.completion.chunk", model, created)
    chunk["choices"] = [] if delta is None else [
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    ]
    if with_usage:
        chunk["usage"] = usage
    return chunk


def completion_choice(index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a whole text completion."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """A whole text completion (`choices` from `completion_choice`)."""
    return {**_head(id, "text_completion", model, None), "choices": choices, "usage": usage}


def completion_chunk(
    id: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None, *, with_usage: bool = False, logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One chunk of a streamed text completion: choice `index`'s text (`text` None: the
    usage chunk)."""
    chunk = _head(id, "text_completion", model, created)
    chunk["choices"] = [] if text is None else [
        {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    ]
    if with_usage:
        chunk["usage"] = usage
    return chunk
