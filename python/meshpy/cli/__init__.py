"""The `meshpy` command. Each subcommand parses its settings and calls one library function."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from meshpy.config_file import CONFIG_ENV, config_path, default_config_path, read_config_file
from meshpy.errors import MeshpyError
from meshpy.settings import (
    BootstrapSettings,
    ChatSettings,
    DemoSettings,
    GenerateSettings,
    InitSettings,
    KeygenSettings,
    ServeSettings,
    StatusSettings,
    SeedSettings,
    WorkerSettings,
    add_arguments,
    from_namespace,
)

__all__ = ["main"]


#: Each command: its settings, the function that runs it ("module:function", imported only
#: when that command runs), and its help line.
_COMMANDS: dict[str, tuple[type, str, str]] = {
    "generate": (GenerateSettings, "meshpy.cli.generate:run_generate", "generate a reply to one prompt"),
    "chat": (ChatSettings, "meshpy.cli.chat:run_chat", "a conversation in the terminal, with a local model or a mesh"),
    "bootstrap": (BootstrapSettings, "meshpy.cli.mesh:run_bootstrap", "run a rendezvous node for a mesh"),
    "seed": (SeedSettings, "meshpy.cli.mesh:run_seed", "serve a model's file to the mesh, for nodes that start from its id"),
    "worker": (WorkerSettings, "meshpy.cli.mesh:run_worker", "host a range of a model's layers for the mesh"),
    "status": (StatusSettings, "meshpy.cli.mesh:run_status", "list a mesh's workers and uncovered layers"),
    "serve": (ServeSettings, "meshpy.cli.serve:run_serve", "serve a model over an OpenAI-compatible HTTP API"),
    "demo": (DemoSettings, "meshpy.cli.demo:run_demo", "a whole mesh and server on this machine, one request"),
    "keygen": (KeygenSettings, "meshpy.cli.mesh:run_keygen", "write a network key: only nodes holding it join the mesh"),
    "init": (InitSettings, "meshpy.cli.init:run_init", "answer a few questions; writes the config file every command reads"),
}

#: Commands that read no config file (`init` writes it).
_WITHOUT_CONFIG = ("init",)

#: Commands that run as servers log what they do by default.
_SERVERS = ("bootstrap", "seed", "worker", "serve")


def _version() -> str:
    """`meshpy-llm X (core Y)`: the installed distribution's version (the source tree's, run
    from a checkout) and the Rust extension's."""
    from importlib.metadata import PackageNotFoundError, version

    from meshpy import _native

    try:
        package = version("meshpy-llm")
    except PackageNotFoundError:
        package = f"{_native.__version__} (source tree)"
    return f"meshpy-llm {package} (core {_native.__version__})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpy", description="Peer-to-peer, pipeline-parallel LLM inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _target, help_text) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=cls.__doc__)
        add_arguments(command, cls)
        if name not in _WITHOUT_CONFIG:
            command.add_argument("--config", default=None, help="settings file (TOML; flags and MESHPY_* variables override its keys) "
                                 f"[env {CONFIG_ENV}; default {default_config_path()} if it exists]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meshpy` script and `python -m meshpy`."""
    args = _parser().parse_args(argv)
    verbosity = args.verbose + (1 if args.command in _SERVERS else 0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from meshpy import _native

    _native.init_logging(logging.getLevelName(level).lower())
    cls, target, _help = _COMMANDS[args.command]
    module, function = target.split(":")
    try:
        config: dict[str, object] = {}
        path = None if args.command in _WITHOUT_CONFIG else config_path(args.config)
        if path is not None:
            config = read_config_file(path, args.command, {name: c for name, (c, _t, _h) in _COMMANDS.items() if name not in _WITHOUT_CONFIG})
            logging.getLogger(__name__).info("settings from %s", path)
        run = getattr(importlib.import_module(module), function)
        return int(run(from_namespace(cls, args, config)))
    except MeshpyError as exc:
        print(f"meshpy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
