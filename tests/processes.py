"""`dedup serve` as a child process, for tests that kill it or send it signals."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path


class ServerProcess:
    """A started `dedup serve`; `lines` collects its stderr as it comes. One a test leaves
    running (it failed before stopping it) is killed at the test's end (conftest.py)."""

    def __init__(self, data_dir: Path, *serve_args: str, log_format: str = "text") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dedup", "--log-format", log_format, "serve",
             "--data-dir", str(data_dir), "--address", "127.0.0.1:0", *serve_args],
            stderr=subprocess.PIPE, text=True)
        STARTED.append(self)
        self.lines: list[str] = []
        self.port = self._wait_for_port()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _wait_for_port(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := re.search(r"serving on 127\.0\.0\.1:(\d+)", line):
                return int(match.group(1))
        raise AssertionError(f"server did not start (exit code {self.process.wait()}):\n"
                             + "".join(self.lines))

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait(self, timeout: float = 60) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Say what it was doing: py-spy is not at hand, its log is.
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"dedup serve did not exit within {timeout} s; its log:\n"
                                 + "".join(self.lines[-40:])) from None
        self._reader.join(timeout=10)
        return code


STARTED: list[ServerProcess] = []


def kill_leftovers(since: int = 0) -> list[int]:
    """Kills the servers started after the first `since` of STARTED that still run (a
    module's shared server is started before its tests' marks); their pids."""
    left = [server.process for server in STARTED[since:] if server.process.poll() is None]
    del STARTED[since:]
    for process in left:
        process.kill()
        process.wait(10)
    return [process.pid for process in left]
