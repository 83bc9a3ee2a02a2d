"""The `dedup` command: run the server, talk to a running one, or run the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import grpc

from dedup.cli import (
    accuracy,
    audit,
    client,
    console,
    data,
    investigate,
    keys,
    milvus,
    quality,
    serve,
    upgrade,
)
from dedup.cli.subcommand import Command, Subcommands
from dedup.core.errors import DedupError
from dedup.core.logs import configure_logging

DESCRIPTION = "The `dedup` command: run the server, talk to a running one, or run the demo."
# Each group's register() adds its subcommands, in the order `dedup --help` lists them.
COMMAND_GROUPS: tuple[Callable[[Subcommands], None], ...] = (
    serve.register, client.register, data.register, keys.register, audit.register,
    upgrade.register,
    investigate.register, console.register, accuracy.register, quality.register, milvus.register)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_format == "json")
    command: Command = args.command
    try:
        return command(args)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (DedupError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dedup", description=DESCRIPTION)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object a line, with request ids")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
