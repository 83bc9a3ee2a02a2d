"""The embedded gallery: LMDB and a FAISS index in this process, behind the Gallery protocol.

Writes are serialised by one lock and applied to the store first, then to the index (see
live_index.py). At start the index is recovered (recovery.py); two maintenance threads keep
it checkpointed, the store compacted and the index of the wanted type (maintenance.py);
rebuilds swap in a new one (rebuilder.py). An approximate index's candidates are re-scored
exactly from the stored float32 vectors.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.errors import CheckpointError, DedupError, ResourceExhausted
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
    Party,
    Progress,
    SweepSearch,
    widening_neighbours,
)
from dedup.gallery.embedded.checkpointer import Checkpointer
from dedup.gallery.embedded.data_dir import open_data_dir
from dedup.gallery.embedded.index import (
    SearchOptions,
    VectorIndex,
    search_parameters,
    validate_kind,
)
from dedup.gallery.embedded.index_plan import IndexPlan
from dedup.gallery.embedded.layout import CHECKPOINT_FILE
from dedup.gallery.embedded.live_index import LiveIndex
from dedup.gallery.embedded.maintenance import CompactionSchedule, IndexSwitch, Maintenance
from dedup.gallery.embedded.rebuild import Built
from dedup.gallery.embedded.rebuilder import Rebuilder
from dedup.gallery.embedded.recovery import recover_index
from dedup.gallery.embedded.replay import change_delta
from dedup.gallery.embedded.search import ExactSearch
from dedup.gallery.embedded.sweep import SignCodeCandidates

log = logging.getLogger("dedup.gallery")


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
        self.configured_kind = validate_kind(self.index_config.index_factory,
                                             dimension=config.dimension)
        self.search_options = SearchOptions.configured(self.index_config)
        self.data_dir = Path(config.data_dir)
        self.location = str(self.data_dir)
        self.reads_wait = False
        self.dimension = config.dimension
        self._lock_file, self.store = open_data_dir(config)
        self._live = LiveIndex(self.store, model_id)
        self._plan = IndexPlan(self.store, model_id, self.index_config)
        self._checkpointer = Checkpointer(self._live, self.data_dir / CHECKPOINT_FILE, config)
        self._closed = threading.Event()
        self._rebuilder = Rebuilder(self._live, self._plan, self._checkpointer, config,
                                    status=self.index_status, cancelled=self._closed.is_set)
        self._compaction = CompactionSchedule(self.store, config.compact_delay_s)
        self._live.index, covered = recover_index(self._plan, self._checkpointer,
                                                  self._rebuilder.side_file)
        self._checkpointer.recovered(covered)
        if background and self._checkpointer.path.exists():  # a server: not offline tools
            self._checkpointer.fit_buffer(self._checkpointer.path.stat().st_size)
        self._search = ExactSearch(self._live, config.dimension, self.index_config,
                                   self.search_options)
        self._switch = IndexSwitch(self._live, self._plan, self._rebuilder)
        self._maintenance = Maintenance(config, self._closed, self._checkpointer,
                                        self._compaction, self._switch)
        if background:
            self._maintenance.start()

    # -- the live index and its plan -------------------------------------------------

    @property
    def index(self) -> VectorIndex:
        return self._live.index

    @property
    def checkpoint_path(self) -> Path:
        return self._checkpointer.path

    @property
    def checkpoint_sequence(self) -> int:
        """The change the index checkpoint on disk covers."""
        return self._checkpointer.sequence

    def only_model(self) -> str | None:
        """Filter builds by model only when the store holds another model's embeddings."""
        return self._plan.only_model()

    def comparable_count(self) -> int:
        return self._plan.comparable_count()

    def wanted_kind(self) -> str:
        """The configured index type; for "auto", what fits the gallery's size (see
        index_plan.kind_for: a larger type serving now is kept a little below its threshold)."""
        return self._plan.wanted_kind(serving=self._live.index.kind)

    # -- writes ----------------------------------------------------------------------

    def ensure_unique(self, registration: Registration) -> None:
        self.store.ensure_unique(registration)

    def insert_checked(self, registration: Registration, vector: Vector,
                       check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]:
        """Checks, then stores only if `check.admits` the verdict, as one step.

        The search runs beside other calls; under the write lock only what changed since it
        began is looked at, so two captures of one face under two ID numbers cannot both pass.
        """
        with self._live.writes:
            seen = self.store.sequence()  # the index agrees with the store under the lock
        candidates = self._candidates(vector, check)
        with self._live.writes:
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
        delta = change_delta(self.store, seen)
        if not delta.complete:  # a checkpoint truncated the log meanwhile: search again, locked
            return self._candidates(vector, check)
        added = self._search.score(vector, self.store.faces(delta.added.tolist(), True))
        fresh = [scored for scored in added if scored.score >= check.floor]
        return [scored for scored in candidates if scored.key not in delta.removed] + fresh

    def insert(self, registration: Registration, vector: Vector) -> Registration:
        """Stores a registration whose vector the server's model made, then indexes it."""
        with self._live.writes:
            face = self.store.insert(self._stamped(registration), vector)
            self._live.add(np.array([face.key], np.int64), vector.reshape(1, -1))
        return face.registration

    def insert_each(self, batch: list[tuple[Registration, Vector]]
                    ) -> list[Registration | DedupError]:
        """One durable transaction for the batch (see Store.insert_each), then indexed."""
        with self._live.writes:
            outcomes = self.store.insert_each([(self._stamped(r), v) for r, v in batch])
            stored = [(outcome.key, vector) for outcome, (_, vector)
                      in zip(outcomes, batch, strict=True) if isinstance(outcome, StoredFace)]
            if stored:
                self._live.add(np.array([key for key, _ in stored], np.int64),
                               np.vstack([vector for _, vector in stored]))
        return [outcome.registration if isinstance(outcome, StoredFace) else outcome
                for outcome in outcomes]

    def insert_many(self, batch: list[tuple[Registration, Vector]]) -> list[Registration]:
        """Stores a batch in one durable transaction (bulk loads), then indexes it unless
        indexing is deferred (`defer_indexing`)."""
        with self._live.writes:
            faces = self.store.insert_many([(self._stamped(r), v) for r, v in batch])
            if not self._live.deferred:
                keys = np.array([face.key for face in faces], np.int64)
                self._live.add(keys, np.vstack([vector for _, vector in batch]), reraise=True)
        return [face.registration for face in faces]

    def defer_indexing(self) -> None:
        """For an offline import that ends by building its index from the store
        (`build_offline`): `insert_many` stores rows without adding them to the index, whose
        memory then stays as it was, and the index is not checkpointed until that build
        replaces it. A crash before then leaves the checkpoint written before the import:
        the next start replays the store's change log into it, a batch of rows at a time."""
        with self._live.writes:
            self._live.deferred = True

    @property
    def indexing_deferred(self) -> bool:
        return self._live.deferred

    def _stamped(self, registration: Registration) -> Registration:
        return dataclasses.replace(registration, embedding_model=self.model_id)

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None) -> Erasure:
        """Erases every registration under one key from the store (with its audit record, in
        the same transaction) and the index. The index checkpoint is rewritten without them
        within erasure_checkpoint_delay_s (`checkpoint_due`), the freed store pages by the
        next compaction (`compaction_due`)."""
        due: list[float] = []

        def out_of_the_index(faces: list[StoredFace]) -> None:
            # Before the slots are zeroed, whose failure (a disk error) would skip it.
            self._live.remove(np.array([face.key for face in faces], np.int64))
            if faces:
                due.append(self._checkpointer.erasure_checkpoint_by())

        with self._live.writes:
            faces, digest = self.store.delete(by, value, audit, committed=out_of_the_index)
        return Erasure([face.registration for face in faces], digest, self.compaction_due(),
                       due[0] if due else None)

    def share_with_replicas(self, released: Callable[[], AbstractContextManager[object]],
                            floor: Callable[[], int | None]) -> None:
        """Read replicas (gallery/embedded/replica.py) in other processes have this store
        open: `released` makes them close it around a compaction's swap, `floor` is the
        oldest change one has yet to replay (the change log is kept from there on)."""
        self.store.share_with_replicas(released, floor)

    def clear_stale_readers(self) -> int:
        """Frees LMDB reader slots left by a replica that died."""
        return self.store.clear_stale_readers()

    def compaction_due(self) -> float | None:
        """Unix time by which erased registrations' bytes will be compacted away."""
        return self._compaction.due()

    def compact(self) -> tuple[int, int]:
        """Rewrites the store compacted (reads go on; writes pause for the last step); see
        compaction.compact."""
        return self._compaction.compact()

    # -- reads -----------------------------------------------------------------------

    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        """The probe's nearest registrations scoring >= floor, and always the best one, with
        exact scores."""
        return self._search.neighbours(vector, k, floor)

    def neighbours_of_many(self, queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]:
        """Per query: (key, exact score) of its k nearest scoring >= floor, best first."""
        return self._search.neighbours_of_many(queries, k, floor)

    def stored_face(self, registration_id: str) -> tuple[int, Registration, Vector] | None:
        keys = self.store.keys_of(registration_id)
        faces = self.store.faces(keys, with_vectors=True)
        if not faces or faces[0].vector is None:
            return None
        return faces[0].key, faces[0].registration, faces[0].vector

    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        """Every registration under `id_number`, scored 1:1 against the probe."""
        return self._search.same_id_number(vector, id_number)

    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        return self.store.faces_of_id_number(id_number)

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        return self.store.faces(keys, with_vectors)

    def iter_vectors(self, block: int) -> Iterator[tuple[list[int], Matrix]]:
        return self.store.iter_vectors(block, only_model=self.only_model())

    def settled(self, party: Party) -> dict[int, bytes]:
        return self.store.settled(party)

    def sweep_search(self, min_score: float, threads: int = 0) -> SweepSearch:
        if self.index.exact:
            return lambda _keys, matrix: widening_neighbours(self, matrix, min_score)
        return SignCodeCandidates(self.store, self.only_model(), min_score, threads).neighbours

    def settle(self, checked: Party, matched: int, record: bytes, audit: RecordMaker
               ) -> bytes:
        return self.store.settle(checked, matched, record, audit)

    def append_audit(self, make: RecordMaker) -> bytes:
        return self.store.append_audit(make)

    def audit_head(self) -> tuple[str, int, bytes]:
        return ("", *self.store.audit_head())

    def gauges(self) -> list[Gauge]:
        usage = self.store.usage()
        status = self.index_status()
        batches, queries = self._search.batch_counts()
        return [
            Gauge("dedup_registrations", "registrations in the store", self.store.count()),
            Gauge("dedup_store_file_bytes", "size of the LMDB data file", usage.file_bytes),
            Gauge("dedup_store_used_bytes", "LMDB pages in use", usage.used_bytes),
            Gauge("dedup_store_map_bytes", "the LMDB map's current size", usage.map_bytes),
            Gauge("dedup_checkpoint_lag", "changes not yet in the index checkpoint",
                  status.store_sequence - status.checkpoint_sequence),
            Gauge("dedup_search_batches", "batches of checks searched since start (each "
                  "cut into --search-threads index searches)", batches),
            Gauge("dedup_search_batched_queries", "queries in those batch searches", queries),
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
            search_parameters=search_parameters(index, self.search_options),
            configured_index_type=self.configured_kind, wanted_index_type=self.wanted_kind(),
            rebuilding=self._rebuilder.running, store_sequence=self.store.sequence(),
            checkpoint_sequence=self.checkpoint_sequence,
            bytes_per_vector=index.bytes_per_vector,
        )

    # -- rebuilds and checkpoints --------------------------------------------------

    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus:
        """Builds `kind` (None: the configured type) in a child process and swaps it in.
        A type asked for by name stays while this server runs: the automatic switch of
        `auto` leaves it alone until a rebuild to the configured type (None)."""
        pinned = validate_kind(kind, dimension=self.dimension) if kind else None
        with self._switch.pinned(pinned):
            return self._rebuilder.rebuild(kind, progress)

    def build_offline(self, kind: str, progress: Progress) -> Built:
        """For `dedup rebuild` on a data directory no server holds: build and swap here."""
        return self._rebuilder.build_offline(kind, progress)

    def checkpoint(self, covering: int | None = None) -> int:
        """Writes the index with the sequence it covers; returns that sequence. With
        `covering`, nothing is written if the last checkpoint already covers that change."""
        return self._checkpointer.checkpoint(covering)

    def close(self, checkpoint: bool = True) -> None:
        self._closed.set()
        self._maintenance.join()
        self._rebuilder.wait()  # an operator's rebuild, on a thread of its own
        self._search.close()
        try:
            if checkpoint:
                self.checkpoint()
        except (ResourceExhausted, CheckpointError) as error:
            # Nothing is lost: the next start replays the change log, which still holds it.
            log.error("shutdown checkpoint failed: %s", error)
        finally:
            self.store.close()
            self._lock_file.close()
