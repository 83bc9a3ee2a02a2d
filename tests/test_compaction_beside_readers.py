"""A compaction while another process has the store open read-only (`dedup doctor`,
`dedup backup`, a live rebuild's child) loses no acknowledged write: every registration
committed while the store was copied or after the swap is there when it is opened again.
Before the fix LMDB kept the old file's transaction id in the shared lock file and the
writer built on the wrong meta page of the compacted file."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
import pytest

from dedup.core.errors import StoreError
from dedup.core.records import DeleteKey, Registration
from dedup.core.settings import StoreConfig
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded.layout import DATA_FILE, store_dir
from dedup.gallery.embedded.lmdb_env import claim_new_lock_file
from dedup.gallery.embedded.store import Store

# Opens the store as the tools do, reads it, says so, and keeps it open until stdin closes.
READER = """
import sys
from pathlib import Path
from dedup.gallery.embedded.store import Store
store = Store.reader(Path(sys.argv[1]))
print(store.count(), flush=True)
sys.stdin.read()
store.close()
"""


class ReaderProcess:
    """A separate process holding the store open read-only, as a tool would."""

    def __init__(self, data_dir: Path, wait: bool = True) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", READER, str(data_dir)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        if wait:
            self.count_seen = self.count(timeout=60)

    def count(self, timeout: float) -> int:
        """The count it read, once it opened the store; AssertionError if not in time."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, "the reader did not open the store in time"
        self.count_seen = int(self.process.stdout.readline())
        return self.count_seen

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


def registrations(prefix: str, count: int, rng: np.random.Generator
                  ) -> list[tuple[Registration, np.ndarray]]:
    vectors = normalize_rows(rng.standard_normal((count, 512), dtype=np.float32))
    return [(Registration(registration_id=f"{prefix}-{i}", id_number=f"ID-{prefix}-{i}"),
             vectors[i]) for i in range(count)]


def committed_ids(store: Store, batches: int, rng: np.random.Generator) -> list[str]:
    """Writes `batches` batches, one transaction each; the ids each acknowledged write holds."""
    acknowledged = []
    for batch in range(batches):
        written = registrations(f"after{batch}", 3, rng)
        store.insert_many(written)
        acknowledged += [registration.registration_id for registration, _ in written]
    return acknowledged


def write_during_the_copy(store: Store, rng: np.random.Generator) -> list[str]:
    """Has one registration committed after the compaction's copy and before its catch-up
    (through the hook that releases read replicas there); returns its id once it is."""
    written = registrations("during", 1, rng)
    committed: list[str] = []

    @contextmanager
    def enrol() -> Iterator[None]:
        store.insert_many(written)
        committed.append(written[0][0].registration_id)
        yield

    store.share_with_replicas(enrol, lambda: None)
    return committed


# The old store's transaction ids below and above the compacted copy's (about 14 here), of both
# parities: LMDB picks a meta page by the parity of the id it keeps in its lock file.
@pytest.mark.parametrize("before", [1, 2, 12, 13])
@pytest.mark.parametrize("batches", range(1, 7))
def test_writes_after_a_compaction_beside_a_reader_are_kept(tmp_path, before, batches):
    rng = np.random.default_rng(batches * 100 + before)
    config = StoreConfig(data_dir=tmp_path / "data", check_on_open=False)
    store = Store(config)
    for batch in range(before):
        store.insert_many(registrations(f"before{batch}", 20, rng))
    reader = ReaderProcess(config.data_dir)
    assert reader.count_seen == 20 * before
    try:
        during = write_during_the_copy(store, rng)
        store.compact()
        assert during, "the registration meant for the copy's time was not written"
        acknowledged = during + committed_ids(store, batches, rng)
        missing_live = [rid for rid in acknowledged if store.get(rid) is None]
        store.close()
    finally:
        reader.stop()
    assert not missing_live, f"the writer itself no longer sees {missing_live}"

    reopened = Store(config)
    try:
        missing = [rid for rid in acknowledged if reopened.get(rid) is None]
        assert not missing, f"acknowledged, then lost on reopening: {missing}"
        assert reopened.count() == 20 * before + 1 + 3 * batches
    finally:
        reopened.close()


def test_a_reader_open_across_the_compaction_keeps_reading(tmp_path):
    """The reader keeps its snapshot (the store as it was before the swap) and exits
    cleanly; a reader opened after the swap sees every write since."""
    rng = np.random.default_rng(1)
    config = StoreConfig(data_dir=tmp_path / "data", check_on_open=False)
    store = Store(config)
    store.insert_many(registrations("before", 20, rng))
    early = ReaderProcess(config.data_dir)
    try:
        store.compact()
        committed_ids(store, 2, rng)
        late = ReaderProcess(config.data_dir)
        late.stop()
        assert late.count_seen == 26
    finally:
        early.stop()
        store.close()


def test_a_process_opening_the_store_during_the_swap_waits_for_the_new_lock_file(tmp_path):
    """Between the swap of the lock file and the writer's reopening, an opener waits (it
    would otherwise initialise the new lock file from the old data file)."""
    rng = np.random.default_rng(2)
    config = StoreConfig(data_dir=tmp_path / "data", check_on_open=False)
    store = Store(config)
    store.insert_many(registrations("before", 20, rng))
    store.close()
    claim = claim_new_lock_file(store_dir(config.data_dir))
    try:
        opener = ReaderProcess(config.data_dir, wait=False)
        with pytest.raises(AssertionError, match="in time"):
            opener.count(timeout=1.5)
        store = Store(config)  # as replace_data_file reopens: initialises the lock file
        try:
            store.insert_many(registrations("after", 3, rng))
            assert opener.count(timeout=60) in (20, 23)
            opener.stop()
        finally:
            store.close()
    finally:
        os.close(claim)


def an_old_copy_put_in_place_beside_a_reader(tmp_path: Path) -> tuple[StoreConfig,
                                                                         ReaderProcess]:
    """A store whose data file was replaced by hand (an old copy) while a tool has it open,
    and that tool (to be stopped)."""
    rng = np.random.default_rng(3)
    config = StoreConfig(data_dir=tmp_path / "data", check_on_open=False)
    store = Store(config)
    store.insert_many(registrations("before", 20, rng))
    store.close()
    old_copy = tmp_path / "copy"
    old_copy.mkdir()
    env = lmdb.open(str(store_dir(config.data_dir)), readonly=True, max_dbs=16)
    env.copy(str(old_copy), compact=True)
    env.close()
    store = Store(config)
    store.insert_many(registrations("after", 3, rng))
    store.close()
    reader = ReaderProcess(config.data_dir)
    (old_copy / DATA_FILE).replace(store_dir(config.data_dir) / DATA_FILE)
    return config, reader


def test_the_writer_refuses_a_lock_file_older_than_its_data_file(tmp_path):
    """Opening it for writing is refused, rather than building on the wrong meta page."""
    config, reader = an_old_copy_put_in_place_beside_a_reader(tmp_path)
    try:
        with pytest.raises(StoreError, match=r"\(lock\.mdb\) is not the one of data\.mdb"
                           ".*writing beside it would lose commits"):
            Store(config)
    finally:
        reader.stop()
    reopened = Store(config)  # alone now: LMDB initialises the lock file from the data file
    try:
        assert reopened.count() == 20
    finally:
        reopened.close()


def test_a_reader_refuses_a_lock_file_that_stays_older_than_its_data_file(tmp_path):
    """A reader tries again (a compaction's swap passes quickly), then is refused: it would
    otherwise read an older state on pages the writer may reuse."""
    config, reader = an_old_copy_put_in_place_beside_a_reader(tmp_path)
    try:
        with pytest.raises(StoreError, match=r"\(lock\.mdb\) is not the one of data\.mdb"
                           ".*reading beside it could see pages the writer reuses"):
            Store.reader(config.data_dir)
    finally:
        reader.stop()


# A live rebuild's child (rebuild._child_main, as the server spawns it), paused once it holds
# its snapshot of the store until a line comes on stdin; prints its last message.
REBUILD_CHILD = """
import sys
from pathlib import Path
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded import rebuild

build = rebuild.build_from_snapshot
def paused(*args, **kwargs):
    print("holding a snapshot", flush=True)
    sys.stdin.readline()
    return build(*args, **kwargs)
rebuild.build_from_snapshot = paused

class Messages(list):
    put = list.append

messages = Messages()
config = StoreConfig(data_dir=Path(sys.argv[1]), check_on_open=False)
rebuild._child_main(config, "Flat", "", None, sys.argv[2], messages, 0.3)
print(repr(messages[-1]), flush=True)
"""


def test_a_rebuild_across_a_compaction_builds_not_reports_damage(tmp_path):
    """A registration erased after the swap is not in the data file the rebuild's child
    reads, so its zeroed slot looked like damage and the rebuild failed (StoreDamaged): now
    the child reads whether it is still stored in the current file, and leaves it out (the
    server applies the erasure after the child's snapshot anyway)."""
    rng = np.random.default_rng(3)
    config = StoreConfig(data_dir=tmp_path / "data", check_on_open=False)
    store = Store(config)
    store.insert_many(registrations("r", 30, rng))
    child = subprocess.Popen([sys.executable, "-c", REBUILD_CHILD, str(config.data_dir),
                              str(tmp_path / "side.ckpt")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "holding a snapshot"
        store.delete(DeleteKey.REGISTRATION_ID, "r-0")  # before the swap
        store.compact()
        store.delete(DeleteKey.REGISTRATION_ID, "r-29")  # after it
        child.stdin.write("go\n")
        child.stdin.flush()
        last = child.stdout.readline().strip()
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        store.close()
    assert last.startswith("('built', "), last
    assert last.endswith(", 28, '')"), last  # r-0 and r-29 left out
