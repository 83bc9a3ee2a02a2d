"""The audit trail in Milvus: one hash chain per node process, written, imported and read
back chain by chain."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterable
from typing import Any

from dedup.core.audit_chain import GENESIS, RecordMaker
from dedup.core.errors import BackendUnavailable, StoreError
from dedup.core.settings import MilvusConfig
from dedup.gallery.milvus.connection import connect, pages
from dedup.gallery.milvus.schema import (
    MAX_RECORD_BYTES,
    PLACEHOLDER,
    Collections,
    new_key,
    stable_key,
)


def _entity(key: int, chain: str, sequence: int, record: bytes) -> dict[str, Any]:
    return {"key": key, "chain": chain, "seq": sequence, "record": record.decode(),
            "placeholder": PLACEHOLDER}


class AuditChain:
    """This node's audit chain in the audit collection: its records link to each other."""

    def __init__(self, client: Any, collection: str) -> None:
        self._client = client
        self._collection = collection
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._head: tuple[int, bytes] = (0, GENESIS)

    @property
    def head(self) -> tuple[int, bytes]:
        """This chain's last sequence and hash."""
        with self._lock:
            return self._head

    def append(self, make: RecordMaker) -> bytes:
        """Writes the record `make` builds on the chain's head; returns its digest."""
        with self._lock:
            sequence, previous = self._head
            record, digest = make(sequence + 1, previous)
            if len(record) > MAX_RECORD_BYTES:
                raise BackendUnavailable(f"audit: the record is {len(record):,} bytes, Milvus "
                                         f"holds at most {MAX_RECORD_BYTES:,}")
            self._client.insert(self._collection,
                                [_entity(new_key(), self.name, sequence + 1, record)])
            self._head = (sequence + 1, digest)
            return digest

    def import_chain(self, chain: str, records: Iterable[tuple[int, bytes]]) -> int:
        """Copies records of another chain (a migrated data directory's) unchanged, again
        under the same keys when repeated; how many."""
        rows = [_entity(stable_key(chain, str(sequence)), chain, sequence, record)
                for sequence, record in records]
        if rows:
            self._client.upsert(self._collection, rows)
        return len(rows)


def read_audit_chains(config: MilvusConfig) -> dict[str, list[tuple[int, bytes]]]:
    """Every node chain's audit records by sequence, read without creating anything."""
    client = connect(config)
    try:
        collection = Collections.named(config.prefix).audit
        if not client.has_collection(collection):
            raise StoreError(f"milvus at {config.uri}: no audit collection {collection}")
        client.load_collection(collection)
        chains: dict[str, list[tuple[int, bytes]]] = {}
        for page in pages(client, collection, "seq > 0", ["chain", "seq", "record"], 10_000):
            for entity in page:
                chains.setdefault(entity["chain"], []).append(
                    (int(entity["seq"]), entity["record"].encode()))
        return {chain: sorted(records) for chain, records in chains.items()}
    finally:
        client.close()
