"""Settled pairs in Milvus: one row under each order of the pair, keyed by the pair.

A pair's parties are the registrations' own int64 keys ("k:<key>"), or for an application
that was not enrolled when it was settled its registration_id ("p:<registration_id>"): a
settlement follows the stored registration, not whoever reuses its registration_id, and is
erased with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dedup.core.adjudication import Adjudication
from dedup.gallery.milvus.connection import milvus_errors, pages
from dedup.gallery.milvus.filters import equals, literal
from dedup.gallery.milvus.schema import PLACEHOLDER, stable_key

log = logging.getLogger("dedup.milvus")

Party = int | str


def party_text(party: Party) -> str:
    return f"k:{party}" if isinstance(party, int) else f"p:{party}"


def _party(text: str) -> Party:
    kind, _, value = text.partition(":")
    return int(value) if kind == "k" else value


def _both_orders(checked: Party, matched: int, record: bytes) -> list[dict[str, Any]]:
    text = record.decode()
    first, second = party_text(checked), party_text(matched)
    return [{"key": stable_key(a, b), "first": a, "second": b, "record": text,
             "placeholder": PLACEHOLDER} for a, b in ((first, second), (second, first))]


class Adjudications:
    """The settlements collection: settling again upserts the same rows."""

    def __init__(self, client: Any, collection: str) -> None:
        self._client = client
        self._collection = collection

    def settled(self, party: Party) -> dict[int, bytes]:
        """The key of every enrolled registration settled with `party` -> the record."""
        found = self._client.query(self._collection,
                                   filter=equals("first", party_text(party)),
                                   output_fields=["second", "record"],
                                   consistency_level="Strong")
        settled = {}
        for entity in found:
            other = _party(entity["second"])
            if isinstance(other, int):
                settled[other] = entity["record"].encode()
        return settled

    def settle(self, checked: Party, matched: int, record: bytes) -> None:
        self._client.upsert(self._collection, _both_orders(checked, matched, record))

    def forget(self, parties: Sequence[Party]) -> None:
        """Deletes every settlement naming one of `parties` (erased registrations' keys and
        registration_ids)."""
        if parties:
            names = "[" + ", ".join(literal(party_text(party)) for party in parties) + "]"
            self._client.delete(self._collection,
                                filter=f"first in {names} or second in {names}")

    def import_settlements(self, pairs: Iterable[tuple[Party, int, bytes]]) -> int:
        """Stores settled pairs (a migrated data directory's: its keys are kept); how many."""
        rows = [row for checked, matched, record in pairs
                for row in _both_orders(checked, matched, record)]
        if rows:
            self._client.upsert(self._collection, rows)
        return len(rows) // 2

    def convert_legacy(self, legacy: str, key_of: Callable[[str], int | None]) -> int:
        """Moves the pairs of a collection keyed by registration_id strings (kept before
        settlements were keyed by registration) here, then drops it: a pair whose matched
        registration is no longer enrolled is left behind. How many were moved.

        The nodes of an upgraded fleet start together and each moves them. A node whose
        reads fail because the collection is gone takes the move as done: the node that
        dropped it had stored every pair first."""
        if not self._client.has_collection(legacy):
            return 0
        try:
            moved = self._move(legacy, key_of)
        except milvus_errors():
            if self._client.has_collection(legacy):
                raise
            log.info("%s is gone: taken as moved by the node that dropped it", legacy)
            return 0
        log.info("moved %d settled pair(s) from %s to %s, keyed by registration", moved,
                 legacy, self._collection)
        return moved

    def _move(self, legacy: str, key_of: Callable[[str], int | None]) -> int:
        self._client.load_collection(legacy)
        pairs: dict[tuple[Party, int], bytes] = {}  # both orders of a pair: one record
        # closed when a read fails, not when the failure's traceback is collected
        with contextlib.closing(pages(self._client, legacy, "key >= 0", ["record"],
                                      1000)) as read:
            for page in read:
                for entity in page:
                    pair = Adjudication.decode(entity["record"])
                    matched = key_of(pair.matched_registration_id)
                    if matched is not None:
                        checked = key_of(pair.registration_id)
                        party = pair.registration_id if checked is None else checked
                        pairs[party, matched] = entity["record"].encode()
        moved = self.import_settlements((c, m, record) for (c, m), record in pairs.items())
        self._client.drop_collection(legacy)
        return moved
