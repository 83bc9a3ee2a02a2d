"""Every `dedup` subcommand's --help says what it does and shows an example."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from dedup.cli.main import build_parser


def subcommands(parser: argparse.ArgumentParser, path: str = "dedup"
                ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{path} {name}", child
                yield from subcommands(child, f"{path} {name}")


ALL = dict(subcommands(build_parser()))


def test_every_command_is_walked():
    assert {"dedup serve", "dedup evaluate", "dedup calibrate", "dedup audit",
            "dedup audit verify", "dedup audit export", "dedup migrate"} <= set(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_help_has_a_description_and_an_example(name):
    parser = ALL[name]
    text = parser.format_help()
    assert parser.description and parser.description.strip()
    assert parser.description.strip() in text
    assert text.strip() != parser.format_usage().strip()
    assert "example" in text


def test_evaluate_help_says_what_it_computes_and_writes():
    text = ALL["dedup evaluate"].format_help()
    for fact in ("FNIR", "FPIR", "rank-1", "rank-10", "det.png", "DET plot", "scores.png",
                 "histograms", "evaluation.json", "quality band", "quality.png",
                 "bands are skipped"):
        assert fact in text, fact


def test_calibrate_help_gives_the_threshold_arithmetic():
    text = ALL["dedup calibrate"].format_help()
    for fact in ("FPIR(N,T) = 1-(1-FMR(T))^N", "normal distribution", "calibration.json",
                 "mean + sd * z(1-FMR*)"):
        assert fact in text, fact
