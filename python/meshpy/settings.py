"""Settings models: one dataclass per component, each field with a default, bounds and a
description. The CLI flags (`--max-tokens`) and environment variables (`MESHPY_MAX_TOKENS`)
are both derived from the same field, so they cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from meshpy.errors import InvalidArgumentError

__all__ = ["setting", "add_arguments", "from_namespace", "GenerateSettings"]

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[Any, ...] | None = None,
    short: str | None = None,
) -> Any:
    """A settings field: default (none means required), description, bounds, choices."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "short": short}
    if default is _MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "MESHPY_" + name.upper()


def _base_type(tp: Any) -> type:
    args = getattr(tp, "__args__", None)
    if args:  # Optional[X] / X | None
        return next(a for a in args if a is not type(None))
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one flag per field of the settings dataclass `cls`."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp = _base_type(hints[f.name])
        names = [_flag(f.name)] + ([meta["short"]] if meta.get("short") else [])
        required = f.default is _MISSING
        help_text = meta.get("help", "")
        help_text += f" [env {_env(f.name)}" + ("]" if required else f"; default {f.default!r}]")
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=str, default=None, choices=meta.get("choices"), help=help_text)


def _convert(name: str, tp: type, raw: Any) -> Any:
    if isinstance(raw, tp) and not (tp is int and isinstance(raw, bool)):
        return raw
    try:
        if tp is bool:
            value = str(raw).strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is Path:
            return Path(raw).expanduser()
        return tp(raw)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{_flag(name)}: {raw!r} is not a valid {tp.__name__}") from None


def from_namespace(cls: type[T], namespace: argparse.Namespace | dict[str, Any]) -> T:
    """Builds settings from parsed flags, then environment variables, then defaults, and
    checks bounds."""
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        raw = given.get(f.name)
        if raw is None:
            raw = os.environ.get(_env(f.name))
        if raw is None:
            if f.default is _MISSING:
                raise InvalidArgumentError(f"{_flag(f.name)} is required (or set {_env(f.name)})")
            values[f.name] = f.default
            continue
        value = _convert(f.name, tp, raw)
        meta = f.metadata
        lo, hi, choices = meta.get("minimum"), meta.get("maximum"), meta.get("choices")
        if lo is not None and value < lo or hi is not None and value > hi:
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise InvalidArgumentError(f"{_flag(f.name)}: {value!r} is outside {bounds}")
        if choices is not None and value not in choices:
            raise InvalidArgumentError(f"{_flag(f.name)}: {value!r} is not one of {choices}")
        values[f.name] = value
    return cls(**values)


@dataclass(frozen=True)
class GenerateSettings:
    """`meshpy generate`: one prompt through a model in this process."""

    model: Path = setting(help="a .gguf file, an HF checkpoint directory, or a packaged model (smollm2, gemma3-270m)", short="-m")
    prompt: str = setting(help="the prompt (a user message, unless --raw)", short="-p")
    max_tokens: int = setting(256, "most tokens to generate", minimum=1, short="-n")
    temperature: float = setting(0.0, "sampling temperature; 0 is greedy", minimum=0.0, maximum=100.0)
    top_k: int = setting(0, "sample among the k likeliest tokens; 0 keeps all", minimum=0)
    top_p: float = setting(1.0, "nucleus sampling mass", minimum=0.0, maximum=1.0)
    seed: int | None = setting(None, "random seed for sampling")
    threads: int | None = setting(None, "compute threads (default: the CPUs available)", minimum=1, maximum=1024, short="-t")
    raw: bool = setting(False, "send the prompt as is, without the chat template")
    quantize: str | None = setting(None, "quantize float weights at load", choices=("Q8_0", "Q4_0"))
    spans: int = setting(1, "run the layers as this many spans in turn (what the mesh does)", minimum=1)
