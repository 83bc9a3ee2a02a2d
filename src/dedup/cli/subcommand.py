"""How a `dedup` subcommand is declared: its one-line summary, a description and examples for
its --help, and the function that runs it."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from typing import TypeAlias

# What a subcommand runs: the parsed arguments in, the exit status out.
Command = Callable[[argparse.Namespace], int]
# What `add_subparsers()` returns (a quoted alias: the class is not subscriptable at run time).
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_subcommand(commands: Subcommands, name: str, summary: str, description: str,
                   examples: Sequence[str], command: Command | None = None
                   ) -> argparse.ArgumentParser:
    """`description`: a paragraph, wrapped as it is to be shown (a triple-quoted string,
    its indentation removed); each of `examples`: one command line shown under "example:"."""
    heading = "example:" if len(examples) == 1 else "examples:"
    parser = commands.add_parser(
        name, help=summary, description=inspect.cleandoc(description),
        epilog="\n".join([heading, *(f"  {line}" for line in examples)]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if command is not None:
        parser.set_defaults(command=command)
    return parser
