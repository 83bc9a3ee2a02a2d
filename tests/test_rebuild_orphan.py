"""A live rebuild's process ends with its server: killed -9 mid-rebuild, the server leaves no
orphan building on (holding its snapshot of the store and a core beside the next server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dedup import FaceGenerator, StoreConfig
from dedup.core.records import Registration
from dedup.gallery.embedded.store import Store

_SERVER = textwrap.dedent("""
    import os, sys
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


def _store_of(data_dir: Path, count: int) -> StoreConfig:
    config = StoreConfig(data_dir=data_dir)
    store = Store(config)
    store.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), vector)
                       for i, vector in enumerate(FaceGenerator(seed=5).persons(count))])
    store.close()
    return config


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
