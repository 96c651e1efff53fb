"""The `meshpy` command. Each subcommand parses its settings and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshpy.errors import MeshpyError
from meshpy.settings import (
    BootstrapSettings,
    GenerateSettings,
    ServeSettings,
    StatusSettings,
    WorkerSettings,
    add_arguments,
    from_namespace,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpy", description="Peer-to-peer, pipeline-parallel LLM inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt", description=GenerateSettings.__doc__)
    add_arguments(gen, GenerateSettings)
    for name, cls, help_text in (
        ("bootstrap", BootstrapSettings, "run a rendezvous node for a mesh"),
        ("worker", WorkerSettings, "host a range of a model's layers for the mesh"),
        ("status", StatusSettings, "list a mesh's workers and uncovered layers"),
        ("serve", ServeSettings, "serve a model over an OpenAI-compatible HTTP API"),
    ):
        add_arguments(sub.add_parser(name, help=help_text, description=cls.__doc__), cls)
    return parser


#: Commands that run as servers log what they do by default.
_SERVERS = ("bootstrap", "worker", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meshpy` script and `python -m meshpy`."""
    args = _parser().parse_args(argv)
    verbosity = args.verbose + (1 if args.command in _SERVERS else 0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from meshpy import _native

    _native.init_logging(logging.getLevelName(level).lower())
    try:
        if args.command == "generate":
            from meshpy.cli.generate import run_generate

            return run_generate(from_namespace(GenerateSettings, args))
        if args.command == "serve":
            from meshpy.cli.serve import run_serve

            return run_serve(from_namespace(ServeSettings, args))
        if args.command in ("bootstrap", "worker", "status"):
            from meshpy.cli import mesh

            runner, cls = {
                "bootstrap": (mesh.run_bootstrap, BootstrapSettings),
                "worker": (mesh.run_worker, WorkerSettings),
                "status": (mesh.run_status, StatusSettings),
            }[args.command]
            return runner(from_namespace(cls, args))  # type: ignore[operator]
    except MeshpyError as exc:
        print(f"meshpy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1
