"""The `meshpy` command. Each subcommand parses its settings and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshpy.errors import MeshpyError
from meshpy.settings import GenerateSettings, add_arguments, from_namespace

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpy", description="Peer-to-peer, pipeline-parallel LLM inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt", description=GenerateSettings.__doc__)
    add_arguments(gen, GenerateSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meshpy` script and `python -m meshpy`."""
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            from meshpy.cli.generate import run_generate

            return run_generate(from_namespace(GenerateSettings, args))
    except MeshpyError as exc:
        print(f"meshpy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1
