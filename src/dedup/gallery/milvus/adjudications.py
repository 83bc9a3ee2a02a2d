"""Settled pairs in Milvus: one row under each order of the pair, keyed by the pair."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dedup.core.adjudication import Adjudication
from dedup.gallery.milvus.filters import equals
from dedup.gallery.milvus.schema import PLACEHOLDER, stable_key


def _both_orders(first: str, second: str, record: bytes) -> list[dict[str, Any]]:
    text = record.decode()
    return [{"key": stable_key(a, b), "first": a, "second": b, "record": text,
             "placeholder": PLACEHOLDER} for a, b in ((first, second), (second, first))]


class Adjudications:
    """The adjudications collection: settling again upserts the same rows."""

    def __init__(self, client: Any, collection: str) -> None:
        self._client = client
        self._collection = collection

    def settled(self, registration_id: str) -> dict[str, bytes]:
        """The record of each pair `registration_id` is in, by the other registration."""
        if not registration_id:
            return {}
        found = self._client.query(self._collection,
                                   filter=equals("first", registration_id),
                                   output_fields=["second", "record"],
                                   consistency_level="Strong")
        return {entity["second"]: entity["record"].encode() for entity in found}

    def settle(self, first: str, second: str, record: bytes) -> None:
        self._client.upsert(self._collection, _both_orders(first, second, record))

    def import_records(self, records: Iterable[bytes]) -> int:
        """Stores encoded adjudication records (a migrated data directory's); how many."""
        rows = []
        for record in records:
            pair = Adjudication.decode(record)
            rows += _both_orders(pair.registration_id, pair.matched_registration_id, record)
        if rows:
            self._client.upsert(self._collection, rows)
        return len(rows) // 2
