"""What the service needs from where registrations live: the interface both backends keep.

Two backends implement it: `EmbeddedGallery` (embedded: LMDB, the source of truth, with a FAISS
index derived from it, in one process) and `MilvusGallery` (a Milvus collection shared by
stateless dedup nodes). The service logic, the gRPC servicers, investigations and metrics
use only this interface; `tests/` runs the same service-level suite against both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.errors import DedupError
from dedup.core.policy import Scored
from dedup.core.records import CheckResult, DeleteKey, Registration, StoredFace
from dedup.core.vectors import Matrix, Vector

Progress = Callable[[str, int, int], None]
# One side of a settled pair: an enrolled registration's int64 key, or the registration_id
# of an application that was not enrolled when it was settled (a refused one).
Party = int | str
# One row's neighbours as (key, exact score), best first.
Neighbours = list[tuple[int, float]]
# For an all-pairs sweep: (the rows' keys, in key order; their vectors) -> per row, its
# neighbours >= the job's score.
SweepSearch = Callable[[Sequence[int], Matrix], list[Neighbours]]


@dataclass(frozen=True)
class GalleryStats:
    registrations: int
    distinct_id_numbers: int
    index_type: str
    dimension: int
    index_vectors: int
    store_sequence: int
    checkpoint_sequence: int
    registrations_by_model: dict[str, int]


@dataclass(frozen=True)
class IndexStatus:
    index_type: str
    dimension: int
    vectors: int
    exact: bool
    rerank_candidates: int
    search_parameters: str
    configured_index_type: str
    wanted_index_type: str
    rebuilding: bool
    store_sequence: int
    checkpoint_sequence: int
    bytes_per_vector: float


@dataclass(frozen=True)
class Erasure:
    registrations: list[Registration]
    audit_hash: bytes | None
    compaction_due: float | None
    checkpoint_due: float | None = None


@dataclass(frozen=True)
class EnrolmentCheck:
    """The check an enrolment with check_first must pass, as one step with its insert.

    The backend looks up `same_id` (every registration under `claimed_id_number`, scored
    1:1) and the `search_k + len(same_id)` nearest registrations scoring >= floor, then asks
    `judge`; the registration is stored only if `admits` the verdict, and no other
    enrolment that would change that verdict may be stored meanwhile, on any node.
    """

    claimed_id_number: str
    search_k: int
    floor: float
    judge: Callable[[list[Scored], list[Scored]], CheckResult]
    admits: Callable[[CheckResult], bool]


@dataclass(frozen=True)
class Gauge:
    name: str
    help: str
    value: float


class Gallery(Protocol):
    """Registrations, their embeddings, lookups, audit records and adjudications."""

    model_id: str
    dimension: int
    # Where the data lives, for Stats (a data directory or a Milvus URI).
    location: str
    # Local files of the node (calibration); for Milvus nothing that must be backed up.
    data_dir: Path
    # Whether each read waits on a server (Milvus: a Strong read waits for its next time
    # tick), so that the service issues the reads of a Check that do not depend on one
    # another at once.
    reads_wait: bool

    # -- reads -----------------------------------------------------------------------
    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]: ...
    def neighbours_of_many(self, queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]: ...
    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]: ...
    def faces_of_id_number(self, id_number: str) -> list[StoredFace]: ...
    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]: ...
    def stored_face(self, registration_id: str) -> tuple[int, Registration, Vector] | None: ...
    def get(self, registration_id: str) -> Registration | None: ...
    def iter_vectors(self, block: int) -> Iterator[tuple[list[int], Matrix]]:
        """The server model's embeddings in ascending key order."""
        ...
    def comparable_count(self) -> int: ...
    def stats(self) -> GalleryStats: ...
    def index_status(self) -> IndexStatus: ...
    def gauges(self) -> list[Gauge]: ...
    def settled(self, party: Party) -> dict[int, bytes]:
        """The key of every enrolled registration settled with `party` -> the record."""
        ...
    def audit_head(self) -> tuple[str, int, bytes]:
        """(this process's chain name, "" for the one chain of a data directory; its last
        sequence; its last hash)."""
        ...
    def sweep_search(self, min_score: float, threads: int = 0) -> SweepSearch:
        """For a sweep over the whole gallery in key order (FindClusters): of each row, every
        neighbour with a higher key scoring >= min_score (exact scores; lower keys may come
        too: each pair needs to be seen from one side). May build job-local structures
        first, and scan on `threads` threads (0: one a core)."""
        ...

    # -- writes ----------------------------------------------------------------------
    def ensure_unique(self, registration: Registration) -> None: ...
    def insert(self, registration: Registration, vector: Vector) -> Registration: ...
    def insert_each(self, batch: list[tuple[Registration, Vector]]
                    ) -> list[Registration | DedupError]:
        """Stores each registration as `insert` would, as if one after another: one
        outcome per item, in order (the stored registration, or why it was not stored)."""
        ...
    def insert_checked(self, registration: Registration, vector: Vector,
                       check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]: ...
    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None
               ) -> Erasure:
        """Erases every registration under one key, and every settlement naming one."""
        ...
    def settle(self, checked: Party, matched: int, record: bytes, audit: RecordMaker
               ) -> bytes:
        """Stores a settled pair with its audit record; NotFound if a registration it names
        by key is gone meanwhile."""
        ...
    def append_audit(self, make: RecordMaker) -> bytes: ...

    # -- administration --------------------------------------------------------------
    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus: ...
    def compact(self) -> tuple[int, int]: ...
    def checkpoint(self, covering: int | None = None) -> int: ...
    @property
    def checkpoint_path(self) -> Path: ...
    def close(self, checkpoint: bool = True) -> None: ...


def widening_neighbours(gallery: Gallery, matrix: Matrix, min_score: float, first_k: int = 32
                        ) -> list[Neighbours]:
    """Every neighbour >= min_score through `neighbours_of_many`: k widens for the rare query
    whose k-th neighbour still scores above it."""
    rows = gallery.neighbours_of_many(matrix, first_k, min_score)
    return widened(rows, lambda i, k: gallery.neighbours_of_many(matrix[i:i + 1], k,
                                                                 min_score)[0],
                   first_k, 10_000)


def widened(rows: list[Neighbours], search_one: Callable[[int, int], Neighbours], first_k: int,
            max_k: int) -> list[Neighbours]:
    """`rows` (from a search for `first_k` each, keeping only those >= the score), each row
    that kept all it was given searched again (`search_one(row, k)`) for 4 times as many,
    up to `max_k`."""
    for i, row in enumerate(rows):
        k = first_k
        while len(row) >= k and k < max_k:
            k *= 4
            row = search_one(i, k)
        rows[i] = row
    return rows
