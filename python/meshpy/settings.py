"""Settings models: one dataclass per component, each field with a default, bounds and a
description. The CLI flags (`--max-tokens`) and environment variables (`MESHPY_MAX_TOKENS`)
are both derived from the same field, so they cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from meshpy.errors import InvalidArgumentError
from meshpy.gpu import DEVICE_HELP
from meshpy.prompt_cache import DEFAULT_MAX_SESSIONS

__all__ = [
    "setting",
    "add_arguments",
    "from_namespace",
    "GenerateSettings",
    "NodeSettings",
    "BootstrapSettings",
    "WorkerSettings",
    "StatusSettings",
    "ServeSettings",
    "KeygenSettings",
    "InitSettings",
]

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
    positional: bool = False,
    repeatable: bool = False,
) -> Any:
    """A settings field: default (none means required), description, bounds, choices; a
    positional one is given on the command line without its flag (`meshpy keygen FILE`); a
    repeatable one is a tuple of strings, its flag given once per value and its environment
    variable holding them separated by commas or spaces."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "short": short,
            "positional": positional, "repeatable": repeatable}
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
        if meta.get("repeatable"):
            parser.add_argument(*names, dest=f.name, action="append", default=None, help=help_text)
        elif meta.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), nargs="?", type=str, default=None, help=help_text)
        elif tp is bool:
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


def from_namespace(cls: type[T], namespace: argparse.Namespace | dict[str, Any], config: Mapping[str, Any] | None = None) -> T:
    """Builds settings from parsed flags, then environment variables, then `config` (the
    config file's values for this command, `config_file.read_config_file`), then defaults, and
    checks bounds."""
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    config = config or {}
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        raw = given.get(f.name)
        if raw is None:
            raw = os.environ.get(_env(f.name))
        if raw is None:
            raw = config.get(f.name)
        if raw is None:
            if f.default is _MISSING:
                raise InvalidArgumentError(f"{_flag(f.name)} is required (or set {_env(f.name)}, or {f.name.replace('_', '-')} in the config file)")
            values[f.name] = f.default
            continue
        meta = f.metadata
        if meta.get("repeatable"):
            values[f.name] = tuple(raw) if isinstance(raw, (list, tuple)) else tuple(str(raw).replace(",", " ").split())
            continue
        value = _convert(f.name, tp, raw)
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

    model: Path = setting(help="a .gguf file, an HF checkpoint directory, a packaged model (smollm2, gemma3-270m), or with --bootstrap a model id (name@hash) to fetch from the mesh", short="-m")
    prompt: str = setting(help="the prompt (a user message, unless --raw)", short="-p")
    max_tokens: int = setting(256, "most tokens to generate", minimum=1, short="-n")
    temperature: float = setting(0.0, "sampling temperature; 0 is greedy", minimum=0.0, maximum=100.0)
    top_k: int = setting(0, "sample among the k likeliest tokens; 0 keeps all", minimum=0)
    top_p: float = setting(1.0, "nucleus sampling mass", minimum=0.0, maximum=1.0)
    seed: int | None = setting(None, "random seed for sampling")
    threads: int | None = setting(None, "compute threads (default: the CPUs available)", minimum=1, maximum=1024, short="-t")
    raw: bool = setting(False, "send the prompt as is, without the chat template")
    quantize: str | None = setting(None, "quantize float weights at load", choices=("Q8_0", "Q4_0"))
    kv_dtype: str | None = setting(None, "KV cache type (default: f16, or f32 for a checkpoint whose K/V projections are f32)", choices=("f16", "f32"))
    spans: int = setting(1, "run the layers as this many spans in turn (what the mesh does)", minimum=1)
    device: str = setting("cpu", "where the embedding and head (and, without --bootstrap, the layers) run: " + DEVICE_HELP)
    speculate: bool = setting(True, "draft tokens (by prompt lookup, or --draft-model) and verify them in one pass: the same greedy tokens, the same sampling distribution")
    draft_model: Path | None = setting(None, "a small model sharing the tokenizer that drafts the tokens to verify (default: prompt lookup)")
    bootstrap: str | None = setting(None, "run the layers on the mesh joined through this multiaddr (comma-separated for several), or lan: the mesh found on the local network (mDNS)")
    transport: str = setting("tcp", "transport the mesh client listens on (it dials either)", choices=("tcp", "quic", "both"))
    wire_dtype: str = setting("f32", "hidden states on the wire: f32 gives exactly the single-process tokens", choices=("f32", "bf16", "f16"))
    route: str = setting("chain", "how a step crosses the mesh: chain (worker to worker, N+1 link crossings for N workers) or star (each worker a round trip from here, 2N)", choices=("chain", "star"))
    network_key: Path | None = setting(None, "the mesh's key file (meshpy keygen FILE): only nodes holding it can connect; TCP only")
    allow_peer: tuple[str, ...] = setting((), "serve and route through this peer only (repeat for each; a file of peer ids, one per line, counts as its lines); none: every peer", repeatable=True)
    node_dir: Path | None = setting(None, "directory of this client's identity key, so workers can name it in --allow-peer (default: a new identity each run)")
    route_timeout: float = setting(30.0, "seconds to wait for workers to cover every layer", minimum=0.0)
    verify: float = setting(0.0, "share of sessions (0 to 1) checked on a second provider of each hop's layers; a provider whose output disagrees is banned (a third one decides)", minimum=0.0, maximum=1.0)
    store: Path | None = setting(None, "with --bootstrap and a model id (name@hash): where the End model's tensors fetched from the mesh are kept (default: ~/.cache/meshpy/models)")


_TRANSPORTS = ("tcp", "quic", "both")


@dataclass(frozen=True)
class ChatSettings(GenerateSettings):
    """`meshpy chat`: a conversation in the terminal with a model in this process, or on a mesh
    with --bootstrap. Each reply sees the whole conversation (the model's chat template);
    /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply."""

    prompt: str | None = setting(None, "a first message (then the conversation goes on in the terminal)", short="-p")
    system: str | None = setting(None, "a system message opening the conversation")


@dataclass(frozen=True)
class NodeSettings:
    """What every mesh node shares: where it listens and how it joins."""

    port: int = setting(0, "port to listen on (TCP and UDP for QUIC); 0 takes a free one", minimum=0, maximum=65535)
    host: str = setting("0.0.0.0", "address to listen on (127.0.0.1: this machine only)")
    transport: str = setting("both", "transports to listen on", choices=_TRANSPORTS)
    node_dir: Path | None = setting(None, "directory of the node's identity key (default: per role and port)")
    network_key: Path | None = setting(None, "the mesh's key file (meshpy keygen FILE): only nodes holding it can connect; TCP only")
    allow_peer: tuple[str, ...] = setting((), "serve and route through this peer only (repeat for each; a file of peer ids, one per line, counts as its lines); none: every peer", repeatable=True)
    peer_rate: float | None = setting(None, "requests one peer may send this node per second, past which they are refused 'overloaded' (default 2000; 0: no limit)", minimum=0.0)
    mdns: bool = setting(True, "find nodes on the local network by mDNS (multicast; only when listening beyond 127.0.0.1): with no --bootstrap, join the mesh found there, or start one its nodes find")
    relay: bool = setting(False, "relay connections for nodes behind NATs that others cannot reach (they reserve a slot here); for nodes others can reach")
    hole_punch: bool = setting(True, "turn relayed connections into direct ones when both ends' NATs allow it (DCUtR hole punching)")
    metrics_port: int | None = setting(None, "serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port; none: no metrics server)", minimum=0, maximum=65535)


@dataclass(frozen=True)
class BootstrapSettings(NodeSettings):
    """`meshpy bootstrap`: a rendezvous node; prints the addresses others pass to --bootstrap."""

    port: int = setting(9000, "port to listen on (TCP and UDP for QUIC); 0 takes a free one", minimum=0, maximum=65535)
    relay: bool = setting(True, "relay connections for nodes behind NATs that others cannot reach (they reserve a slot here)")


@dataclass(frozen=True)
class WorkerSettings(NodeSettings):
    """`meshpy worker`: host a range of a model's layers (or echo, without --model)."""

    bootstrap: str | None = setting(None, "multiaddr of a mesh node to join (comma-separated for several), or lan: only the local network's mesh (mDNS); none: the local network's mesh if one answers (with --mdns), else a mesh of its own")
    model: Path | None = setting(None, "the model: a GGUF file, an HF directory, a packaged name, or a model id (name@hash, as `meshpy status` shows it) to fetch from the mesh; none: echo mode", short="-m")
    store: Path | None = setting(None, "where models fetched from the mesh are kept (default: ~/.cache/meshpy/models)")
    layers: str | None = setting(None, "layers to host, e.g. 0-7 (default: the least-covered range that fits --memory)")
    device: str = setting("cpu", "where the layers run: " + DEVICE_HELP)
    memory: str | None = setting(None, "memory for weights, KV cache and runtime, e.g. 2GiB (default: what is free)")
    kv_budget: str = setting("256MiB", "KV cache memory all sessions together may hold")
    peer_sessions: int | None = setting(None, "sessions one peer may hold here at once (default 1024); on a chained route a worker's sessions count against the worker before it", minimum=1)
    peer_kv: str | None = setting(None, "KV cache memory one peer's sessions may hold together (default: all of --kv-budget); on a chained route a worker's sessions count against the worker before it")
    threads: int | None = setting(None, "compute threads (default: the CPUs available)", minimum=1, maximum=1024, short="-t")
    idle_timeout: float = setting(300.0, "seconds before an unused session is dropped", minimum=1.0)
    drain_timeout: float = setting(30.0, "on SIGTERM or Ctrl-C, seconds to let held sessions end or move (no new ones start) before leaving; those still held then move with replay", minimum=0.0)
    hand_over: bool = setting(True, "on leaving, hand each held session with its KV cache to another worker of its layers, so its End node goes on there with nothing to replay")
    kv_dtype: str | None = setting(None, "KV cache type (default: f16, or f32 for a checkpoint whose K/V projections are f32)", choices=("f16", "f32"))
    rebalance: bool = setting(True, "when layers lose their last provider and every layer here has another, move to them (one such worker moves; its sessions move with replay); not with --layers or a model fetched from the mesh")


@dataclass(frozen=True)
class SeedSettings(NodeSettings):
    """`meshpy seed`: serve a model's file to the mesh, so nodes started from its model id fetch
    the parts they need from here (no layers run here)."""

    model: Path | None = setting(None, "the model to serve (required): a GGUF file or a packaged model name", short="-m")
    bootstrap: str | None = setting(None, "multiaddr of a mesh node to join (comma-separated for several), or lan: the local network's mesh (mDNS); none: the local network's mesh if one answers (with --mdns), else a mesh of its own others join through it")


@dataclass(frozen=True)
class KeygenSettings:
    """`meshpy keygen`: writes a new network key; give the file to every node of the mesh
    (--network-key FILE, or MESHPY_NETWORK_KEY)."""

    path: Path = setting(help="where to write the key (never over an existing file)", positional=True)


@dataclass(frozen=True)
class InitSettings:
    """`meshpy init`: asks a few questions (role, model, mesh, memory, ports, network key) and
    writes the config file every command reads."""

    path: Path | None = setting(None, "where to write it (default: ~/.config/meshpy/config.toml, which every command reads)", positional=True)
    force: bool = setting(False, "write over an existing file")


@dataclass(frozen=True)
class StatusSettings:
    """`meshpy status`: the workers of a mesh, their layers, and layers nobody serves."""

    bootstrap: str = setting(help="multiaddr of a mesh node (comma-separated for several), or lan: the mesh found on the local network (mDNS)")
    model: Path | None = setting(None, "only this model (default: every model the workers serve)", short="-m")
    transport: str = setting("tcp", "transport this client listens on", choices=_TRANSPORTS)
    network_key: Path | None = setting(None, "the mesh's key file (meshpy keygen FILE): only nodes holding it can connect; TCP only")
    allow_peer: tuple[str, ...] = setting((), "serve and route through this peer only (repeat for each; a file of peer ids, one per line, counts as its lines); none: every peer", repeatable=True)
    json: bool = setting(False, "print one JSON object (workers with their Info fields and round trips, End nodes, each model's uncovered layers and seeders) instead of text")


@dataclass(frozen=True)
class ServeSettings:
    """`meshpy serve`: an OpenAI-compatible HTTP server for a model, its layers in this
    process or (with --bootstrap) on a mesh."""

    model: Path = setting(help="a .gguf file, an HF checkpoint directory, a packaged model (smollm2, gemma3-270m), or with --bootstrap a model id (name@hash) to fetch from the mesh", short="-m")
    bootstrap: str | None = setting(None, "run the layers on the mesh joined through this multiaddr (comma-separated for several), or lan: the mesh found on the local network (mDNS)")
    host: str = setting("127.0.0.1", "address the HTTP server listens on (0.0.0.0: every interface)")
    port: int = setting(8000, "HTTP port; 0 takes a free one", minimum=0, maximum=65535)
    api_key: str | None = setting(None, "require this key (Authorization: Bearer KEY) on the /v1 endpoints")
    model_name: str | None = setting(None, "the model's name in the API (default: the --model file name without .gguf)")
    max_tokens: int | None = setting(None, "completion tokens for requests that set no limit (default: the rest of the context)", minimum=1)
    max_concurrent: int = setting(16, "generations run at once; more requests wait for a slot", minimum=1, maximum=4096)
    speculate: bool = setting(True, "draft tokens (by prompt lookup, or --draft-model) and verify them in one pass: the same greedy tokens, the same sampling distribution")
    draft_model: Path | None = setting(None, "a small model sharing the tokenizer that drafts the tokens to verify (default: prompt lookup)")
    max_waiting: int = setting(64, "requests waiting for a slot; beyond this they get 429 (server busy)", minimum=0, maximum=100000)
    prompt_cache: int = setting(DEFAULT_MAX_SESSIONS, "sessions of ended requests kept so a prompt that starts the same way prefills only the rest (their KV caches stay here or on the workers); 0 turns prompt caching off", minimum=0, maximum=1024)
    threads: int | None = setting(None, "compute threads (default: the CPUs available)", minimum=1, maximum=1024, short="-t")
    quantize: str | None = setting(None, "quantize float weights at load (without --bootstrap)", choices=("Q8_0", "Q4_0"))
    kv_dtype: str | None = setting(None, "KV cache type, without --bootstrap (default: f16, or f32 for a checkpoint whose K/V projections are f32)", choices=("f16", "f32"))
    device: str = setting("cpu", "where the embedding and head (and, without --bootstrap, the layers) run: " + DEVICE_HELP)
    transport: str = setting("tcp", "transport the mesh client listens on (it dials either)", choices=_TRANSPORTS)
    wire_dtype: str = setting("f32", "hidden states on the wire: f32 gives exactly the single-process tokens", choices=("f32", "bf16", "f16"))
    route: str = setting("chain", "how a step crosses the mesh: chain (worker to worker, N+1 link crossings for N workers) or star (each worker a round trip from here, 2N)", choices=("chain", "star"))
    network_key: Path | None = setting(None, "the mesh's key file (meshpy keygen FILE): only nodes holding it can connect; TCP only")
    allow_peer: tuple[str, ...] = setting((), "serve and route through this peer only (repeat for each; a file of peer ids, one per line, counts as its lines); none: every peer", repeatable=True)
    node_dir: Path | None = setting(None, "directory of this client's identity key, so workers can name it in --allow-peer (default: a new identity each run)")
    route_timeout: float = setting(30.0, "seconds to wait for workers to cover every layer", minimum=0.0)
    verify: float = setting(0.0, "share of sessions (0 to 1) checked on a second provider of each hop's layers; a provider whose output disagrees is banned (a third one decides)", minimum=0.0, maximum=1.0)
    store: Path | None = setting(None, "with --bootstrap and a model id (name@hash): where the End model's tensors fetched from the mesh are kept (default: ~/.cache/meshpy/models)")


@dataclass(frozen=True)
class DemoSettings:
    """`meshpy demo`: a whole mesh on this machine (a bootstrap node, workers splitting the
    model, the OpenAI server), one chat request through the official openai client, then the
    server stays up for you until Ctrl-C."""

    model: Path = setting(Path("smollm2"), "the model (a packaged name, a .gguf file or an HF directory)", short="-m")
    workers: int = setting(2, "worker processes splitting the layers", minimum=1, maximum=64)
    prompt: str = setting("Write a short paragraph about Paris, the capital of France.", "the demo's chat message", short="-p")
    max_tokens: int = setting(128, "most tokens in the demo's reply", minimum=1, short="-n")
    host: str = setting("127.0.0.1", "address the HTTP server listens on")
    port: int = setting(8000, "HTTP port; 0 takes a free one", minimum=0, maximum=65535)
    threads: int | None = setting(None, "compute threads per process (default: the CPUs available)", minimum=1, maximum=1024, short="-t")
    once: bool = setting(False, "exit after the demo request instead of serving until Ctrl-C")
