"""A live rebuild's process runs below the server's priority (IndexConfig.rebuild_niceness):
on a busy node its k-means and fill take only what CPU the checks leave."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from dedup import FaceGenerator, StoreConfig
from dedup.cli.main import build_parser
from dedup.cli.serve import server_config
from dedup.core.records import Registration
from dedup.gallery.embedded.rebuild import build_in_child
from dedup.gallery.embedded.store import Store


def _store_of(data_dir: Path, count: int) -> StoreConfig:
    config = StoreConfig(data_dir=data_dir)
    store = Store(config)
    store.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), vector)
                       for i, vector in enumerate(FaceGenerator(seed=5).persons(count))])
    store.close()
    return config


def _niceness_of_rebuild_children(stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        for child in multiprocessing.active_children():
            if child.name == "dedup-rebuild" and child.pid is not None:
                with contextlib.suppress(OSError):  # gone between the listing and the look
                    seen.append(os.getpriority(os.PRIO_PROCESS, child.pid))
        stop.wait(0.002)


@pytest.mark.parametrize("niceness", [10, 0])
def test_a_live_rebuilds_process_runs_at_the_configured_niceness(tmp_path: Path,
                                                                 niceness: int) -> None:
    config = _store_of(tmp_path / "data", 3000)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(target=_niceness_of_rebuild_children, args=(stop, seen))
    watcher.start()
    try:
        covered = build_in_child(config, "BinarySign512", "m", None, tmp_path / "side.ckpt",
                                 lambda *_: None, cancelled=lambda: False, poll_s=0.05,
                                 niceness=niceness)
    finally:
        stop.set()
        watcher.join()
    assert covered > 0 and (tmp_path / "side.ckpt").exists()
    assert seen, "the rebuild's process was seen while it ran"
    assert max(seen) == min(19, ours + niceness)
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the server's own is unchanged


def test_serve_takes_the_rebuild_niceness_and_refuses_one_out_of_range() -> None:
    parser = build_parser()
    assert server_config(parser.parse_args(["serve"])).index.rebuild_niceness == 10
    config = server_config(parser.parse_args(["serve", "--rebuild-niceness", "0"]))
    assert config.index.rebuild_niceness == 0
    with pytest.raises(ValueError, match=r"rebuild_niceness must be within 0\.\.19, got 20"):
        server_config(parser.parse_args(["serve", "--rebuild-niceness", "20"]))
