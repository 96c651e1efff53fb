"""`meshpy chat`: a conversation in the terminal. The whole conversation goes through the
model's chat template at each turn; replies stream as they are generated."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from meshpy.cli.generate import connect_or_load
from meshpy.errors import ContextOverflowError, InvalidArgumentError
from meshpy.generation import Model
from meshpy.sampling import SamplingParams
from meshpy.settings import ChatSettings

__all__ = ["run_chat"]

HELP = "/reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply"


def run_chat(settings: ChatSettings) -> int:
    """Loads the model (or joins the mesh), then reads messages and streams replies until
    /exit or end of input."""
    if settings.raw:
        raise InvalidArgumentError("chat always uses the model's chat template; --raw is for `meshpy generate`")
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass
    with connect_or_load(settings) as model:
        print(f"[chatting with {settings.model}: {HELP}]", file=sys.stderr, flush=True)
        _converse(model, settings)
    return 0


def _converse(model: Model, settings: ChatSettings) -> None:
    opening = [{"role": "system", "content": settings.system}] if settings.system else []
    messages: list[dict[str, Any]] = list(opening)
    sampling = SamplingParams(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed)
    pending = settings.prompt
    while True:
        if pending is not None:
            text, pending = pending, None
            print(f"> {text}", flush=True)
        else:
            try:
                text = input("> ")
            except EOFError:
                print(flush=True)
                return
            except KeyboardInterrupt:
                print(flush=True)
                continue
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(opening)
            print("[conversation reset]", file=sys.stderr, flush=True)
            continue
        if command.startswith("/"):
            print(f"[unknown command {command.split()[0]}: {HELP}]", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        reply = _reply(model, messages, settings.max_tokens, sampling)
        if reply is None:
            messages.pop()  # the message did not fit: the conversation stays as it was
        else:
            messages.append({"role": "assistant", "content": reply})


def _reply(model: Model, messages: list[dict[str, Any]], max_tokens: int, sampling: SamplingParams) -> str | None:
    """Streams one reply to the conversation; its text (cut short by Ctrl-C, or None when the
    conversation no longer fits the context)."""
    gen = model.stream(messages, max_tokens=max_tokens, sampling=sampling)
    pieces: list[str] = []
    try:
        for piece in gen:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        gen.close()
        print("\n[stopped]", file=sys.stderr, flush=True)
        return "".join(pieces)
    except ContextOverflowError as e:
        print(f"\n[{e}: /reset to start over]", file=sys.stderr, flush=True)
        return None
    sys.stdout.write("\n")
    s = gen.stats
    print(f"[{s.completion_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s]", file=sys.stderr, flush=True)
    return "".join(pieces)
