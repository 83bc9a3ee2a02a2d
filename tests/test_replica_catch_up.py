"""A read replica's catch-up with the primary's change log (ReplicaGallery._catch_up), in
this process, the primary's writes made by another."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dedup import FaceGenerator, StoreConfig
from dedup.core.errors import CheckpointError, NotServedHere
from dedup.core.records import Registration
from dedup.core.settings import IndexConfig
from dedup.gallery.embedded import replay
from dedup.gallery.embedded import replica as replica_module
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.replica import ReplicaGallery

MODEL = "model-a"

# The primary's enrolments, from a process of its own (LMDB allows one environment a
# process): registrations late0..late{n-1}, faces FaceGenerator(seed).persons(n).
ENROL = """
import sys
import threading
from pathlib import Path
from dedup import FaceGenerator, StoreConfig
from dedup.core.errors import CheckpointError, NotServedHere
from dedup.core.records import Registration
from dedup.gallery.embedded.store import Store
data_dir, seed, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = Store(StoreConfig(data_dir=data_dir, check_on_open=False))
faces = FaceGenerator(seed).persons(n)
store.insert_many([(Registration(f"late{i}", f"ID-late{i}", embedding_model="model-a"),
                    faces[i]) for i in range(n)])
store.close()
"""


def _a_replica_of_twenty(tmp_path, seed: int
                         ) -> tuple[StoreConfig, np.ndarray, ReplicaGallery]:
    """A primary's data directory with r0..r19 (ID0..ID19, faces FaceGenerator(seed)) and
    its checkpoint, the primary closed; and a replica of it, not open yet, whose follower
    waits an hour (the test runs follow_once itself)."""
    config = StoreConfig(data_dir=tmp_path / "data", check_on_open=False)
    primary = EmbeddedGallery(config, MODEL)
    people = FaceGenerator(seed).persons(20)
    primary.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(20)])
    primary.checkpoint()
    primary.close(checkpoint=False)
    return config, people, ReplicaGallery(config, MODEL, IndexConfig(), follow_s=3600)


def test_a_catch_up_that_fails_partway_adds_nothing_twice(tmp_path, monkeypatch):
    """Three enrolments are replayed in chunks of two; the second chunk's add fails (no
    memory). The next catch-up used to replay the delta again from the start: the first
    chunk's rows twice in the replica's index. Now the replica's checks go to the primary
    (NotServedHere) until its follower has loaded the index again, from the checkpoint and
    the log; a load that fails too is tried again later, checks still relayed meanwhile."""
    monkeypatch.setattr(replica_module, "_RELOAD_FIRST_S", 1.0)
    config, _, replica = _a_replica_of_twenty(tmp_path, 1)
    try:
        replica.open()
        subprocess.run([sys.executable, "-c", ENROL, str(config.data_dir), "7", "3"],
                       check=True)
        monkeypatch.setattr(replay, "REPLAY_BATCH", 2)
        index = replica._live.index
        real_add, adds = index.add, []

        def fails_second(keys, vectors):
            adds.append(len(keys))
            if len(adds) == 2:
                raise MemoryError("injected: the second chunk")
            return real_add(keys, vectors)

        monkeypatch.setattr(index, "add", fails_second)
        late = FaceGenerator(7).persons(3)
        with pytest.raises(NotServedHere, match="failed partway"):
            replica.neighbours(late[0], 10, 0.5)  # the primary answers it
        assert not replica.serving  # the next checks go there before the face model runs
        real_load, loads = replica_module.load_index, []

        def load_fails_first(*args, **kwargs):
            loads.append(time.monotonic())
            if len(loads) == 1:
                raise MemoryError("injected: the first load")
            return real_load(*args, **kwargs)

        monkeypatch.setattr(replica_module, "load_index", load_fails_first)
        with pytest.raises(MemoryError, match="first load"):
            replica.follow_once()
        replica.follow_once()  # too soon to try again
        assert len(loads) == 1
        with pytest.raises(NotServedHere, match="loaded again"):
            replica.neighbours(late[0], 10, 0.5)
        time.sleep(1.05)
        replica.follow_once()
        assert len(loads) == 2 and replica.serving
        found = replica.neighbours(late[0], 10, 0.5)
        assert len(found) == 1, found
        assert len(replica._live.index) == 23  # 25 before: late0 and late1 twice
        assert replica.covered == replica._store.sequence()
    finally:
        replica.close()


def test_a_compaction_never_waits_for_the_replicas_reload(tmp_path, monkeypatch):
    """The reload reads the checkpoint without holding the store: the primary's release of
    the replicas around a compaction's swap goes on while it reads (a release waiting for
    it held every check on the replica, and got the replica killed after 30 s). A reload
    that finds the store released tries again, and serves once reopened."""
    _, people, replica = _a_replica_of_twenty(tmp_path, 2)
    try:
        replica.open()
        replica._partly_caught_up = True  # as a catch-up failing partway leaves it
        reading, go_on = threading.Event(), threading.Event()
        real_load = replica_module.load_index

        def slow_load(*args, **kwargs):
            reading.set()
            go_on.wait(30)
            return real_load(*args, **kwargs)

        monkeypatch.setattr(replica_module, "load_index", slow_load)
        follower = threading.Thread(target=replica.follow_once)
        follower.start()
        assert reading.wait(10)
        released = threading.Thread(target=replica.release)
        released.start()
        released.join(timeout=5)
        released_in_time = not released.is_alive()
        go_on.set()
        follower.join(timeout=30)
        released.join(timeout=30)
        assert released_in_time, "the release waited for the checkpoint's read"
        assert not replica.serving
        replica.open()
        replica.follow_once()
        assert replica.serving and len(replica._live.index) == 20
        assert [found.key for found in replica.neighbours(people[3], 10, 0.5)] == [4]
    finally:
        replica.close()


def test_a_reload_waits_for_a_usable_checkpoint_rather_than_build(tmp_path, monkeypatch):
    """Where the primary's checkpoint is unusable the reload does not build the index from
    the store (minutes at 10,000,000, holding the store, and a compaction's release with
    it): the primary answers the checks until a usable checkpoint is there."""
    monkeypatch.setattr(replica_module, "_RELOAD_FIRST_S", 0.1)
    _, _, replica = _a_replica_of_twenty(tmp_path, 3)
    checkpoint = replica.checkpoint_path
    good = checkpoint.read_bytes()
    try:
        replica.open()
        replica._partly_caught_up = True  # as a catch-up failing partway leaves it
        checkpoint.write_bytes(good[: len(good) // 2])  # cut short
        with pytest.raises(CheckpointError):
            replica.follow_once()
        assert not replica.serving
        checkpoint.write_bytes(good)
        time.sleep(0.15)
        replica.follow_once()
        assert replica.serving and len(replica._live.index) == 20
    finally:
        replica.close()
