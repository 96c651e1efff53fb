"""Tool calling: the formats in which the supported families write tool calls, read back into
the API's `tool_calls`, as a whole reply or as it streams.

A chat template that knows tools (the `tools` variable) tells the model how to call them; the
model then writes calls as text in its family's format, which `ToolFormat.for_template` picks
from the template's own text:

- Hermes (Qwen2.5, Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call (Qwen3's template: tokenizer_config.json of Qwen/Qwen3-*);
- Llama 3.1+ JSON: a reply that is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), calls separated by `;` (Llama 3.1's template and model card);
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (mistral-common's v3 format).

`ToolCallParser` takes the reply's text as it comes: text before a call streams on as content;
from a call's opening on, text is held back and each call is handed out whole once it is
complete (one `tool_calls` delta each, with its id, name and arguments); text that turns out
not to be a call is released at the end. `ToolFormat.grammar` writes the Lark grammar
(llguidance's, with `%json` for the arguments' schema) that forces a call, for `tool_choice`
"required" or a named function.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ToolCall", "ToolFormat", "ToolUse", "ToolCallParser", "HERMES", "LLAMA3", "MISTRAL", "new_call_id"]


def new_call_id() -> str:
    """An id for a tool call, as the API writes them (`call_...`)."""
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ToolCall:
    """One call: its id, the function's name, its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def body(self, index: int | None = None) -> dict[str, Any]:
        """The API's shape (with `index` for a stream's delta)."""
        out: dict[str, Any] = {} if index is None else {"index": index}
        out.update({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
        return out


def _call_from(obj: object, args_key: str) -> ToolCall | None:
    """A call from a decoded JSON object `{"name": ..., args_key: {...}}`, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes tool calls."""

    name: str
    #: Text that opens the calls ("" : a reply that starts with `{` may be one).
    opening: str
    #: Text that closes one call (Hermes), or "" when the calls run to the reply's end.
    closing: str
    #: The key the arguments come under.
    args_key: str

    @staticmethod
    def for_template(template: str | None) -> ToolFormat | None:
        """The format a chat template asks for, or None when it has no tools."""
        if not template or "tools" not in template:
            return None
        if "<tool_call>" in template:
            return HERMES
        if "[TOOL_CALLS]" in template:
            return MISTRAL
        if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
            return LLAMA3
        return None

    def parse(self, text: str, names: Collection[str] | None = None) -> list[ToolCall] | None:
        """The calls in `text` (what follows the opening, up to the end of the reply), or None
        when it does not hold calls of this format (or, with `names`, calls a function not
        among them: then it is text that looks like a call)."""
        calls = self._parse(text)
        if calls is not None and names is not None and any(c.name not in names for c in calls):
            return None
        return calls

    def _parse(self, text: str) -> list[ToolCall] | None:
        if self is HERMES:
            calls = []
            for block in text.split(self.closing):
                block = block.strip()
                if not block:
                    continue
                block = block.removeprefix(self.opening).strip()
                try:
                    call = _call_from(json.loads(block), self.args_key)
                except json.JSONDecodeError:
                    return None
                if call is None:
                    return None
                calls.append(call)
            return calls or None
        if self is MISTRAL:
            try:
                items = json.loads(text.strip())
            except json.JSONDecodeError:
                return None
            items = items if isinstance(items, list) else [items]
            found = [_call_from(item, self.args_key) for item in items]
            return None if not found or any(c is None for c in found) else [c for c in found if c is not None]
        # Llama 3: one JSON object, or several separated by ";".
        decoder, calls, at, body = json.JSONDecoder(), [], 0, text.strip().removeprefix("<|python_tag|>").strip()
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return None
            call = _call_from(obj, self.args_key)
            if call is None:
                return None
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        return calls or None

    def grammar(self, tools: Sequence[Mapping[str, Any]]) -> str:
        """A Lark grammar (llguidance's dialect) for one call of one of `tools` in this format,
        its arguments valid for the function's JSON schema."""
        options = []
        for tool in tools:
            fn = tool["function"]
            params = fn.get("parameters") or {"type": "object"}
            options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, self.args_key: params},
                            "required": ["name", self.args_key], "additionalProperties": False})
        from meshpy.constraint import json_rule  # (llguidance, only where calls are forced)

        call = json_rule(options[0] if len(options) == 1 else {"anyOf": options})
        if self is HERMES:
            return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {call}\n'
        if self is MISTRAL:
            return f'start: "[TOOL_CALLS][" call "]"\ncall: {call}\n'
        return f"start: call\ncall: {call}\n"


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", "", "", "parameters")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments")


@dataclass(frozen=True)
class ToolUse:
    """A request's tools as its reply is read: the model's format, the functions offered (a
    call of another is text), and whether several calls may come back (`parallel_tool_calls`;
    else only the first counts)."""

    format: ToolFormat
    names: frozenset[str]
    parallel: bool = True

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.format, self.names)


_PYTHON_TAG = "<|python_tag|>"


class ToolCallParser:
    """Splits a reply, as its text comes, into content and tool calls (see the module
    documentation). `feed` returns the content that may be shown now and the calls completed;
    `finish` what is left once the reply ends. With `names`, only calls of those functions
    count as calls (a reply that looks like a call of another is text)."""

    def __init__(self, format: ToolFormat, names: Collection[str] | None = None) -> None:
        self.format = format
        self.names = None if names is None else frozenset(names)
        self.calls: list[ToolCall] = []
        self._held = ""  # text from a (possible) call's opening on
        self._in_call = False
        self._started = False  # any non-space text seen (Llama 3: a call must come first)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        fmt = self.format
        if not self._in_call:
            if not fmt.opening:  # Llama 3: a reply whose first non-space character opens an object
                if self._started:
                    return text, []
                held = self._held + text
                stripped = held.lstrip()
                if not stripped or (len(stripped) < len(_PYTHON_TAG) and _PYTHON_TAG.startswith(stripped)):
                    self._held = held  # too early to tell
                    return "", []
                self._started = True
                if stripped.startswith("{") or stripped.startswith(_PYTHON_TAG):
                    self._in_call, self._held = True, held
                    return "", []
                self._held = ""
                return held, []
            text = self._held + text
            at = text.find(fmt.opening)
            if at < 0:  # hold back what may be the opening's start
                hold = max((k for k in range(1, len(fmt.opening)) if text.endswith(fmt.opening[:k])), default=0)
                self._held = text[len(text) - hold :]
                return text[: len(text) - hold], []
            self._in_call, self._held = True, text[at:]
            content = text[:at]
        else:
            self._held += text
            content = ""
        done: list[ToolCall] = []
        if fmt.closing:  # Hermes: each closed block is a call
            while True:
                stripped = self._held.lstrip()
                if stripped and not (stripped.startswith(fmt.opening) or fmt.opening.startswith(stripped)):
                    # Text after the calls: read on from there (it may open another call).
                    self._held, self._in_call = "", False
                    self.calls += done
                    more, calls = self.feed(stripped)
                    return content + more, done + calls
                end = self._held.find(fmt.closing)
                if end < 0:
                    break
                block, self._held = self._held[: end + len(fmt.closing)], self._held[end + len(fmt.closing) :]
                parsed = fmt.parse(block, self.names)
                if parsed is None:  # not a call after all: it is content
                    content += block
                    continue
                done += parsed
        self.calls += done
        return content, done

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        if not self._in_call or not held.strip():
            return held, []
        body = held.removeprefix(self.format.opening) if self.format.opening else held
        parsed = self.format.parse(body, self.names)
        if parsed is None:
            return held, []  # not a call: the model wrote this as text
        self.calls += parsed
        return "", parsed
