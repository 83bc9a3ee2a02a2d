"""A live rebuild's process is stopped for moments while the checks beside it run slower than
their budget (IndexConfig.rebuild_check_budget, gallery/embedded/rebuild_pace.py): real
processes, stopped and continued by real signals."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import check, enroll

from dedup import FaceGenerator, StoreConfig
from dedup.cli.main import build_parser
from dedup.cli.serve import server_config
from dedup.core.latency import RecentLatencies
from dedup.core.records import Registration
from dedup.core.settings import IndexConfig
from dedup.gallery.embedded import rebuild
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.rebuild_pace import (
    BEFORE_S,
    FEWEST_BEFORE,
    MOST_PAUSED,
    TICK_S,
    RebuildPacer,
)
from dedup.gallery.embedded.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _state(pid: int) -> str:
    """The process's state letter: R, S, T (stopped), Z; "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _stopped(pid: int, wanted: bool = True) -> bool:
    """Whether the process is (`wanted`) stopped or not, waiting up to 5 s for a signal
    just sent to take effect."""
    deadline = time.monotonic() + 5
    while (_state(pid) == "T") != wanted and time.monotonic() < deadline:
        time.sleep(0.002)
    return (_state(pid) == "T") == wanted


@pytest.fixture
def sleeper() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def _checks(clock: Clock, seconds: float, count: int, took: float,
            latencies: RecentLatencies) -> None:
    """`count` checks of `took` s each, ending evenly over the next `seconds`."""
    for _ in range(count):
        clock.now += seconds / count
        latencies.add(took)


def _paced(clock: Clock, before: int = 900, budget: float = 1.5
           ) -> tuple[RecentLatencies, RebuildPacer]:
    """A pacer started after `before` checks of 10 ms, 30 a second."""
    latencies = RecentLatencies(clock=clock)
    _checks(clock, before / 30, before, 0.010, latencies)
    pacer = RebuildPacer(latencies, budget)
    pacer.start()
    clock.now += 0.01  # the checks before out of the next second's window
    return latencies, pacer


def test_a_rebuild_is_stopped_while_checks_run_over_budget_and_continued_after(
        sleeper: int) -> None:
    clock = Clock()
    latencies, pacer = _paced(clock)
    assert pacer.limit_s == pytest.approx(0.015)
    _checks(clock, 1.0, 50, 0.014, latencies)  # within 1.5x the 10 ms before
    pacer.pace(sleeper)
    assert _stopped(sleeper, False) and pacer.pauses == 0
    _checks(clock, 1.0, 50, 0.020, latencies)  # 2x
    pacer.pace(sleeper)
    assert _stopped(sleeper) and pacer.pauses == 1
    _checks(clock, 1.0, 50, 0.012, latencies)  # back within it
    pacer.pace(sleeper)
    assert _stopped(sleeper, False)
    assert pacer.paused_s == pytest.approx(1.0)


def test_a_rebuild_is_never_stopped_more_than_half_the_time(sleeper: int) -> None:
    clock = Clock()
    latencies, pacer = _paced(clock)
    started = clock.now
    for _ in range(200):  # checks slow throughout, 50 s
        _checks(clock, TICK_S, 10, 0.050, latencies)
        pacer.pace(sleeper)
    pacer.resume(sleeper)
    assert _stopped(sleeper, False)
    elapsed = clock.now - started
    assert pacer.pauses >= 40  # stopped again as soon as it may
    assert MOST_PAUSED * elapsed - 2 * TICK_S <= pacer.paused_s <= MOST_PAUSED * elapsed + TICK_S


@pytest.mark.parametrize("before, budget, now", [
    (FEWEST_BEFORE - 1, 1.5, 50),  # too few checks before: nothing to hold them to
    (900, 0.0, 50),  # no budget: niceness alone
    (900, 1.5, 19),  # too few in the last second to judge
])
def test_a_rebuild_runs_on_when_the_checks_say_nothing(
        sleeper: int, before: int, budget: float, now: int) -> None:
    clock = Clock()
    latencies, pacer = _paced(clock, before, budget)
    _checks(clock, 1.0, now, 0.100, latencies)
    pacer.pace(sleeper)
    assert _state(sleeper) not in ("T", "") and pacer.pauses == 0


def test_the_budget_is_measured_on_the_minute_before_only() -> None:
    clock = Clock()
    latencies = RecentLatencies(clock=clock)
    _checks(clock, 10.0, 500, 1.0, latencies)  # long ago
    clock.now += BEFORE_S
    _checks(clock, 30.0, 900, 0.010, latencies)
    pacer = RebuildPacer(latencies, 2.0)
    pacer.start()
    assert pacer.limit_s == pytest.approx(0.020)


def test_a_cold_starts_slow_seconds_before_the_rebuild_do_not_raise_its_budget() -> None:
    """Within the minute before: 20 s of checks taking 10x longer (a page cache still
    cold), then 30 s of usual ones. Over all 50 s together the p90 would be 100 ms."""
    clock = Clock()
    latencies = RecentLatencies(clock=clock)
    _checks(clock, 20.0, 600, 0.100, latencies)
    _checks(clock, 30.0, 900, 0.010, latencies)
    assert latencies.quantile(0.9, since=clock.now - BEFORE_S)[0] == pytest.approx(0.100)
    pacer = RebuildPacer(latencies, 1.5)
    pacer.start()
    assert pacer.limit_s == pytest.approx(0.015)


def _store_of(data_dir: Path, count: int) -> StoreConfig:
    config = StoreConfig(data_dir=data_dir)
    store = Store(config)
    store.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), vector)
                       for i, vector in enumerate(FaceGenerator(seed=5).persons(count))])
    store.close()
    return config


class SlowChecks:
    """Checks of `took` s recorded 100 a second on the real clock, in a thread."""

    def __init__(self, latencies: RecentLatencies, took: float) -> None:
        self.latencies, self.took = latencies, took
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            self.latencies.add(self.took)

    def __enter__(self) -> SlowChecks:
        for _ in range(FEWEST_BEFORE):
            self.latencies.add(0.010)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def test_a_live_rebuild_is_paced_by_the_checks_and_still_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _store_of(tmp_path / "data", 3000)
    children: list[int] = []
    lower = rebuild._lower_priority

    def recording(child: Any, value: int) -> None:
        children.append(child.pid)
        lower(child, value)

    monkeypatch.setattr(rebuild, "_lower_priority", recording)
    latencies = RecentLatencies()
    pacer = RebuildPacer(latencies, 1.5)
    states: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            if children:
                states.add(_state(children[0]))

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.monotonic()
    with SlowChecks(latencies, 0.050):
        watcher.start()
        try:
            covered = rebuild.build_in_child(config, "BinarySign512", "m", None,
                                             tmp_path / "side.ckpt", lambda *a: None,
                                             cancelled=lambda: False, pacer=pacer)
        finally:
            done.set()
            watcher.join()
    took = time.monotonic() - started
    assert covered > 0 and (tmp_path / "side.ckpt").exists()
    assert "T" in states and pacer.pauses >= 1
    assert pacer.paused_s <= MOST_PAUSED * took + TICK_S


def test_a_gallery_paces_its_live_rebuild_by_the_servers_checks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    people = FaceGenerator(seed=8).persons(600)
    latencies = RecentLatencies()
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "m",
                              IndexConfig(index_factory="Flat", rebuild_check_budget=1.5),
                              background=False, check_latencies=latencies)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), people[i])
                             for i in range(600)])
        with SlowChecks(latencies, 0.050), caplog.at_level(logging.INFO, "dedup.gallery"):
            gallery.rebuild("BinarySign512", lambda phase, done, total: None)
        assert gallery.index.kind == "BinarySign512"
    finally:
        gallery.close(checkpoint=False)
    paced = [r.getMessage() for r in caplog.records if "rebuild paced" in r.getMessage()]
    assert paced and "holding checks' p90 to 15.0 ms" in paced[0]
    assert int(paced[0].split("stopped ")[1].split()[0]) >= 1


_KILLED_WHILE_STOPPED = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from dedup.core.latency import RecentLatencies
    from dedup.core.settings import StoreConfig
    from dedup.gallery.embedded import rebuild
    from dedup.gallery.embedded.rebuild_pace import RebuildPacer

    latencies = RecentLatencies()
    for _ in range(300):
        latencies.add(0.010)

    def slow():
        while True:
            latencies.add(1.0)
            time.sleep(0.01)

    def report():
        while not rebuild.multiprocessing.active_children():
            time.sleep(0.01)
        print(rebuild.multiprocessing.active_children()[0].pid, flush=True)

    threading.Thread(target=slow, daemon=True).start()
    threading.Thread(target=report, daemon=True).start()
    rebuild.build_in_child(StoreConfig(data_dir=Path(sys.argv[1])), "BinarySign512", "m",
                           None, Path(sys.argv[2]), lambda *a: None, cancelled=lambda: False,
                           pacer=RebuildPacer(latencies, 1.5))
""")


def test_a_rebuild_stopped_by_its_pacer_dies_with_the_server(tmp_path: Path) -> None:
    """A stopped orphan would hold its snapshot of the store (and its pages) forever."""
    config = _store_of(tmp_path / "data", 3000)
    server = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_STOPPED,
                               str(config.data_dir), str(tmp_path / "side.ckpt")],
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        deadline = time.monotonic() + 30
        while _state(child) != "T" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _state(child) == "T", "the pacer stopped the rebuild's process"
        server.kill()
        server.wait()
        deadline = time.monotonic() + 10
        while _state(child) not in ("", "Z") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(child) in ("", "Z"), "the rebuild's process outlived its server"
    finally:
        server.kill()
        server.wait()
        if child and _state(child) not in ("", "Z"):
            os.kill(child, signal.SIGKILL)


def test_serve_takes_the_rebuild_check_budget_and_refuses_one_out_of_range() -> None:
    parser = build_parser()
    config = server_config(parser.parse_args(["serve", "--rebuild-check-budget", "1.8"]))
    assert config.index.rebuild_check_budget == 1.8
    assert server_config(parser.parse_args(
        ["serve", "--rebuild-check-budget", "0"])).index.rebuild_check_budget == 0
    with pytest.raises(ValueError, match=r"rebuild_check_budget must be 0 or within 1\.\.100, "
                                         r"got 0\.5"):
        server_config(parser.parse_args(["serve", "--rebuild-check-budget", "0.5"]))


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_servers_checks_are_what_its_rebuilds_are_paced_by(
        server: Any, faces: FaceGenerator, backend: str) -> None:
    people = faces.persons(3)
    enroll(server.stub, "r0", "ID0", people[0])
    check(server.stub, people[1])
    check(server.stub, people[2])
    recorded = server.server.metrics.checks
    assert recorded.quantile(0.5, since=0.0)[1] == 2  # the Checks, not the Enroll
    assert server.server.service.gallery._rebuilder.check_latencies is recorded
