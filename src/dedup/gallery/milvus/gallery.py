"""The Milvus backend: registrations in Milvus collections, shared by stateless dedup nodes.

Collections (their names start with a configurable prefix, default "dedup"):
- `{prefix}_registrations`: a row per registration: `key` (INT64 primary key), the
  registration's fields, `state` (PENDING while an enrolment is being confirmed, ACTIVE once
  it was acknowledged), `claimed_at_us`, and the `embedding` (FLOAT_VECTOR, inner product).
- `{prefix}_audit`: the audit trail, one hash chain per node process (`chain`, `seq`).
- `{prefix}_adjudications`: settled pairs, under both orders.
Milvus needs a vector field in every collection: the last two hold a 2-d placeholder.

Milvus has no transactions, so an enrolment claims, rechecks, then commits:
1. its row is inserted PENDING;
2. it looks at the other live rows: ACTIVE ones, and PENDING ones claimed less than
   claim_timeout_s ago. A row holding its registration_id or msisdn, or one that would turn
   its verdict into one that does not enrol (a duplicate, a review, the SIM limit), is a
   conflict;
3. against an ACTIVE conflict it loses. Between two PENDING claims the earlier
   (claimed_at_us, then key) wins: the later removes its row and answers as if the earlier
   had been enrolled; the earlier waits until the later has resolved (removed itself, or
   committed because it never saw the earlier one: then the earlier loses to it) and looks
   again;
4. it commits (the row becomes ACTIVE) and only then is the call acknowledged.
Every read is Strong: a write acknowledged on any node is seen by every read that starts
after it. Each claim inserts before it looks, so of two concurrent claims at least one sees
the other: at most one enrols. Waits only go from earlier to later claims, so they end.
A node that dies mid-claim leaves a PENDING row, which others ignore after claim_timeout_s
and reap; a claim not confirmed within half of that is removed and answered UNAVAILABLE
(this assumes node clocks agree to well within half the timeout, as NTP keeps them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from dedup.core.adjudication import Adjudication
from dedup.core.audit_chain import GENESIS, AuditMaker, RecordMaker
from dedup.core.errors import (
    AlreadyExists,
    BackendUnavailable,
    ConfigError,
    FailedPrecondition,
    StoreError,
    msisdn_taken,
    registration_id_taken,
)
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
    Progress,
    SweepSearch,
    widening_neighbours,
)

log = logging.getLogger("dedup.milvus")

PENDING, ACTIVE = 0, 1
# Milvus's largest top-k.
MAX_TOPK = 16_384
POLL_S = 0.02
STATS_TTL_S = 30.0
REAP_EVERY_S = 10.0
PLACEHOLDER = [1.0, 0.0]
REGISTRATION_FIELDS = ["registration_id", "id_number", "msisdn", "carrier", "region",
                       "enrolled_at_us", "embedding_model"]
ROW_FIELDS = ["key", *REGISTRATION_FIELDS, "state", "claimed_at_us"]
# Scalar fields the backend filters on by equality: inverted indexes in a Milvus cluster
# (Milvus Lite scans either way: 17 ms a lookup at 20,000 rows with or without, measured).
LOOKUP_FIELDS = ["registration_id", "id_number", "msisdn", "state"]
# VARCHAR lengths in bytes: the request limits in characters, four bytes each in UTF-8.
VARCHAR_BYTES = {"registration_id": 512, "id_number": 256, "msisdn": 128, "carrier": 256,
                 "region": 256, "embedding_model": 256}
DELETE_FIELDS = {DeleteKey.REGISTRATION_ID: "registration_id",
                 DeleteKey.ID_NUMBER: "id_number", DeleteKey.MSISDN: "msisdn"}
MAX_RECORD_BYTES = 65_535

_P = ParamSpec("_P")
_T = TypeVar("_T")


def client_uri(uri: str) -> str:
    """milvus://host:port -> http://host:port; other URIs and Lite paths unchanged."""
    return "http://" + uri.removeprefix("milvus://") if uri.startswith("milvus://") else uri


def _connect(config: MilvusConfig) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as error:
        raise ConfigError("the milvus backend needs pymilvus (pip install 'dedup[milvus]'; "
                         "milvus-lite too for a local .db file)") from error
    uri = client_uri(config.uri)
    if config.is_lite:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, token=config.token)
    except Exception as error:
        raise StoreError(f"cannot connect to Milvus at {config.uri}: {error}") from error


def _unavailable(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Milvus's own errors (unreachable, timed out, refused) become BackendUnavailable,
    also while a generator method is being iterated."""

    def translated(error: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"milvus: {getattr(error, 'message', error)} "
                                  f"(code {getattr(error, 'code', '?')})")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def iterate(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            from pymilvus.exceptions import MilvusException

            try:
                yield from method(*args, **kwargs)
            except MilvusException as error:
                raise translated(error) from error

        return iterate

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        from pymilvus.exceptions import MilvusException

        try:
            return method(*args, **kwargs)
        except MilvusException as error:
            raise translated(error) from error

    return call


def _pages(client: Any, collection: str, where: str, fields: list[str], block: int
           ) -> Iterator[list[dict[str, Any]]]:
    """Every row matching `where`, `block` at a time, in ascending key order (pymilvus's
    iterator; a query with a limit returns any matching rows, not the first ones)."""
    iterator = client.query_iterator(collection, batch_size=block, filter=where,
                                     output_fields=["key", *fields])
    try:
        while page := iterator.next():
            # Rows materialise lazily by position: copy them out of the result list.
            yield [dict(entity) for entity in page]
    finally:
        iterator.close()


def read_audit_chains(config: MilvusConfig) -> dict[str, list[tuple[int, bytes]]]:
    """Every node chain's audit records by sequence, read without creating anything."""
    client = _connect(config)
    try:
        collection = f"{config.prefix}_audit"
        if not client.has_collection(collection):
            raise StoreError(f"milvus at {config.uri}: no audit collection {collection}")
        client.load_collection(collection)
        chains: dict[str, list[tuple[int, bytes]]] = {}
        for page in _pages(client, collection, "seq > 0", ["chain", "seq", "record"], 10_000):
            for entity in page:
                chains.setdefault(entity["chain"], []).append(
                    (int(entity["seq"]), entity["record"].encode()))
        return {chain: sorted(records) for chain, records in chains.items()}
    finally:
        client.close()


def literal(value: str) -> str:
    """A string as a Milvus filter literal: quoted, with quotes and backslashes escaped."""
    return json.dumps(value, ensure_ascii=False)


def _now_us() -> int:
    return time.time_ns() // 1000


def _new_key() -> int:
    return secrets.randbits(63) or 1


def _stable_key(*parts: str) -> int:
    """A primary key derived from `parts`, so that writing the same thing again upserts it."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _registration(entity: dict[str, Any]) -> Registration:
    return Registration(**{name: entity[name] for name in REGISTRATION_FIELDS})


def _entity(key: int, registration: Registration, state: int, claimed_at_us: int,
            vector: Vector) -> dict[str, Any]:
    return dataclasses.asdict(registration) | {
        "key": key, "state": state, "claimed_at_us": claimed_at_us,
        "embedding": vector.tolist()}


@dataclass(frozen=True)
class _Row:
    key: int
    registration: Registration
    state: int
    claimed_at_us: int
    score: float = 0.0
    vector: Vector | None = None

    def before(self, other: _Row) -> bool:
        """The earlier claim wins a conflict between two pending enrolments."""
        return (self.claimed_at_us, self.key) < (other.claimed_at_us, other.key)

    def scored(self) -> Scored:
        return Scored(self.key, self.registration, self.score)


class MilvusGallery:
    """The Milvus backend (see dedup.gallery.base.Gallery and this module's docstring)."""

    def __init__(self, config: MilvusConfig, model_id: str, dimension: int = DIMENSION,
                 data_dir: Path = DEFAULT_DATA_DIR, background: bool = True) -> None:
        self.config = config
        self.model_id = model_id
        self.dimension = dimension
        self.location = config.uri
        self.data_dir = Path(data_dir)  # the node's calibration file, nothing else
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.registrations = f"{config.prefix}_registrations"
        self.audit_collection = f"{config.prefix}_audit"
        self.adjudications = f"{config.prefix}_adjudications"
        self._client = _connect(config)
        self._create_collections()
        # This node's audit chain: records of one process link to each other.
        self.chain = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._audit_lock = threading.Lock()
        self._audit_head: tuple[int, bytes] = (0, GENESIS)
        self._wrote_at: float | None = None  # monotonic time of the first unflushed write
        self._compaction_due: float | None = None
        self._stats: tuple[float, int, dict[str, int]] | None = None
        self._closed = threading.Event()
        self._maintainer = threading.Thread(target=self._maintain, name="dedup-milvus",
                                            daemon=True)
        if background:
            self._maintainer.start()

    # -- collections -----------------------------------------------------------------

    def _create_collections(self) -> None:
        from pymilvus import DataType

        try:
            self._create(self.registrations, self._registration_schema(DataType),
                         "embedding", self.config.index_type, self.config.index_params,
                         LOOKUP_FIELDS)
            self._create(self.audit_collection, self._audit_schema(DataType), "placeholder",
                         "FLAT", {}, [])
            self._create(self.adjudications, self._adjudication_schema(DataType),
                         "placeholder", "FLAT", {}, ["first"])
        except StoreError:
            raise
        except Exception as error:
            raise StoreError(f"milvus at {self.config.uri}: cannot create or load the "
                             f"collections ({error})") from error
        self._check_dimension()

    def _create(self, name: str, schema: Any, vector_field: str, index_type: str,
                params: dict[str, Any], lookups: list[str]) -> None:
        if not self._client.has_collection(name):
            self._client.create_collection(name, schema=schema, consistency_level="Strong")
            index = self._client.prepare_index_params()
            index.add_index(vector_field, index_type=index_type, metric_type="IP",
                            params=params)
            for field_name in lookups:  # equality filters on them, on every call
                index.add_index(field_name, index_type="INVERTED")
            # The collection is empty: nothing to wait for (pymilvus would poll every 0.5 s).
            self._client.create_index(name, index, sync=False)
            log.info("created the Milvus collection %s", name)
        self._client.load_collection(name)

    def _registration_schema(self, types: Any) -> Any:
        schema = self._client.create_schema(auto_id=False)
        schema.add_field("key", types.INT64, is_primary=True)
        for name, size in VARCHAR_BYTES.items():
            schema.add_field(name, types.VARCHAR, max_length=size)
        schema.add_field("enrolled_at_us", types.INT64)
        schema.add_field("state", types.INT8)
        schema.add_field("claimed_at_us", types.INT64)
        schema.add_field("embedding", types.FLOAT_VECTOR, dim=self.dimension)
        return schema

    def _audit_schema(self, types: Any) -> Any:
        schema = self._client.create_schema(auto_id=False)
        schema.add_field("key", types.INT64, is_primary=True)
        schema.add_field("chain", types.VARCHAR, max_length=256)
        schema.add_field("seq", types.INT64)
        schema.add_field("record", types.VARCHAR, max_length=MAX_RECORD_BYTES)
        schema.add_field("placeholder", types.FLOAT_VECTOR, dim=len(PLACEHOLDER))
        return schema

    def _adjudication_schema(self, types: Any) -> Any:
        schema = self._client.create_schema(auto_id=False)
        schema.add_field("key", types.INT64, is_primary=True)
        schema.add_field("first", types.VARCHAR, max_length=512)
        schema.add_field("second", types.VARCHAR, max_length=512)
        schema.add_field("record", types.VARCHAR, max_length=MAX_RECORD_BYTES)
        schema.add_field("placeholder", types.FLOAT_VECTOR, dim=len(PLACEHOLDER))
        return schema

    def _check_dimension(self) -> None:
        described = self._client.describe_collection(self.registrations)
        for column in described["fields"]:
            if column["name"] == "embedding":
                dimension = int(column["params"]["dim"])
                if dimension != self.dimension:
                    raise StoreError(f"milvus collection {self.registrations} holds "
                                     f"{dimension}-d embeddings, the model makes "
                                     f"{self.dimension}-d ones")

    # -- filters and row access ------------------------------------------------------

    def _live(self, pending: bool, exclude: int | None = None) -> str:
        """Rows a read counts: ACTIVE ones, and with `pending` the recent claims too."""
        if not pending:
            return f"state == {ACTIVE}"
        cutoff = _now_us() - int(self.config.claim_timeout_s * 1e6)
        text = f"(state == {ACTIVE} or claimed_at_us >= {cutoff})"
        return text if exclude is None else f"{text} and key != {exclude}"

    def _ours(self) -> str:
        return f"embedding_model == {literal(self.model_id)}"

    def _query(self, where: str, vectors: bool = False) -> list[dict[str, Any]]:
        fields = [*ROW_FIELDS, "embedding"] if vectors else ROW_FIELDS
        return [dict(entity) for entity in self._client.query(
            self.registrations, filter=where, output_fields=fields,
            consistency_level="Strong")]

    def _row(self, entity: dict[str, Any], score: float = 0.0) -> _Row:
        vector = entity.get("embedding")
        return _Row(int(entity["key"]), _registration(entity), int(entity["state"]),
                    int(entity["claimed_at_us"]), score,
                    None if vector is None else np.asarray(vector, np.float32))

    def _search(self, queries: list[list[float]], k: int, where: str) -> list[list[_Row]]:
        exact = self.config.exact
        limit = min(k if exact else max(k, self.config.rerank_candidates), MAX_TOPK)
        fields = ROW_FIELDS if exact else [*ROW_FIELDS, "embedding"]
        found = self._client.search(
            self.registrations, data=queries, limit=limit, filter=where,
            output_fields=fields, consistency_level="Strong",
            search_params={"metric_type": "IP", "params": self.config.search_params})
        rows = []
        for query, hits in zip(queries, found, strict=True):
            near = [self._row(hit["entity"] | {"key": hit["key"]}, float(hit["distance"]))
                    for hit in hits]
            if not exact:  # verdicts never rest on approximate scores
                probe = np.asarray(query, np.float32)
                near = [dataclasses.replace(row, score=float(row.vector @ probe))
                        for row in near if row.vector is not None]
            near.sort(key=lambda row: (-row.score, row.key))
            rows.append(near)
        return rows

    # -- reads -----------------------------------------------------------------------

    @_unavailable
    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        """As EmbeddedGallery.neighbours: the best one always, the rest scoring >= floor."""
        return [row.scored() for row in self._neighbour_rows(vector, k, floor, False, None)]

    def _neighbour_rows(self, vector: Vector, k: int, floor: float, pending: bool,
                        exclude: int | None) -> list[_Row]:
        where = f"{self._live(pending, exclude)} and {self._ours()}"
        rows = self._search([vector.tolist()], k, where)[0][:k]
        return [row for i, row in enumerate(rows) if i == 0 or row.score >= floor]

    @_unavailable
    def neighbours_of_many(self, queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]:
        where = f"{self._live(False)} and {self._ours()}"
        found = self._search([query.tolist() for query in queries], k, where)
        return [[(row.key, row.score) for row in rows[:k] if row.score >= floor]
                for rows in found]

    @_unavailable
    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        return [row.scored() for row in self._same_id_rows(vector, id_number, False, None)]

    def _same_id_rows(self, vector: Vector, id_number: str, pending: bool,
                      exclude: int | None) -> list[_Row]:
        if not id_number:
            return []
        where = f"id_number == {literal(id_number)} and {self._live(pending, exclude)}"
        rows = [self._row(entity) for entity in self._query(where, vectors=True)]
        return [dataclasses.replace(row, score=float(row.vector @ vector)) for row in rows
                if row.vector is not None and row.registration.embedding_model == self.model_id]

    @_unavailable
    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        where = f"id_number == {literal(id_number)} and {self._live(False)}"
        return [StoredFace(row.key, row.registration, row.vector)
                for row in map(self._row, self._query(where, vectors=True))]

    @_unavailable
    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        wanted = [int(key) for key in keys]
        if not wanted:
            return []
        where = f"key in {wanted} and {self._live(False)}"
        rows = {row.key: row for row in map(self._row, self._query(where, with_vectors))}
        return [StoredFace(key, rows[key].registration, rows[key].vector)
                for key in wanted if key in rows]

    @_unavailable
    def stored_face(self, registration_id: str) -> tuple[int, Registration, Vector] | None:
        rows = self._by_registration_id(registration_id, vectors=True)
        if not rows or rows[0].vector is None:
            return None
        return rows[0].key, rows[0].registration, rows[0].vector

    def _by_registration_id(self, registration_id: str, vectors: bool = False) -> list[_Row]:
        where = f"registration_id == {literal(registration_id)} and {self._live(False)}"
        return [self._row(entity) for entity in self._query(where, vectors)]

    @_unavailable
    def get(self, registration_id: str) -> Registration | None:
        rows = self._by_registration_id(registration_id)
        return rows[0].registration if rows else None

    @_unavailable
    def iter_vectors(self, block: int) -> Iterator[tuple[list[int], Matrix]]:
        where = f"{self._live(False)} and {self._ours()}"
        for page in _pages(self._client, self.registrations, where, ["embedding"], block):
            yield ([int(entity["key"]) for entity in page],
                   np.asarray([entity["embedding"] for entity in page], np.float32))

    def _count(self, where: str) -> int:
        found = self._client.query(self.registrations, filter=where,
                                   output_fields=["count(*)"], consistency_level="Strong")
        return int(found[0]["count(*)"])

    @_unavailable
    def comparable_count(self) -> int:
        return self._count(f"{self._live(False)} and {self._ours()}")

    @_unavailable
    def stats(self) -> GalleryStats:
        count = self._count(self._live(False))
        distinct, by_model = self._distinct()
        return GalleryStats(
            registrations=count, distinct_id_numbers=distinct,
            index_type=f"milvus:{self.config.index_type}", dimension=self.dimension,
            index_vectors=self.comparable_count(), store_sequence=0,
            checkpoint_sequence=0, registrations_by_model=by_model)

    def _distinct(self) -> tuple[int, dict[str, int]]:
        """Distinct ID numbers and registrations per model: Milvus cannot count distinct
        values, so one scan of two columns, reused for STATS_TTL_S."""
        cached = self._stats
        if cached is not None and time.monotonic() - cached[0] < STATS_TTL_S:
            return cached[1], cached[2]
        id_numbers: set[str] = set()
        by_model: dict[str, int] = {}
        for page in _pages(self._client, self.registrations, self._live(False),
                                ["id_number", "embedding_model"], 10_000):
            for entity in page:
                id_numbers.add(entity["id_number"])
                model = entity["embedding_model"]
                by_model[model] = by_model.get(model, 0) + 1
        self._stats = (time.monotonic(), len(id_numbers), by_model)
        return len(id_numbers), by_model

    def index_status(self) -> IndexStatus:
        kind = self.config.index_type
        return IndexStatus(
            index_type=f"milvus:{kind}", dimension=self.dimension,
            vectors=self.comparable_count(), exact=self.config.exact,
            rerank_candidates=0 if self.config.exact else self.config.rerank_candidates,
            search_parameters=json.dumps(self.config.search_params, sort_keys=True)
            if self.config.search_params else "",
            configured_index_type=kind, wanted_index_type=kind, rebuilding=False,
            store_sequence=0, checkpoint_sequence=0,
            bytes_per_vector=4.0 * self.dimension if self.config.exact else 0.0)

    @_unavailable
    def gauges(self) -> list[Gauge]:
        return [
            Gauge("dedup_registrations", "registrations in Milvus", self._count(self._live(False))),
            Gauge("dedup_milvus_pending_claims",
                  "enrolments being confirmed (PENDING rows, all nodes)",
                  self._count(f"state == {PENDING}"))]

    def sweep_search(self, min_score: float) -> SweepSearch:
        # Candidates are re-scored exactly from the stored embeddings, whatever the index.
        return lambda matrix: widening_neighbours(self, matrix, min_score)

    @_unavailable
    def settled(self, registration_id: str) -> dict[str, bytes]:
        if not registration_id:
            return {}
        found = self._client.query(self.adjudications,
                                   filter=f"first == {literal(registration_id)}",
                                   output_fields=["second", "record"],
                                   consistency_level="Strong")
        return {entity["second"]: entity["record"].encode() for entity in found}

    # -- writes ----------------------------------------------------------------------

    @_unavailable
    def ensure_unique(self, registration: Registration) -> None:
        for row in self._holders(registration, pending=False, exclude=None):
            raise self._taken(row, registration)

    def _holders(self, registration: Registration, pending: bool,
                 exclude: int | None) -> list[_Row]:
        """Live rows other than `exclude` holding the registration_id or msisdn."""
        keys = f"registration_id == {literal(registration.registration_id)}"
        if registration.msisdn:
            keys = f"({keys} or msisdn == {literal(registration.msisdn)})"
        return [self._row(entity)
                for entity in self._query(f"{keys} and {self._live(pending, exclude)}")]

    @staticmethod
    def _taken(row: _Row, registration: Registration) -> AlreadyExists:
        if row.registration.registration_id == registration.registration_id:
            return registration_id_taken(registration.registration_id)
        return msisdn_taken(registration.msisdn)

    @_unavailable
    def insert(self, registration: Registration, vector: Vector) -> Registration:
        claim, started = self._stake(registration, vector)
        with self._withdrawn_on_failure(claim):
            while waiting := self._key_rivals(claim):  # a lost key raises ALREADY_EXISTS
                self._wait_for(waiting, started)
            self._commit(claim, vector, started)
        return claim.registration

    @_unavailable
    def insert_checked(self, registration: Registration, vector: Vector,
                       check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]:
        claim, started = self._stake(registration, vector)
        with self._withdrawn_on_failure(claim):
            result, won = self._contest(claim, vector, check, started)
            if not won:
                self._remove(claim.key)
                return result, None
            self._commit(claim, vector, started)
        return result, claim.registration

    def _stake(self, registration: Registration, vector: Vector) -> tuple[_Row, float]:
        """Inserts the enrolment as a PENDING claim; returns it and when it was staked."""
        now = _now_us()
        stamped = dataclasses.replace(registration, embedding_model=self.model_id,
                                      enrolled_at_us=now)
        claim = _Row(_new_key(), stamped, PENDING, now)
        started = time.monotonic()
        self._upsert(claim, vector)
        return claim, started

    @contextmanager
    def _withdrawn_on_failure(self, claim: _Row) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._remove_quietly(claim.key)
            raise

    def _commit(self, claim: _Row, vector: Vector, started: float) -> None:
        self._within_claim_time(started)
        self._upsert(dataclasses.replace(claim, state=ACTIVE), vector)
        self._stats = None

    def _key_rivals(self, claim: _Row) -> set[int]:
        """Later pending claims of its registration_id or msisdn, to wait for; a committed
        or earlier holder raises ALREADY_EXISTS."""
        waiting = set()
        for row in self._holders(claim.registration, pending=True, exclude=claim.key):
            if row.state == ACTIVE or row.before(claim):
                raise self._taken(row, claim.registration)
            waiting.add(row.key)
        return waiting

    def _contest(self, claim: _Row, vector: Vector, check: EnrolmentCheck, started: float
                 ) -> tuple[CheckResult, bool]:
        """Judges again until this claim has won (True) or lost, with the verdict."""
        while True:
            self._within_claim_time(started)
            waiting = self._key_rivals(claim)
            result = self._judge(claim, vector, check, pending=False)[0]
            if not check.admits(result):
                return result, False
            with_pending, candidates, same_id = self._judge(claim, vector, check, pending=True)
            if not check.admits(with_pending):
                rivals = [row for row in candidates + same_id if row.state == PENDING]
                if any(row.before(claim) for row in rivals):
                    return with_pending, False
                waiting.update(row.key for row in rivals)
            if not waiting:
                return result, True
            self._wait_for(waiting, started)

    def _judge(self, claim: _Row, vector: Vector, check: EnrolmentCheck, pending: bool
               ) -> tuple[CheckResult, list[_Row], list[_Row]]:
        """The verdict over the other live rows (with `pending`, recent claims too), and the
        candidate and same-ID rows it rests on."""
        same_id = self._same_id_rows(vector, check.claimed_id_number, pending, claim.key)
        candidates = self._neighbour_rows(vector, check.search_k + len(same_id), check.floor,
                                          pending, claim.key)
        result = check.judge([row.scored() for row in candidates],
                             [row.scored() for row in same_id])
        return result, candidates, same_id

    def _wait_for(self, keys: set[int], started: float) -> None:
        """Until none of `keys` is a recent PENDING claim any more."""
        while True:
            where = f"key in {sorted(keys)} and {self._live(True)} and state == {PENDING}"
            if not self._client.query(self.registrations, filter=where,
                                      output_fields=["key"], consistency_level="Strong"):
                return
            self._within_claim_time(started)
            time.sleep(POLL_S)

    def _within_claim_time(self, started: float) -> None:
        # Others ignore a claim after claim_timeout_s; committing past half of it could
        # race one that already does.
        if time.monotonic() - started > self.config.claim_timeout_s / 2:
            raise BackendUnavailable(
                "milvus: the enrolment could not be confirmed against concurrent enrolments "
                f"within {self.config.claim_timeout_s / 2:.0f} s; nothing was stored, retry")

    def _upsert(self, row: _Row, vector: Vector) -> None:
        self._client.upsert(self.registrations, [
            _entity(row.key, row.registration, row.state, row.claimed_at_us, vector)])
        self._wrote()

    def _wrote(self) -> None:
        if self._wrote_at is None:
            self._wrote_at = time.monotonic()

    def _remove(self, key: int) -> None:
        self._client.delete(self.registrations, ids=[key])
        self._wrote()

    def _remove_quietly(self, key: int) -> None:
        try:
            self._remove(key)
        except Exception:  # the claim expires and is reaped: nobody counts it meanwhile
            log.exception("could not remove the abandoned claim %d", key)

    def insert_rows(self, rows: list[tuple[int, Registration, Vector]]) -> None:
        """Stores ACTIVE rows under the given keys (migration: idempotent, resumable)."""
        self._client.upsert(self.registrations, [
            _entity(key, registration, ACTIVE, 0, vector) for key, registration, vector in rows])
        self._wrote()
        self._stats = None

    @_unavailable
    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None) -> Erasure:
        """Erases every ACTIVE registration under one key. Without a transaction, the audit
        record is written first: a record whose erasure then fails is followed by the
        caller's retry and its own record."""
        where = f"{DELETE_FIELDS[by]} == {literal(value)} and {self._live(False)}"
        rows = [self._row(entity) for entity in self._query(where)]
        if not rows:
            return Erasure([], None, None)
        erased = [row.registration for row in rows]
        digest = None
        if audit is not None:
            ids = [registration.registration_id for registration in erased]
            digest = self.append_audit(lambda seq, prev: audit(seq, prev, ids))
        self._client.delete(self.registrations, ids=[row.key for row in rows])
        self._wrote()
        self._stats = None
        if self._compaction_due is None:
            self._compaction_due = time.time() + self.config.compact_delay_s
        return Erasure(erased, digest, self._compaction_due)

    @_unavailable
    def settle(self, first: str, second: str, record: bytes, audit: RecordMaker) -> bytes:
        digest = self.append_audit(audit)
        text = record.decode()
        self._client.upsert(self.adjudications, [
            {"key": _stable_key(a, b), "first": a, "second": b, "record": text,
             "placeholder": PLACEHOLDER} for a, b in ((first, second), (second, first))])
        return digest

    @_unavailable
    def append_audit(self, make: RecordMaker) -> bytes:
        with self._audit_lock:
            sequence, previous = self._audit_head
            record, digest = make(sequence + 1, previous)
            if len(record) > MAX_RECORD_BYTES:
                raise BackendUnavailable(f"audit: the record is {len(record):,} bytes, Milvus "
                                         f"holds at most {MAX_RECORD_BYTES:,}")
            self._client.insert(self.audit_collection, [{
                "key": _new_key(), "chain": self.chain, "seq": sequence + 1,
                "record": record.decode(), "placeholder": PLACEHOLDER}])
            self._audit_head = (sequence + 1, digest)
            return digest

    def import_audit(self, chain: str, records: Iterable[tuple[int, bytes]]) -> int:
        """Copies records of another chain (a migrated data directory's) unchanged."""
        rows = [{"key": _stable_key(chain, str(sequence)), "chain": chain, "seq": sequence,
                 "record": record.decode(), "placeholder": PLACEHOLDER}
                for sequence, record in records]
        if rows:
            self._client.upsert(self.audit_collection, rows)
        return len(rows)

    def import_adjudications(self, records: Iterable[bytes]) -> int:
        rows = []
        for record in records:
            pair = Adjudication.decode(record)
            first, second = pair.registration_id, pair.matched_registration_id
            rows += [{"key": _stable_key(a, b), "first": a, "second": b,
                      "record": record.decode(), "placeholder": PLACEHOLDER}
                     for a, b in ((first, second), (second, first))]
        if rows:
            self._client.upsert(self.adjudications, rows)
        return len(rows) // 2

    # -- administration --------------------------------------------------------------

    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus:
        raise FailedPrecondition(
            f"index_factory: with the milvus backend Milvus builds and maintains the index "
            f"({self.config.index_type}); change it with Milvus's own tools")

    @_unavailable
    def compact(self) -> tuple[int, int]:
        """Asks Milvus to rewrite segments without deleted rows. Milvus reports no sizes."""
        self._client.compact(self.registrations)
        self._compaction_due = None
        return 0, 0

    @_unavailable
    def checkpoint(self, covering: int | None = None) -> int:
        """Flushes: Milvus seals the growing segments into its object storage."""
        self._flush()
        return 0

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.uri)

    def _flush(self) -> None:
        self._wrote_at = None
        self._client.flush(self.registrations)

    def _maintain(self) -> None:
        """Background: Lite flushes, reaping dead claims, compaction after erasures."""
        reaped = time.monotonic()
        while not self._closed.wait(0.2):
            try:
                interval = self.config.flush_interval_s
                wrote = self._wrote_at
                if interval is not None and wrote is not None and \
                        time.monotonic() - wrote >= interval:
                    self._flush()
                if time.monotonic() - reaped >= REAP_EVERY_S:
                    reaped = time.monotonic()
                    self._reap()
                due = self._compaction_due
                if due is not None and time.time() >= due:
                    self.compact()
            except Exception:  # Milvus holds the data; a failure here only costs time
                log.exception("background Milvus maintenance failed")

    def _reap(self) -> None:
        cutoff = _now_us() - int(2 * self.config.claim_timeout_s * 1e6)
        where = f"state == {PENDING} and claimed_at_us < {cutoff}"
        dead = self._client.query(self.registrations, filter=where, output_fields=["key"],
                                  consistency_level="Strong")
        if dead:
            self._client.delete(self.registrations, ids=[int(row["key"]) for row in dead])
            log.warning("removed %d abandoned enrolment claim(s)", len(dead))

    def close(self, checkpoint: bool = True) -> None:
        self._closed.set()
        if self._maintainer.is_alive():
            self._maintainer.join()
        try:
            if checkpoint and self.config.is_lite and self._wrote_at is not None:
                self._flush()
        finally:
            self._client.close()
