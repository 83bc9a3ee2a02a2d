"""The Milvus backend: registrations in Milvus collections, shared by stateless dedup nodes.

Collections (their names start with a configurable prefix, default "dedup"; see schema.py):
- `{prefix}_registrations`: a row per registration: `key` (INT64 primary key), the
  registration's fields, `state` (PENDING while an enrolment is being confirmed, ACTIVE once
  it was acknowledged), `claimed_at_us`, and the `embedding` (FLOAT_VECTOR, inner product).
- `{prefix}_audit`: the audit trail, one hash chain per node process (`chain`, `seq`).
- `{prefix}_settlements`: settled pairs, under both orders, keyed by the registrations' keys
  (a `{prefix}_adjudications` collection of an older version, keyed by registration_id, is
  converted into it and dropped at start).
Milvus has no transactions: enrolments claim, recheck, then commit (see claims.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.errors import DedupError, FailedPrecondition, NotFound
from dedup.core.files import private_dir
from dedup.core.policy import Scored
from dedup.core.records import CheckResult, DeleteKey, Registration, StoredFace
from dedup.core.settings import DEFAULT_DATA_DIR, DIMENSION, MilvusConfig
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
from dedup.gallery.milvus import status
from dedup.gallery.milvus.adjudications import Adjudications
from dedup.gallery.milvus.audit import AuditChain
from dedup.gallery.milvus.claims import Claims
from dedup.gallery.milvus.connection import connect, unavailable
from dedup.gallery.milvus.filters import DELETE_FIELDS, equals
from dedup.gallery.milvus.lite import guarded
from dedup.gallery.milvus.maintenance import Maintenance
from dedup.gallery.milvus.registrations import Registrations
from dedup.gallery.milvus.schema import Row, open_collections
from dedup.gallery.milvus.version import server_version

log = logging.getLogger("dedup.milvus")


class MilvusGallery:
    """The Milvus backend (see dedup.gallery.base.Gallery and this module's docstring)."""

    def __init__(self, config: MilvusConfig, model_id: str, dimension: int = DIMENSION,
                 data_dir: Path = DEFAULT_DATA_DIR, background: bool = True) -> None:
        self.config = config
        self.model_id = model_id
        self.dimension = dimension
        self.location = config.uri
        self.reads_wait = True
        self.data_dir = Path(data_dir)  # the node's calibration file, nothing else
        private_dir(self.data_dir)
        client = connect(config)
        try:
            self.server = server_version(client)
            self._client = guarded(client, config.uri) if self.server.lite else client
            if self.server.lite and not config.is_lite:
                log.warning("%s at %s is a Milvus Lite server: safe for one dedup node only "
                            "(its flushes can hide rows from other processes' searches)",
                            self.server.name, config.uri)
            self.collections, config = open_collections(self._client, config, dimension,
                                                        self.server)
            self.config = config
            self._rows = Registrations(self._client, self.collections.registrations, config,
                                       model_id)
            self._stats = status.SharedStats(self._rows, self.dimension)
            self._claims = Claims(self._rows, self.server.orders_writes_by_timestamp)
            self._audit = AuditChain(self._client, self.collections.audit)
            self._adjudications = Adjudications(self._client, self.collections.adjudications)
            self._adjudications.convert_legacy(self.collections.legacy_adjudications,
                                               self._enrolled_key)
        except BaseException:  # nothing before Maintenance holds a thread or a file
            client.close()
            raise
        self._maintenance = Maintenance(self._rows, self._claims, config,
                                        (self.collections.adjudications,))
        if background:
            self._maintenance.start()

    # -- reads -----------------------------------------------------------------------

    @unavailable
    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        """As EmbeddedGallery.neighbours: the best one always, the rest scoring >= floor."""
        return [row.scored() for row in self._rows.neighbour_rows(vector, k, floor)]

    @unavailable
    def neighbours_of_many(self, queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]:
        found = self._rows.search([query.tolist() for query in queries], k,
                                  self._rows.comparable())
        return [[(row.key, row.score) for row in rows[:k] if row.score >= floor]
                for rows in found]

    @unavailable
    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        return [row.scored() for row in self._rows.same_id_rows(vector, id_number)]

    @unavailable
    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        where = f"{equals('id_number', id_number)} and {self._rows.live()}"
        return [StoredFace(row.key, row.registration, row.vector)
                for row in self._rows.rows(where, vectors=True)]

    @unavailable
    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        wanted = [int(key) for key in keys]
        if not wanted:
            return []
        where = f"key in {wanted} and {self._rows.live()}"
        rows = {row.key: row for row in self._rows.rows(where, with_vectors)}
        return [StoredFace(key, rows[key].registration, rows[key].vector)
                for key in wanted if key in rows]

    @unavailable
    def stored_face(self, registration_id: str) -> tuple[int, Registration, Vector] | None:
        rows = self._rows.by_registration_id(registration_id, vectors=True)
        if not rows or rows[0].vector is None:
            return None
        return rows[0].key, rows[0].registration, rows[0].vector

    @unavailable
    def get(self, registration_id: str) -> Registration | None:
        rows = self._rows.by_registration_id(registration_id)
        return rows[0].registration if rows else None

    @unavailable
    def iter_vectors(self, block: int) -> Iterator[tuple[list[int], Matrix]]:
        for page in self._rows.pages(self._rows.comparable(), ["embedding"], block):
            yield ([int(entity["key"]) for entity in page],
                   np.asarray([entity["embedding"] for entity in page], np.float32))

    @unavailable
    def keys_upto(self, last_key: int, block: int) -> npt.NDArray[np.int64]:
        """The keys of rows of any state up to `last_key`, ascending (a migration's check)."""
        pages = [np.fromiter((entity["key"] for entity in page), np.int64, len(page))
                 for page in self._rows.pages(f"key <= {int(last_key)}", [], block)]
        return np.concatenate(pages) if pages else np.empty(0, np.int64)

    @unavailable
    def count_keys_upto(self, last_key: int) -> int:
        """Rows of any state keyed up to `last_key` (what a migration copied so far)."""
        return self._rows.count(f"key <= {int(last_key)}")

    @unavailable
    def comparable_count(self) -> int:
        return self._rows.count(self._rows.comparable())

    @unavailable
    def stats(self) -> GalleryStats:
        return self._stats()

    @unavailable
    def index_status(self) -> IndexStatus:
        return status.index_status(self._rows, self.dimension)

    @unavailable
    def gauges(self) -> list[Gauge]:
        return status.gauges(self._rows)

    def sweep_search(self, min_score: float, threads: int = 0) -> SweepSearch:
        # Candidates are re-scored exactly from the stored embeddings, whatever the index.
        return lambda _keys, matrix: widening_neighbours(self, matrix, min_score)

    @unavailable
    def settled(self, party: Party) -> dict[int, bytes]:
        return self._adjudications.settled(party)

    def _enrolled_key(self, registration_id: str) -> int | None:
        rows = self._rows.by_registration_id(registration_id)
        return rows[0].key if rows else None

    def audit_head(self) -> tuple[str, int, bytes]:
        return (self._audit.name, *self._audit.head)

    # -- writes ----------------------------------------------------------------------

    @unavailable
    def ensure_unique(self, registration: Registration) -> None:
        self._claims.ensure_unique(registration)

    @unavailable
    def insert(self, registration: Registration, vector: Vector) -> Registration:
        return self._claims.enrol(registration, vector)

    @unavailable
    def insert_each(self, batch: list[tuple[Registration, Vector]]
                    ) -> list[Registration | DedupError]:
        return self._claims.enrol_each(batch)

    @unavailable
    def insert_checked(self, registration: Registration, vector: Vector,
                       check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]:
        return self._claims.enrol_checked(registration, vector, check)

    def _upsert(self, row: Row, vector: Vector) -> None:
        """Writes a row as it is (tests plant a dead node's claim with it)."""
        self._rows.upsert(row, vector)

    def insert_rows(self, rows: list[tuple[int, Registration, Vector]]) -> None:
        """Stores ACTIVE rows under the given keys (migration: idempotent, resumable)."""
        self._rows.upsert_active(rows)

    @unavailable
    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None) -> Erasure:
        """Erases every ACTIVE registration under one key. Without a transaction, the audit
        record is written first: a record whose erasure then fails is followed by the
        caller's retry and its own record."""
        rows = self._rows.rows(f"{equals(DELETE_FIELDS[by], value)} and {self._rows.live()}")
        if not rows:
            return Erasure([], None, None)
        erased = [row.registration for row in rows]
        ids = [registration.registration_id for registration in erased]
        digest = None
        if audit is not None:
            digest = self.append_audit(lambda seq, prev: audit(seq, prev, ids))
        # Settlements first: a Delete that fails between the two is retried, and the
        # registration must not outlive its erasure in a settlement.
        self._adjudications.forget([*(row.key for row in rows), *ids])
        self._rows.remove([row.key for row in rows], active=True)
        return Erasure(erased, digest, self._maintenance.compaction_after_erasure())

    @unavailable
    def settle(self, checked: Party, matched: int, record: bytes, audit: RecordMaker
               ) -> bytes:
        digest = self.append_audit(audit)
        self._adjudications.settle(checked, matched, record)
        keys = [party for party in (checked, matched) if isinstance(party, int)]
        if len(self._rows.keys(f"key in {keys} and {self._rows.live()}")) < len(keys):
            self._adjudications.forget(keys)  # erased meanwhile: no settlement outlives it
            raise NotFound("registration_id: a registration of the pair was erased meanwhile")
        return digest

    @unavailable
    def append_audit(self, make: RecordMaker) -> bytes:
        return self._audit.append(make)

    def import_audit(self, chain: str, records: Iterable[tuple[int, bytes]]) -> int:
        """Copies records of another chain (a migrated data directory's) unchanged."""
        return self._audit.import_chain(chain, records)

    def import_settlements(self, pairs: Iterable[tuple[Party, int, bytes]]) -> int:
        """Stores settled pairs under the given keys (migration keeps the store's keys)."""
        return self._adjudications.import_settlements(pairs)

    # -- administration --------------------------------------------------------------

    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus:
        raise FailedPrecondition(
            f"index_factory: with the milvus backend Milvus builds and maintains the index "
            f"({self.config.index_type}); change it with Milvus's own tools")

    @unavailable
    def compact(self) -> tuple[int, int]:
        """Asks Milvus to rewrite segments without deleted rows. Milvus reports no sizes."""
        self._maintenance.compact()
        return 0, 0

    @unavailable
    def checkpoint(self, covering: int | None = None) -> int:
        """Flushes: Milvus seals the growing segments into its object storage."""
        self._rows.flush()
        return 0

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.uri)

    def close(self, checkpoint: bool = True) -> None:
        self._maintenance.stop()
        try:
            if checkpoint and self.config.is_lite and self._rows.wrote_at is not None:
                self._rows.flush()
        finally:
            self._client.close()
