"""Log set-up: lines go to the stderr of the moment, never to a stream that has been closed."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from dedup.core.logs import configure_logging


@pytest.fixture
def restored_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_line_logged_after_stderr_was_swapped_and_closed_reaches_the_new_stderr(
        restored_root_logger, monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", json_lines=False)
    first.close()  # what a test runner does with the stream it captured into
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("dedup.test").info("created the collection %s", "c1")
    assert "created the collection c1" in second.getvalue()
    assert "Logging error" not in second.getvalue()


def test_json_lines_carry_the_message(restored_root_logger, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", json_lines=True)
    logging.getLogger("dedup.test").warning("disk %s full", "d1")
    assert '"message": "disk d1 full"' in stream.getvalue()
