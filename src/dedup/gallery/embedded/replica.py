"""A read replica of the embedded gallery: the store opened read-only in a process of its
own beside the primary (the one writer), and an index of its own derived from it.

The index starts from the checkpoint the primary wrote and the change log after it, as the
primary's does (recovery.py). Before every search the replica reads the store's change
sequence and replays what it has not seen yet, under the index's change lock: a search never
misses a change committed before it began, in any process (read-your-writes). A follower
thread replays every `follow_s` too, so that a search rarely has more than a few changes to
apply, and `pin` reports the change the index covers: the primary keeps the log from there
on (Store.replica_floor). Should the log not reach back that far anyway, the checkpoint is
loaded again. When the primary checkpoints another index type than the replica's (an
automatic switch, a rebuild), the replica loads that checkpoint and serves it.

The store is opened only when the primary says so (`open`) and closed when it says so
(`release`: around a compaction's swap, see lmdb_env.LmdbEnv.others_released); the index
is kept meanwhile, since keys never change, and caught up on reopening. While the store is
not open every read raises NotServedHere, and the call goes to the primary.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.backoff import Backoff
from dedup.core.errors import CheckpointError, DedupError, NotServedHere
from dedup.core.policy import Scored
from dedup.core.records import CheckResult, DeleteKey, Registration, StoredFace
from dedup.core.rwlock import ReadWriteLock
from dedup.core.settings import IndexConfig, StoreConfig
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.base import (
    EnrolmentCheck,
    Erasure,
    GalleryStats,
    Gauge,
    IndexStatus,
    Party,
    Progress,
    SweepSearch,
)
from dedup.gallery.embedded.checkpoint import checkpoint_kind
from dedup.gallery.embedded.index import SearchOptions, VectorIndex, load_index
from dedup.gallery.embedded.index_plan import IndexPlan
from dedup.gallery.embedded.layout import CHECKPOINT_FILE
from dedup.gallery.embedded.live_index import LiveIndex
from dedup.gallery.embedded.rebuild import build_in_process
from dedup.gallery.embedded.replay import apply_delta, change_delta
from dedup.gallery.embedded.search import ExactSearch
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.gallery")

_CHECKPOINT_ATTEMPTS = 3  # the primary may checkpoint (and truncate) between load and replay
_RELOAD_FIRST_S, _RELOAD_AT_MOST_S = 1.0, 60.0  # the index loaded again after a failed catch-up
_TYPE_CHECK_S = 5.0  # how often the checkpoint's index type is compared with this one's


class ReplicaGallery:
    """The reads a replica answers itself (a Check's); every other method of the Gallery
    protocol raises NotServedHere: the primary answers those."""

    def __init__(self, config: StoreConfig, model_id: str, index_config: IndexConfig,
                 pin: Callable[[int], None] = lambda covered: None,
                 follow_s: float = 0.2) -> None:
        self.config = dataclasses.replace(config, check_on_open=False)
        self.model_id = model_id
        self.index_config = index_config
        self.dimension = config.dimension
        self.data_dir = Path(config.data_dir)
        self.location = str(self.data_dir)
        self.reads_wait = False
        self.checkpoint_path = self.data_dir / CHECKPOINT_FILE
        self._pin = pin
        self._follow_s = follow_s
        # Reads hold it shared; opening and releasing the store hold it alone.
        self._holding = ReadWriteLock()
        self._store: Store | None = None
        self._live: LiveIndex | None = None
        self._search: ExactSearch | None = None
        self.covered = -1  # the last change the index holds
        # A catch-up failed partway: the index held some of its changes, which replaying
        # them again would add twice. Until the follower has loaded it again (tried as
        # `_reload` allows) every read raises NotServedHere: the primary answers them.
        self._partly_caught_up = False
        self._reload = Backoff(_RELOAD_FIRST_S, _RELOAD_AT_MOST_S)
        self._checkpoint_seen: tuple[int, int] | None = None  # (inode, mtime) last compared
        self._closed = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="dedup-replica-follow",
                                          daemon=True)

    # -- the store's life, as the primary directs it ---------------------------------

    def open(self) -> int:
        """Opens the store read-only and brings the index up to its latest change (the
        first time: from the checkpoint); returns the change the index covers."""
        with self._holding.writing():
            if self._store is None:
                store = Store(self.config, readonly=True)
                try:
                    self._adopt(store)
                except BaseException:
                    store.close()
                    raise
                self._store = store
            if not self._follower.is_alive() and not self._closed.is_set():
                self._follower.start()
            return self.covered

    def _adopt(self, store: Store) -> None:
        if self._live is None:
            live = LiveIndex(store, self.model_id)
            live.index, self.covered = self._load(store)
            self._live = live
            self._search = ExactSearch(live, self.dimension, self.index_config,
                                       SearchOptions.configured(self.index_config))
        else:
            self._live.store = store
        if not self._partly_caught_up:  # else the follower loads the index again
            self._catch_up(store)

    def release(self) -> None:
        """Closes the store (in-flight reads finish first); the index stays."""
        with self._holding.writing():
            if self._store is not None:
                self._store.close()
                self._store = None

    @property
    def serving(self) -> bool:
        """Whether reads can be answered here now (not while the index is loaded again
        after a catch-up that failed partway: the primary answers them, face model and
        all)."""
        return self._store is not None and not self._partly_caught_up

    def close(self, checkpoint: bool = True) -> None:
        """`checkpoint` is the primary's business: ignored."""
        self._closed.set()
        if self._follower.is_alive():
            self._follower.join(timeout=10)
        self.release()
        if self._search is not None:
            self._search.close()

    # -- catching up -----------------------------------------------------------------

    def _catch_up(self, store: Store) -> None:
        """Replays the changes committed since the index's last one (read-your-writes)."""
        self._refuse_if_reloading()
        if store.sequence() <= self.covered:
            return
        live = self._live
        assert live is not None
        with live.writes:
            self._refuse_if_reloading()
            delta = change_delta(store, self.covered)
            if delta.current <= self.covered:
                return
            if delta.complete:
                try:
                    apply_delta(store, live.index, delta, self.model_id)
                except Exception as error:
                    # Kept until the follower has loaded another: a search that caught up
                    # before this may be reading it (it holds every change before this one).
                    self._partly_caught_up = True
                    log.exception("replica: a catch-up failed partway: the primary answers "
                                  "its checks until the index is loaded again")
                    raise NotServedHere("this replica's catch-up failed partway") from error
                self.covered = delta.current
            else:
                log.warning("the change log no longer reaches back to change %d (now %d): "
                            "loading the checkpoint again", self.covered, delta.current)
                live.index, self.covered = self._load(store)
            self._pin(self.covered)

    def _refuse_if_reloading(self) -> None:
        if self._partly_caught_up:
            raise NotServedHere("this replica's index is being loaded again")

    def _reload_if_due(self) -> None:
        """After a catch-up that failed partway: the index loaded again (the checkpoint read
        without holding the store, so that a compaction's release never waits for it; then
        the log after it replayed) when the last try is long enough ago."""
        if self._reload.seconds_left() or self._store is None:
            return
        try:
            loaded = self._load_again()
        except Exception:
            self._reload.failed()
            raise
        if loaded is not None:
            self._reload.succeeded()
            log.info("replica: the index is loaded again (%d vectors): answering checks",
                     loaded)

    def _load_again(self) -> int | None:
        """The index loaded again and served; its size, or None if the store was released
        or the log truncated meanwhile (the next round tries again)."""
        live = self._live
        assert live is not None
        # No build from the store where the checkpoint is unusable: it would hold the store
        # for minutes, and a compaction's release with it. The primary answers meanwhile,
        # and its next checkpoint is tried.
        index, covered = load_index(self.checkpoint_path, self.dimension, self.model_id)
        self._pin(covered)
        with self._holding.reading():
            store = self._store
            if store is None:
                return None
            with live.writes:
                delta = change_delta(store, covered)
                if not delta.complete:
                    return None
                apply_delta(store, index, delta, self.model_id)
                live.index, self.covered = index, delta.current
                self._partly_caught_up = False
                self._pin(self.covered)
        return len(index)

    def _load(self, store: Store) -> tuple[VectorIndex, int]:
        """The primary's checkpoint with the log after it replayed; built from the store
        if there is no usable checkpoint."""
        for _ in range(_CHECKPOINT_ATTEMPTS):
            try:
                index, covered = load_index(self.checkpoint_path, self.dimension, self.model_id)
            except CheckpointError as error:
                log.warning("replica: no usable index checkpoint (%s): building from the "
                            "store", error)
                break
            self._pin(covered)
            delta = change_delta(store, covered)
            if delta.complete:
                apply_delta(store, index, delta, self.model_id)
                self._pin(delta.current)
                return index, delta.current
        return self._build(store)

    def _build(self, store: Store) -> tuple[VectorIndex, int]:
        plan = IndexPlan(store, self.model_id, self.index_config)
        kind = plan.start_kind()
        built = build_in_process(store, kind, self.model_id, plan.only_model(),
                                 lambda *_: None, plan.pair_score)
        self._pin(built.sequence)
        return built.index, built.sequence

    def _follow(self) -> None:
        checked_type = time.monotonic()
        while not self._closed.wait(self._follow_s):
            type_too = time.monotonic() - checked_type >= _TYPE_CHECK_S
            if type_too:
                checked_type = time.monotonic()
            try:
                self.follow_once(type_too)
            except NotServedHere:
                pass  # the store was released, or the index is being loaded again
            except Exception:
                log.exception("replica: following the primary failed")

    def follow_once(self, type_too: bool = False) -> None:
        """One round of the follower: the changes since the index's last one replayed (or,
        after a catch-up that failed partway, the index loaded again); with `type_too`, the
        primary's index type taken up."""
        if self._partly_caught_up:
            self._reload_if_due()
            return
        with self._holding.reading():
            if self._store is not None:
                self._catch_up(self._store)
        if type_too:
            self._follow_index_type()

    def _follow_index_type(self) -> None:
        """Loads the primary's checkpoint when it holds another index type than this one
        (an automatic switch, a rebuild): the replica then serves what the primary does."""
        try:
            status = self.checkpoint_path.stat()
        except OSError:
            return
        identity = (status.st_ino, status.st_mtime_ns)
        live = self._live
        if identity == self._checkpoint_seen or live is None:
            return
        if checkpoint_kind(self.checkpoint_path) == live.index.kind:
            self._checkpoint_seen = identity
            return
        index, covered = load_index(self.checkpoint_path, self.dimension, self.model_id)
        with self._holding.reading():
            store = self._store
            if store is None:
                return  # released: tried again after the reopening
            with live.writes:
                delta = change_delta(store, covered)
                if not delta.complete:
                    return
                apply_delta(store, index, delta, self.model_id)
                live.index, self.covered = index, delta.current
                self._pin(self.covered)
        self._checkpoint_seen = identity
        log.info("replica: now serving the primary's %s index (%d vectors)", index.kind,
                 len(index))

    @contextmanager
    def _reading(self) -> Iterator[Store]:
        """The open store, for one read (not nested: a waiting release goes first)."""
        with self._holding.reading():
            store = self._store
            if store is None:
                raise NotServedHere("this replica's store is not open")
            yield store

    # -- reads -----------------------------------------------------------------------

    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        with self._reading() as store:
            self._catch_up(store)
            assert self._search is not None
            return self._search.neighbours(vector, k, floor)

    def neighbours_of_many(self, queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]:
        with self._reading() as store:
            self._catch_up(store)
            assert self._search is not None
            return self._search.neighbours_of_many(queries, k, floor)

    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        with self._reading():
            assert self._search is not None
            return self._search.same_id_number(vector, id_number)

    def stored_face(self, registration_id: str) -> tuple[int, Registration, Vector] | None:
        with self._reading() as store:
            faces = store.faces(store.keys_of(registration_id), with_vectors=True)
        if not faces or faces[0].vector is None:
            return None
        return faces[0].key, faces[0].registration, faces[0].vector

    def settled(self, party: Party) -> dict[int, bytes]:
        with self._reading() as store:
            return store.settled(party)

    def get(self, registration_id: str) -> Registration | None:
        with self._reading() as store:
            return store.get(registration_id)

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        with self._reading() as store:
            return store.faces(keys, with_vectors)

    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        with self._reading() as store:
            return store.faces_of_id_number(id_number)

    def comparable_count(self) -> int:
        with self._reading() as store:
            return store.model_counts().get(self.model_id, 0)

    def audit_head(self) -> tuple[str, int, bytes]:
        with self._reading() as store:
            return ("", *store.audit_head())

    # -- the primary's: calls for these are forwarded to it ----------------------------

    def _primary_only(self, what: str) -> NoReturn:
        raise NotServedHere(f"{what}: answered by the primary process, not a replica")

    def iter_vectors(self, block: int) -> Iterator[tuple[list[int], Matrix]]:
        self._primary_only("iter_vectors")

    def stats(self) -> GalleryStats:
        self._primary_only("stats")

    def index_status(self) -> IndexStatus:
        self._primary_only("index_status")

    def gauges(self) -> list[Gauge]:
        self._primary_only("gauges")

    def sweep_search(self, min_score: float, threads: int = 0) -> SweepSearch:
        self._primary_only("sweep_search")

    def ensure_unique(self, registration: Registration) -> None:
        self._primary_only("ensure_unique")

    def insert(self, registration: Registration, vector: Vector) -> Registration:
        self._primary_only("insert")

    def insert_each(self, batch: list[tuple[Registration, Vector]]
                    ) -> list[Registration | DedupError]:
        self._primary_only("insert_each")

    def insert_checked(self, registration: Registration, vector: Vector,
                       check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]:
        self._primary_only("insert_checked")

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None) -> Erasure:
        self._primary_only("delete")

    def settle(self, checked: Party, matched: int, record: bytes, audit: RecordMaker
               ) -> bytes:
        self._primary_only("settle")

    def append_audit(self, make: RecordMaker) -> bytes:
        self._primary_only("append_audit")

    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus:
        self._primary_only("rebuild")

    def compact(self) -> tuple[int, int]:
        self._primary_only("compact")

    def checkpoint(self, covering: int | None = None) -> int:
        self._primary_only("checkpoint")
