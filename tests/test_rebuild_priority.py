"""A live rebuild's process runs below the server's priority (IndexConfig.rebuild_niceness):
on a busy node its k-means and fill weigh less against the checks. And it ends with its
server: killed -9 mid-rebuild, the server leaves no orphan building on (holding its snapshot
of the store and a core beside the next server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dedup import FaceGenerator, StoreConfig
from dedup.cli.main import build_parser
from dedup.cli.serve import server_config
from dedup.core.records import Registration
from dedup.core.settings import IndexConfig
from dedup.gallery.embedded import rebuild, rebuilder
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.store import Store


def _store_of(data_dir: Path, count: int) -> StoreConfig:
    config = StoreConfig(data_dir=data_dir)
    store = Store(config)
    store.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), vector)
                       for i, vector in enumerate(FaceGenerator(seed=5).persons(count))])
    store.close()
    return config


def _thread_niceness(pid: int) -> list[int]:
    """The niceness of each of the process's threads (field 19 of /proc/PID/task/TID/stat);
    a thread that ended between the listing and its reading is left out (CI once met one)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


@pytest.mark.parametrize("niceness", [10, 0])
def test_a_live_rebuilds_process_runs_at_the_configured_niceness(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, niceness: int) -> None:
    config = _store_of(tmp_path / "data", 3000)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    children: list[int] = []
    lower = rebuild._lower_priority

    def recording(child: Any, value: int) -> None:
        children.append(child.pid)
        lower(child, value)

    monkeypatch.setattr(rebuild, "_lower_priority", recording)
    seen: list[list[int]] = []

    def progress(phase: str, done: int, total: int) -> None:
        # The child is not joined before build_in_child returns: its /proc entry is there.
        if phase == "adding" and done == total:
            seen.append(_thread_niceness(children[0]))

    covered = rebuild.build_in_child(config, "BinarySign512", "m", None,
                                     tmp_path / "side.ckpt", progress,
                                     cancelled=lambda: False, poll_s=0.05, niceness=niceness)
    assert covered > 0 and (tmp_path / "side.ckpt").exists()
    assert seen and seen[0], "the rebuild's threads were looked at while it ran"
    assert set(seen[0]) == {min(19, ours + niceness)}  # every thread of it
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the server's own is unchanged


def test_serve_takes_the_rebuild_niceness_and_refuses_one_out_of_range() -> None:
    parser = build_parser()
    assert server_config(parser.parse_args(["serve"])).index.rebuild_niceness == 0
    config = server_config(parser.parse_args(["serve", "--rebuild-niceness", "5"]))
    assert config.index.rebuild_niceness == 5
    with pytest.raises(ValueError, match=r"rebuild_niceness must be within 0\.\.19, got 20"):
        server_config(parser.parse_args(["serve", "--rebuild-niceness", "20"]))


@pytest.mark.parametrize("niceness", [10, 0])
def test_the_server_loads_a_rebuilt_index_below_its_checks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, niceness: int) -> None:
    """Reading, checking and parsing the side file (~1.5 s of one core at 10,000,000) runs
    in a thread at the rebuild's niceness, not at the checks' priority; the server's own
    threads keep theirs."""
    people = FaceGenerator(seed=8).persons(600)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "m",
                              IndexConfig(index_factory="Flat", rebuild_niceness=niceness),
                              background=False)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    loads: list[tuple[int, int]] = []
    real = rebuilder.load_index

    def recording(*args: Any) -> Any:
        loads.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0)))
        return real(*args)

    monkeypatch.setattr(rebuilder, "load_index", recording)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), people[i])
                             for i in range(600)])
        gallery.rebuild("BinarySign512", lambda phase, done, total: None)
        assert gallery.index.kind == "BinarySign512"
    finally:
        gallery.close(checkpoint=False)
    assert len(loads) == 1
    thread, seen = loads[0]
    assert seen == min(19, ours + niceness)
    assert (thread != threading.get_native_id()) == (niceness > 0)  # 0: no thread needed
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours


_SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dedup.core.settings import StoreConfig
    from dedup.gallery.embedded import rebuild

    def progress(phase, done, total):
        if not progress.told:  # the child's first message: it runs its build
            progress.told = True
            children = rebuild.multiprocessing.active_children()
            print(children[0].pid, flush=True)
    progress.told = False

    rebuild.build_in_child(StoreConfig(data_dir=Path(sys.argv[1])), "BinarySign512", "m",
                           None, Path(sys.argv[2]), progress, cancelled=lambda: False)
""")


def _state(pid: int) -> str:
    """The process's state letter (R, S, T stopped, Z); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_a_rebuilds_process_dies_with_its_server(tmp_path: Path) -> None:
    config = _store_of(tmp_path / "data", 20_000)
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(config.data_dir),
                               str(tmp_path / "side.ckpt")], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        # Stopped, so that it cannot end on its own first (a small build takes seconds).
        os.kill(child, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while _state(child) != "T" and time.monotonic() < deadline:
            time.sleep(0.002)
        assert _state(child) == "T", "the build was still running when it was stopped"
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
