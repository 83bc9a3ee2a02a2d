"""The gallery: the store and the index derived from it, kept in step.

Writes are serialised by one lock and applied to LMDB first (committed durably), then to
the index, so the index never holds a vector the store does not. At start the index is
loaded from its checkpoint and the store's change log after it is replayed; a missing or
damaged checkpoint, or any disagreement with the store, is a warning and a rebuild.

The index holds only the embeddings of the server's model: registrations another model
made (before a model change) stay in the store but are never compared with a probe.
An approximate index's candidates are re-scored exactly from the stored float32 vectors.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.errors import CheckpointError, FailedPrecondition, ResourceExhausted, StoreError
from dedup.core.policy import Scored
from dedup.core.records import CheckResult, DeleteKey, Registration, StoredFace
from dedup.core.settings import IndexConfig, StoreConfig
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.base import (
    EnrolmentCheck,
    Erasure,
    GalleryStats,
    Gauge,
    IndexStatus,
    Progress,
    SweepSearch,
    widening_neighbours,
)
from dedup.gallery.embedded.batcher import SearchBatcher
from dedup.gallery.embedded.checkpoint import write_checkpoint
from dedup.gallery.embedded.index import (
    AUTO,
    BINARY_DEFAULT,
    FLAT,
    Ids,
    IVFIndex,
    Scores,
    SearchOptions,
    VectorIndex,
    load_index,
    training_size,
    validate_kind,
)
from dedup.gallery.embedded.layout import CHECKPOINT_FILE, LOCK_FILE, store_dir
from dedup.gallery.embedded.rebuild import Built, build_in_child, build_in_process
from dedup.gallery.embedded.store import OP_ADD, Store
from dedup.gallery.embedded.store_check import walk_store
from dedup.gallery.embedded.sweep import IVFCandidates

log = logging.getLogger("dedup.gallery")

# After a failed automatic switch of index type, wait this long before trying again.
SWITCH_RETRY_S = 600.0
REBUILD_FILE = "index.ckpt.rebuild"


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """One process at a time serves or bulk-loads a data directory (its index is in memory)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / LOCK_FILE, "ab")  # noqa: SIM115 - held until close()
    except OSError as error:
        raise StoreError(f"{data_dir}: cannot use the data directory ({error})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(f"{data_dir} is in use by another dedup process (a running server?): "
                         "stop it, or send the work to it with --server") from None
    return handle


def replay_changes(store: Store, index: VectorIndex, covered: int, model_id: str) -> int | None:
    """Applies the logged changes after `covered` to `index`; returns the sequence now covered.

    None if the log has a gap (it was truncated past `covered`): rebuild instead.
    """
    changes, current = store.changes_after(covered)
    if covered > current or len(changes) != current - covered:
        log.warning(
            "checkpoint covers change %d, store is at %d with %d logged changes after it: "
            "rebuilding", covered, current, len(changes),
        )
        return None
    added = [change.key for change in changes if change.op == OP_ADD]
    removed = {change.key for change in changes if change.op != OP_ADD}
    alive = [key for key in added if key not in removed]
    ours = [face.key for face in store.faces(alive, with_vectors=False)
            if face.registration.embedding_model == model_id]
    keys, vectors = store.vectors(ours)
    index.add(np.asarray(keys, np.int64), vectors)
    index.remove(np.asarray(sorted(removed.difference(added)), np.int64))
    if changes:
        log.info("replayed %d change(s) after sequence %d", len(changes), covered)
    return current


class EmbeddedGallery:
    """The embedded gallery (see dedup.gallery.base.Gallery): LMDB and a FAISS index in this
    process."""

    def __init__(self, config: StoreConfig, model_id: str,
                 index_config: IndexConfig | None = None, background: bool = True) -> None:
        """`background`: run periodic checkpoints and automatic index switches (a server);
        offline tools turn it off and checkpoint when they close."""
        self.config = config
        self.model_id = model_id
        self.index_config = index_config or IndexConfig()
        self.configured_kind = validate_kind(self.index_config.index_factory)
        self.search_options = SearchOptions(nprobe=self.index_config.nprobe)
        self.data_dir = Path(config.data_dir)
        self.location = str(self.data_dir)
        self.dimension = config.dimension
        self.checkpoint_path = self.data_dir / CHECKPOINT_FILE
        self._lock_file = _lock_data_dir(self.data_dir)
        try:
            if config.check_on_open:
                walk_store(store_dir(self.data_dir))
            self.store = Store(config)
        except BaseException:
            self._lock_file.close()
            raise
        # Re-entrant, so that a check-then-insert can hold it across both steps.
        self._writes = threading.RLock()
        # One checkpoint writer at a time: they share the temporary file's name.
        self._checkpointing = threading.RLock()
        self._rebuilding = threading.Lock()
        # While a live rebuild runs, the change log is kept from this sequence on.
        self._log_pin: int | None = None
        self._closed = threading.Event()
        self._switch_failed_at = -SWITCH_RETRY_S
        self._compacting = threading.Lock()
        # When the checkpoint must be rewritten without erased registrations (time.time()).
        self._erasure_checkpoint_due: float | None = None
        self.index: VectorIndex
        self.index, self.checkpoint_sequence = self._recover_index()
        self._last_checkpoint_time = time.monotonic()
        self._batcher = SearchBatcher(
            self._search_batch,
            dimension=config.dimension,
            max_batch=self.index_config.max_batch,
            max_wait_s=self.index_config.max_batch_wait_s,
            dispatchers=self.index_config.search_threads,
        )
        self._maintainer = threading.Thread(
            target=self._maintain, name="dedup-maintenance", daemon=True)
        if background:
            self._maintainer.start()

    # -- start-up --------------------------------------------------------------------

    def _recover_index(self) -> tuple[VectorIndex, int]:
        self._warn_about_other_models()
        (self.data_dir / REBUILD_FILE).unlink(missing_ok=True)  # a rebuild that never swapped
        try:
            index, covered = load_index(self.checkpoint_path, self.config.dimension,
                                        self.model_id)
        except CheckpointError as error:
            if self.checkpoint_path.exists():
                log.warning("index checkpoint unusable, rebuilding from the store: %s", error)
            else:
                log.info("no index checkpoint at %s, building from the store", self.checkpoint_path)
            return self._rebuild_at_start()
        replayed = self._replay(index, covered)
        if replayed is None:
            return self._rebuild_at_start()
        count = self.comparable_count()
        if len(index) != count:
            log.warning(
                "index holds %d vectors after replay but the store holds %d: rebuilding",
                len(index), count,
            )
            return self._rebuild_at_start()
        if replayed != covered:
            return index, self._checkpoint_at_start(index, replayed, covered)
        return index, replayed

    def _replay(self, index: VectorIndex, covered: int) -> int | None:
        return replay_changes(self.store, index, covered, self.model_id)

    def _rebuild_at_start(self) -> tuple[VectorIndex, int]:
        started = time.monotonic()
        kind = self.wanted_kind()
        if training_size(kind) > self.comparable_count():
            kind = FLAT  # a type that needs training starts exact; a rebuild switches later
        built = build_in_process(self.store, kind, self.model_id, self.only_model(),
                                 lambda *_: None)
        log.info("built a %s index from the store: %d vectors in %.1f s",
                 kind, len(built.index), time.monotonic() - started)
        return built.index, self._checkpoint_at_start(built.index, built.sequence, 0)

    def only_model(self) -> str | None:
        """Filter builds by model only when the store holds another model's embeddings."""
        return self.model_id if set(self.store.model_counts()) - {self.model_id} else None

    def comparable_count(self) -> int:
        return self.store.model_counts().get(self.model_id, 0)

    def _warn_about_other_models(self) -> None:
        for model, count in self.store.model_counts().items():
            if model != self.model_id:
                log.warning(
                    "%d registration(s) were embedded by model %r, not the current %r: they "
                    "are left out of every check until enrolled again", count, model,
                    self.model_id,
                )

    def wanted_kind(self) -> str:
        """The configured index type; for "auto", what fits the gallery's size."""
        if self.configured_kind != AUTO:
            return self.configured_kind
        return BINARY_DEFAULT if self.comparable_count() >= self.index_config.auto_threshold \
            else FLAT

    # -- writes ----------------------------------------------------------------------

    def ensure_unique(self, registration: Registration) -> None:
        self.store.ensure_unique(registration)

    def insert_checked(self, registration: Registration, vector: Vector,
                       check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]:
        """Checks, then stores only if `check.admits` the verdict, as one step.

        The search runs beside other calls; under the write lock only what changed since it
        began is looked at, so two captures of one face under two ID numbers cannot both pass.
        """
        with self._writes:
            seen = self.store.sequence()  # the index agrees with the store under the lock
        candidates = self._candidates(vector, check)
        with self._writes:
            candidates = self._caught_up(vector, check, seen, candidates)
            result = check.judge(candidates, self.same_id_number(vector, check.claimed_id_number))
            if not check.admits(result):
                return result, None
            return result, self.insert(registration, vector)

    def _candidates(self, vector: Vector, check: EnrolmentCheck) -> list[Scored]:
        same_id = self.same_id_number(vector, check.claimed_id_number)
        return self.neighbours(vector, check.search_k + len(same_id), check.floor)

    def _caught_up(self, vector: Vector, check: EnrolmentCheck, seen: int,
                   candidates: list[Scored]) -> list[Scored]:
        """The candidates as of now: without registrations deleted since `seen`, with those
        added since scored exactly. Runs under the write lock."""
        delta = self._changes_since(seen)
        if delta is None:  # a checkpoint truncated the log meanwhile: search again, locked
            return self._candidates(vector, check)
        added, removed = delta
        fresh = [scored for scored in self._score(vector, self.store.faces(added, True))
                 if scored.score >= check.floor]
        return [scored for scored in candidates if scored.key not in removed] + fresh

    def _changes_since(self, sequence: int) -> tuple[list[int], set[int]] | None:
        """Keys added (and still stored) and keys removed after `sequence`; None if a
        checkpoint has truncated the change log past it."""
        changes, current = self.store.changes_after(sequence)
        if len(changes) != current - sequence:
            return None
        removed = {change.key for change in changes if change.op != OP_ADD}
        added = [change.key for change in changes
                 if change.op == OP_ADD and change.key not in removed]
        return added, removed

    def _score(self, vector: Vector, faces: list[StoredFace]) -> list[Scored]:
        """The faces of the server's model, scored exactly against the probe."""
        ours = [face for face in faces if face.registration.embedding_model == self.model_id]
        if not ours:
            return []
        scores = np.vstack([face.vector for face in ours if face.vector is not None]) @ vector
        return [Scored(face.key, face.registration, float(score))
                for face, score in zip(ours, scores, strict=True)]

    def insert(self, registration: Registration, vector: Vector) -> Registration:
        """Stores a registration whose vector the server's model made, then indexes it."""
        with self._writes:
            face = self.store.insert(self._stamped(registration), vector)
            self.index.add(np.array([face.key], np.int64), vector.reshape(1, -1))
        return face.registration

    def insert_many(self, batch: list[tuple[Registration, Vector]]) -> list[Registration]:
        """Stores a batch in one durable transaction (bulk loads), then indexes it."""
        with self._writes:
            faces = self.store.insert_many([(self._stamped(r), v) for r, v in batch])
            keys = np.array([face.key for face in faces], np.int64)
            self.index.add(keys, np.vstack([vector for _, vector in batch]))
        return [face.registration for face in faces]

    def _stamped(self, registration: Registration) -> Registration:
        return dataclasses.replace(registration, embedding_model=self.model_id)

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None) -> Erasure:
        """Erases every registration under one key from the store (with its audit record, in
        the same transaction) and the index. The index checkpoint is rewritten without them
        within erasure_checkpoint_delay_s (`checkpoint_due`), the freed store pages by the
        next compaction (`compaction_due`)."""
        with self._writes:
            faces, digest = self.store.delete(by, value, audit)
            self.index.remove(np.array([face.key for face in faces], np.int64))
            if faces and self._erasure_checkpoint_due is None:
                self._erasure_checkpoint_due = time.time() + self.config.erasure_checkpoint_delay_s
            checkpoint_due = self._erasure_checkpoint_due
        return Erasure([face.registration for face in faces], digest, self.compaction_due(),
                       checkpoint_due if faces else None)

    def compaction_due(self) -> float | None:
        """Unix time by which erased registrations' bytes will be compacted away."""
        since = self.store.erased_since()
        return None if since is None else since + self.config.compact_delay_s

    def compact(self) -> tuple[int, int]:
        """Rewrites the store compacted (calls wait); see Store.compact."""
        with self._compacting:
            return self.store.compact()

    # -- reads -----------------------------------------------------------------------

    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        """The probe's nearest registrations scoring >= floor, and always the best one.

        Scores are exact: an approximate index's candidates are re-scored from the stored
        vectors, so verdicts never rest on approximate scores.
        """
        found = self._batcher.search(vector, max(k, self.index_config.rerank_candidates))
        keys, scores = found.ids, found.scores
        if not found.exact:
            keys, scores = self._rerank(keys, vector)
        wanted = [i for i, score in enumerate(scores) if i == 0 or score >= floor]
        by_key = {int(keys[i]): float(scores[i]) for i in wanted}
        faces = self.store.faces(by_key, with_vectors=False)
        return [Scored(face.key, face.registration, by_key[face.key]) for face in faces
                if face.registration.embedding_model == self.model_id]

    def neighbours_of_many(self, queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]:
        """Per query: (key, exact score) of its k nearest scoring >= floor, best first.

        One FAISS search for the whole block (batch jobs: cluster finding), not the
        micro-batcher the per-call searches share.
        """
        exact, found = self._search_batch(queries, max(k, self.index_config.rerank_candidates))
        rows = []
        for query, (keys, scores) in zip(queries, found, strict=True):
            if not exact:
                keys, scores = self._rerank(keys[keys >= 0], query)
            rows.append([(int(key), float(score)) for key, score in zip(keys[:k], scores[:k],
                                                                          strict=True)
                         if key >= 0 and score >= floor])
        return rows

    def stored_face(self, registration_id: str) -> tuple[int, Registration, Vector] | None:
        keys = self.store.keys_of(registration_id)
        faces = self.store.faces(keys, with_vectors=True)
        if not faces or faces[0].vector is None:
            return None
        return faces[0].key, faces[0].registration, faces[0].vector

    def _search_batch(self, queries: Matrix, k: int) -> tuple[bool, list[tuple[Ids, Scores]]]:
        index = self.index  # one index for the whole batch, even if a rebuild swaps it now
        return index.exact, index.search(queries, k, self.search_options)

    def _rerank(self, keys: np.ndarray, vector: Vector) -> tuple[np.ndarray, np.ndarray]:
        kept, vectors = self.store.vectors(keys)
        exact: np.ndarray = vectors @ vector
        order = np.argsort(-exact, kind="stable")
        return np.asarray(kept, np.int64)[order], exact[order]

    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        """Every registration under `id_number`, scored 1:1 against the probe."""
        if not id_number:
            return []
        return self._score(vector, self.store.faces_of_id_number(id_number))

    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        return self.store.faces_of_id_number(id_number)

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        return self.store.faces(keys, with_vectors)

    def iter_vectors(self, block: int) -> Iterator[tuple[list[int], Matrix]]:
        return self.store.iter_vectors(block, only_model=self.only_model())

    def settled(self, registration_id: str) -> dict[str, bytes]:
        return self.store.settled(registration_id)

    def sweep_search(self, min_score: float) -> SweepSearch:
        if self.index.exact:
            return lambda matrix: widening_neighbours(self, matrix, min_score)
        return IVFCandidates(self.store, self.model_id, self.only_model(), min_score).neighbours

    def settle(self, first: str, second: str, record: bytes, audit: RecordMaker) -> bytes:
        return self.store.settle(first, second, record, audit)

    def append_audit(self, make: RecordMaker) -> bytes:
        return self.store.append_audit(make)

    def gauges(self) -> list[Gauge]:
        usage = self.store.usage()
        status = self.index_status()
        return [
            Gauge("dedup_registrations", "registrations in the store", self.store.count()),
            Gauge("dedup_store_file_bytes", "size of the LMDB data file", usage.file_bytes),
            Gauge("dedup_store_used_bytes", "LMDB pages in use", usage.used_bytes),
            Gauge("dedup_store_map_bytes", "the LMDB map's current size", usage.map_bytes),
            Gauge("dedup_checkpoint_lag", "changes not yet in the index checkpoint",
                  status.store_sequence - status.checkpoint_sequence),
        ]

    def is_enrolled(self, registration_id: str) -> bool:
        return self.store.exists(registration_id)

    def msisdn_taken(self, msisdn: str) -> bool:
        return self.store.msisdn_taken(msisdn)

    def get(self, registration_id: str) -> Registration | None:
        return self.store.get(registration_id)

    def stats(self) -> GalleryStats:
        return GalleryStats(
            registrations=self.store.count(),
            distinct_id_numbers=self.store.distinct_id_numbers(),
            index_type=self.index.kind,
            dimension=self.index.dimension,
            index_vectors=len(self.index),
            store_sequence=self.store.sequence(),
            checkpoint_sequence=self.checkpoint_sequence,
            registrations_by_model=self.store.model_counts(),
        )

    def index_status(self) -> IndexStatus:
        index = self.index
        return IndexStatus(
            index_type=index.kind, dimension=index.dimension, vectors=len(index),
            exact=index.exact,
            rerank_candidates=0 if index.exact else self.index_config.rerank_candidates,
            search_parameters=(f"nprobe={self.search_options.nprobe}"
                               if isinstance(index, IVFIndex) else ""),
            configured_index_type=self.configured_kind, wanted_index_type=self.wanted_kind(),
            rebuilding=self._rebuilding.locked(), store_sequence=self.store.sequence(),
            checkpoint_sequence=self.checkpoint_sequence,
            bytes_per_vector=index.bytes_per_vector,
        )

    # -- rebuilds --------------------------------------------------------------------

    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus:
        """Builds `kind` (None: the configured type) in a child process and swaps it in."""
        target = validate_kind(kind) if kind else self.configured_kind
        if target == AUTO:
            target = self.wanted_kind()
        needed, have = training_size(target), self.comparable_count()
        if needed > have:
            raise FailedPrecondition(f"index_factory: {target} needs at least {needed:,} "
                                     f"registrations to train, the store holds {have:,}")
        if not self._rebuilding.acquire(blocking=False):
            raise FailedPrecondition("a rebuild is already running")
        try:
            return self._rebuild_live(target, progress)
        finally:
            self._log_pin = None
            self._rebuilding.release()

    def _rebuild_live(self, kind: str, progress: Progress) -> IndexStatus:
        started = time.monotonic()
        self._log_pin = self.checkpoint_sequence
        side_file = self.data_dir / REBUILD_FILE
        progress("starting", 0, self.comparable_count())
        covered = build_in_child(self.config, kind, self.model_id, self.only_model(),
                                 side_file, progress, cancelled=self._closed.is_set)
        built, _ = load_index(side_file, self.config.dimension, self.model_id)
        progress("catching_up", 0, self.store.sequence() - covered)
        covered = self._catch_up(built, covered)  # the bulk, while writes go on
        with self._writes:  # the tail, with writes held off, then the swap
            covered = self._catch_up(built, covered)
            if len(built) != self.comparable_count():
                raise StoreError(f"rebuilt index holds {len(built)} vectors, the store "
                                 f"{self.comparable_count()}: kept the old index")
            self.index = built
            snapshot = built.snapshot(covered, self.model_id)
        with self._checkpointing:
            write_checkpoint(self.checkpoint_path, snapshot)
            self._after_checkpoint(covered)
        side_file.unlink(missing_ok=True)
        log.info("rebuilt the index as %s: %d vectors in %.1f s", kind, len(built),
                 time.monotonic() - started)
        return self.index_status()

    def _catch_up(self, index: VectorIndex, covered: int) -> int:
        replayed = self._replay(index, covered)
        if replayed is None:
            raise StoreError("the change log no longer reaches back to the rebuild's snapshot")
        return replayed

    def build_offline(self, kind: str, progress: Progress) -> Built:
        """For `dedup rebuild` on a data directory no server holds: build and swap here."""
        built = build_in_process(self.store, kind, self.model_id, self.only_model(), progress)
        with self._writes:
            self.index = built.index
        self._save_checkpoint(built.index, built.sequence)
        return built

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint(self, covering: int | None = None) -> int:
        """Writes the index with the sequence it covers; returns that sequence. With
        `covering`, nothing is written if the last checkpoint already covers that change."""
        with self._checkpointing:
            with self._writes:  # the index and the sequence must agree
                sequence = self.store.sequence()
                if covering is not None and self.checkpoint_sequence >= covering:
                    return self.checkpoint_sequence
                if sequence == self.checkpoint_sequence and self.checkpoint_path.exists():
                    return sequence
                snapshot = self.index.snapshot(sequence, self.model_id)
            write_checkpoint(self.checkpoint_path, snapshot)
            self._after_checkpoint(sequence)
            return sequence

    def _checkpoint_at_start(self, index: VectorIndex, sequence: int, on_disk: int) -> int:
        """Checkpoints the recovered index; returns the sequence the checkpoint on disk covers
        (`on_disk` if this one cannot be written, e.g. on a full disk)."""
        try:
            self._save_checkpoint(index, sequence)
        except (ResourceExhausted, CheckpointError) as error:
            # The server can run without it: the change log keeps covering the index.
            log.error("could not checkpoint the recovered index: %s", error)
            return on_disk
        return sequence

    def _save_checkpoint(self, index: VectorIndex, sequence: int) -> None:
        with self._checkpointing:
            write_checkpoint(self.checkpoint_path, index.snapshot(sequence, self.model_id))
            self._after_checkpoint(sequence)

    def _after_checkpoint(self, sequence: int) -> None:
        self.checkpoint_sequence = sequence
        self._last_checkpoint_time = time.monotonic()
        pin = self._log_pin
        self.store.truncate_changes(sequence if pin is None else min(pin, sequence))

    def _maintain(self) -> None:
        """Background: periodic checkpoints, and the switch to the wanted index type."""
        poll = min(1.0, self.config.checkpoint_interval_s)  # erasure checkpoints are due fast
        switch_every = max(1, round(min(5.0, self.config.checkpoint_interval_s) / poll))
        rounds = 0
        while not self._closed.wait(poll):
            rounds += 1
            try:
                self._checkpoint_if_due()
                self._compact_if_due()
                if rounds % switch_every == 0:
                    self._switch_if_wanted()
            except Exception:  # the store is the truth; a failure here only costs time
                log.exception("background index maintenance failed")

    def _compact_if_due(self) -> None:
        due = self.compaction_due()
        if due is not None and time.time() >= due:
            self.compact()

    def _checkpoint_if_due(self) -> None:
        erasure_due = self._erasure_checkpoint_due
        if erasure_due is not None and time.time() >= erasure_due:
            with self._writes:
                self._erasure_checkpoint_due = None
            self.checkpoint()
            return
        pending = self.store.sequence() - self.checkpoint_sequence
        elapsed = time.monotonic() - self._last_checkpoint_time
        overdue = elapsed >= self.config.checkpoint_interval_s
        if pending >= self.config.checkpoint_every_changes or (pending and overdue):
            self.checkpoint()

    def _switch_if_wanted(self) -> None:
        wanted = self.wanted_kind()
        if wanted == self.index.kind or self._rebuilding.locked():
            return
        if training_size(wanted) > self.comparable_count():
            return
        if time.monotonic() - self._switch_failed_at < SWITCH_RETRY_S:
            return
        log.info("gallery size calls for a %s index (now %s): rebuilding", wanted,
                 self.index.kind)
        try:
            self.rebuild(wanted, lambda *_: None)
        except Exception:
            self._switch_failed_at = time.monotonic()  # the old index serves; retry later
            raise

    def close(self, checkpoint: bool = True) -> None:
        self._closed.set()
        if self._maintainer.is_alive():
            self._maintainer.join()
        self._batcher.close()
        try:
            if checkpoint:
                self.checkpoint()
        except (ResourceExhausted, CheckpointError) as error:
            # Nothing is lost: the next start replays the change log, which still holds it.
            log.error("shutdown checkpoint failed: %s", error)
        finally:
            self.store.close()
            self._lock_file.close()
