"""A live rebuild's process runs below the server's priority (IndexConfig.rebuild_niceness):
on a busy node its k-means and fill weigh less against the checks."""

from __future__ import annotations

import os
import threading
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
