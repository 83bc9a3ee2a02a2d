"""The registrations collection read and written as rows: filtered queries, searches whose
verdict scores are exact, counts, writes, and what is not flushed yet."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from dedup.core.records import Registration
from dedup.core.settings import MilvusConfig
from dedup.core.vectors import Vector
from dedup.gallery.milvus.connection import pages
from dedup.gallery.milvus.filters import any_key_holders, equals, key_holders, live, same_model
from dedup.gallery.milvus.schema import ACTIVE, PENDING, Row, row_shape

# Milvus's largest top-k.
MAX_TOPK = 16_384
STATS_TTL_S = 30.0
# A Strong read sees every write acknowledged before it started, on any node: Milvus waits
# until the collection's data has caught up with the read's start (about one time tick,
# proxy.timeTickInterval). A Session read waits only for this process's own last write to
# the collection (pymilvus keeps its timestamp): a claim's first look after its stake needs
# no more, since every write acknowledged before the stake is older than it.
STRONG = "Strong"
SESSION = "Session"


class Registrations:
    """The rows of one registrations collection, as the model `model_id` reads them."""

    def __init__(self, client: Any, collection: str, config: MilvusConfig,
                 model_id: str) -> None:
        self.client = client
        self.collection = collection
        self.config = config
        self.model_id = model_id
        self.shape = row_shape(client, collection)
        self.wrote_at: float | None = None  # monotonic time of the first unflushed write
        self._distinct: tuple[float, int, dict[str, int]] | None = None
        self._active_writes = 0  # writes that changed the counts of registrations

    # -- filters ---------------------------------------------------------------------

    def live(self, pending: bool = False, exclude: int | None = None) -> str:
        """ACTIVE rows; with `pending` recent claims too (see filters.live)."""
        return live(pending, self.config.claim_timeout_s, exclude)

    def comparable(self, pending: bool = False, exclude: int | None = None) -> str:
        """Live rows whose embeddings this model made."""
        return f"{self.live(pending, exclude)} and {same_model(self.model_id)}"

    # -- reads -----------------------------------------------------------------------

    def rows(self, where: str, vectors: bool = False, consistency: str = STRONG
             ) -> list[Row]:
        fields = [*self.shape.fields, "embedding"] if vectors else self.shape.fields
        return [Row.of(dict(entity)) for entity in self.client.query(
            self.collection, filter=where, output_fields=fields,
            consistency_level=consistency)]

    def keys(self, where: str) -> list[int]:
        found = self.client.query(self.collection, filter=where, output_fields=["key"],
                                  consistency_level=STRONG)
        return [int(entity["key"]) for entity in found]

    def count(self, where: str) -> int:
        found = self.client.query(self.collection, filter=where,
                                  output_fields=["count(*)"], consistency_level=STRONG)
        return int(found[0]["count(*)"])

    def pages(self, where: str, fields: list[str], block: int
              ) -> Iterator[list[dict[str, Any]]]:
        return pages(self.client, self.collection, where, fields, block)

    def search(self, queries: list[list[float]], k: int, where: str,
               consistency: str = STRONG) -> list[list[Row]]:
        """Each query's best rows by score, best first; at least k when there are."""
        complete, scored = self.config.exact, self.config.scores_exact
        limit = min(k if complete else max(k, self.config.rerank_candidates), MAX_TOPK)
        fields = self.shape.fields if scored else [*self.shape.fields, "embedding"]
        found = self.client.search(
            self.collection, data=queries, limit=limit, filter=where,
            output_fields=fields, consistency_level=consistency,
            search_params={"metric_type": "IP", "params": self.config.search_params})
        return [self._ranked(query, hits, scored)
                for query, hits in zip(queries, found, strict=True)]

    @staticmethod
    def _ranked(query: list[float], hits: list[dict[str, Any]], scored: bool) -> list[Row]:
        near = [Row.of(hit["entity"] | {"key": hit["key"]}, float(hit["distance"]))
                for hit in hits]
        if not scored:  # verdicts never rest on approximate scores
            probe = np.asarray(query, np.float32)
            near = [dataclasses.replace(row, score=float(row.vector @ probe))
                    for row in near if row.vector is not None]
        near.sort(key=lambda row: (-row.score, row.key))
        return near

    def neighbour_rows(self, vector: Vector, k: int, floor: float, pending: bool = False,
                       exclude: int | None = None, consistency: str = STRONG) -> list[Row]:
        """The best row always, the rest of the k best scoring >= floor."""
        where = self.comparable(pending, exclude)
        return nearest(self.search([vector.tolist()], k, where, consistency)[0], k, floor)

    def same_id_rows(self, vector: Vector, id_number: str, pending: bool = False,
                     exclude: int | None = None, consistency: str = STRONG) -> list[Row]:
        """This model's rows of `id_number`, scored against `vector`."""
        if not id_number:
            return []
        where = f"{equals('id_number', id_number)} and {self.live(pending, exclude)}"
        return [dataclasses.replace(row, score=float(row.vector @ vector))
                for row in self.rows(where, vectors=True, consistency=consistency)
                if row.vector is not None and row.registration.embedding_model == self.model_id]

    def by_registration_id(self, registration_id: str, vectors: bool = False) -> list[Row]:
        where = f"{equals('registration_id', registration_id)} and {self.live()}"
        return self.rows(where, vectors)

    def holders(self, registration: Registration, pending: bool, exclude: int | None,
                consistency: str = STRONG) -> list[Row]:
        """Live rows other than `exclude` holding the registration_id or msisdn."""
        return self.rows(f"{key_holders(registration)} and {self.live(pending, exclude)}",
                         consistency=consistency)

    def holders_of_each(self, registrations: list[Registration], consistency: str = STRONG
                        ) -> list[Row]:
        """Live rows, pending ones too, holding any of the registrations' registration_ids
        or msisdns (one query for a batch)."""
        return self.rows(f"{any_key_holders(registrations)} and {self.live(True)}",
                         consistency=consistency)

    def distinct(self) -> tuple[int, dict[str, int]]:
        """Distinct ID numbers and registrations per model: Milvus cannot count distinct
        values, so one scan of two columns, reused for STATS_TTL_S or until this node
        writes a registration. A scan that a write of this node overlapped is not kept."""
        cached = self._distinct
        if cached is not None and time.monotonic() - cached[0] < STATS_TTL_S:
            return cached[1], cached[2]
        writes = self._active_writes
        id_numbers: set[str] = set()
        by_model: dict[str, int] = {}
        for page in self.pages(self.live(), ["id_number", "embedding_model"], 10_000):
            for entity in page:
                id_numbers.add(entity["id_number"])
                model = entity["embedding_model"]
                by_model[model] = by_model.get(model, 0) + 1
        if writes == self._active_writes:
            self._distinct = (time.monotonic(), len(id_numbers), by_model)
        return len(id_numbers), by_model

    # -- writes ----------------------------------------------------------------------

    def upsert(self, row: Row, vector: Vector) -> None:
        self.client.upsert(self.collection, [
            self.shape.entity(row.key, row.registration, row.state, row.claimed_at_us,
                              vector)])
        self._wrote(active=row.state == ACTIVE)

    def upsert_each(self, rows: list[tuple[Row, Vector]]) -> None:
        self.client.upsert(self.collection, [
            self.shape.entity(row.key, row.registration, row.state, row.claimed_at_us, vector)
            for row, vector in rows])
        self._wrote(active=any(row.state == ACTIVE for row, _ in rows))

    def upsert_active(self, rows: list[tuple[int, Registration, Vector]]) -> None:
        """Stores ACTIVE rows under the given keys."""
        self.client.upsert(self.collection, [
            self.shape.entity(key, registration, ACTIVE, 0, vector)
            for key, registration, vector in rows])
        self._wrote(active=True)

    def remove(self, keys: list[int], active: bool = False) -> None:
        """Deletes rows: claims, or with `active` acknowledged registrations."""
        self.client.delete(self.collection, ids=keys)
        self._wrote(active)

    def reap(self, cutoff_us: int) -> int:
        """Deletes the PENDING claims made before `cutoff_us` (their nodes died); how many."""
        dead = self.keys(f"state == {PENDING} and claimed_at_us < {cutoff_us}")
        if dead:
            self.client.delete(self.collection, ids=dead)
        return len(dead)

    def _wrote(self, active: bool) -> None:
        if self.wrote_at is None:
            self.wrote_at = time.monotonic()
        if active:  # the counts of registrations changed
            self._active_writes += 1
            self._distinct = None

    def flush(self) -> None:
        """Milvus seals the growing segments into its object storage."""
        self.wrote_at = None
        self.client.flush(self.collection)

    def compact(self) -> None:
        """Milvus rewrites segments without deleted rows."""
        self.client.compact(self.collection)


def nearest(ranked: list[Row], k: int, floor: float) -> list[Row]:
    """Of rows ranked best first: the best always, the rest of the k best scoring >= floor."""
    return [row for i, row in enumerate(ranked[:k]) if i == 0 or row.score >= floor]
