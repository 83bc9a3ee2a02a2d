"""The audit trail: who asked what, for which case, and what they got back.

Each record is one JSON object holding the hash of the record before it; its own hash is the
SHA-256 of its canonical JSON (sorted keys, no spaces) without the `hash` field. Records live
in the store's append-only `audit` database, keyed by sequence; the head (last sequence and
hash) is kept beside them, so editing, removing, reordering or cutting off records breaks a
check that `verify()` names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._backend import AuditMaker, Backend
from ._errors import AuditUnavailable, DedupError
from ._store import Store

GENESIS = bytes(32)


@dataclass(frozen=True)
class Caller:
    """Who is calling: a certificate subject, a token's name, or the unauthenticated local user."""

    identity: str
    role: str
    via: str  # "mtls", "token" or "none"


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(record: dict[str, Any]) -> bytes:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).digest()


def embedding_digest(vector_bytes: bytes) -> str:
    """How a probe appears in the trail: never the embedding or photo, only this hash."""
    return hashlib.sha256(vector_bytes).hexdigest()


def record_maker(caller: Caller, method: str, case_id: str, purpose: str,
                 query: dict[str, Any]) -> AuditMaker:
    """The record, once its sequence, the previous hash and the ids returned are known
    (inside the store transaction that writes it)."""
    def make(sequence: int, previous: bytes, returned: list[str]) -> tuple[bytes, bytes]:
        record = {
            "seq": sequence, "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "caller": caller.identity, "role": caller.role, "via": caller.via,
            "method": method, "case_id": case_id, "purpose": purpose, "query": query,
            "returned": returned, "prev": previous.hex(),
        }
        digest = _digest(record)
        record["hash"] = digest.hex()
        return _canonical(record), digest

    return make


class AuditTrail:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def append(self, caller: Caller, method: str, case_id: str, purpose: str,
               query: dict[str, Any], returned: list[str]) -> str:
        """Writes one record durably; returns its hash (hex). AuditUnavailable if it cannot be
        written: the caller must then fail the call and return nothing."""
        make = record_maker(caller, method, case_id, purpose, query)
        try:
            return self.backend.append_audit(lambda seq, prev: make(seq, prev, returned)).hex()
        except DedupError as error:
            raise AuditUnavailable(f"audit: the record could not be written ({error}); "
                                   "the call returns nothing") from error
        except Exception as error:
            raise AuditUnavailable(f"audit: the record could not be written "
                                   f"({type(error).__name__}: {error})") from error


@dataclass(frozen=True)
class Verification:
    records: int
    first_broken: int | None  # the sequence of the first record that fails a check
    reason: str


def verify(store: Store) -> Verification:
    """Walks the chain from the first record; stops at the first that fails."""
    walked, previous = _walk(store.audit_records())
    if walked.first_broken is not None:
        return walked
    count = walked.records
    head_sequence, head_hash = store.audit_head()
    if (head_sequence, head_hash) != (count, previous):
        return Verification(count, count + 1,
                            f"the chain ends at record {count}, but the head says "
                            f"{head_sequence} records: records were cut off the end")
    return walked


def verify_chains(chains: dict[str, list[tuple[int, bytes]]]) -> dict[str, Verification]:
    """The Milvus backend's trail: one chain per node process, each walked alone. Milvus
    keeps no head beside them, so records cut off a chain's end go unnoticed."""
    return {chain: _walk(records)[0] for chain, records in chains.items()}


def _walk(records: Iterable[tuple[int, bytes]]) -> tuple[Verification, bytes]:
    """Checks (sequence, record) pairs from sequence 1; returns the result and last hash."""
    expected_sequence, previous = 1, GENESIS
    count = 0
    for key, raw in records:
        count += 1
        problem = _problem(key, raw, expected_sequence, previous)
        if problem:
            return Verification(count, key, problem), previous
        previous = bytes.fromhex(json.loads(raw)["hash"])
        expected_sequence += 1
    return Verification(count, None, "ok"), previous


def _problem(key: int, raw: bytes, expected_sequence: int, previous: bytes) -> str:
    if key != expected_sequence:
        return f"record key {key} where {expected_sequence} was due: a record was removed"
    try:
        record = json.loads(raw)
        stored_hash = bytes.fromhex(record["hash"])
        sequence, prev = record["seq"], bytes.fromhex(record["prev"])
    except (ValueError, KeyError, TypeError) as error:
        return f"record {key} is not a readable audit record ({error})"
    if _digest(record) != stored_hash:
        return f"record {key} was edited: its content does not hash to its stored hash"
    if sequence != key:
        return f"record {key} holds sequence {sequence}: records were reordered"
    if prev != previous:
        return f"record {key} does not follow record {key - 1}: the chain is broken"
    return ""


def export(records: Iterable[tuple[int, bytes]], since: datetime | None,
           until: datetime | None) -> Iterator[str]:
    """JSON lines of the records with since <= time < until."""
    for _, raw in records:
        record = json.loads(raw)
        moment = datetime.fromisoformat(record["time"])
        if (since is None or moment >= since) and (until is None or moment < until):
            yield json.dumps(record, sort_keys=True, ensure_ascii=False)
