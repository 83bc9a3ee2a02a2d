"""The audit trail's record format: canonical JSON records, each holding the hash of the one
before it, and the check that walks such a chain.

Each record is one JSON object holding the hash of the record before it; its own hash is the
SHA-256 of its canonical JSON (sorted keys, no spaces) without the `hash` field. Both backends
store records in this format; `verify()` names the first record edited, removed, reordered or
cut off the end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The hash the first record follows.
GENESIS = bytes(32)

# make(sequence, previous hash) -> (record bytes, record hash), inside the write that stores it.
RecordMaker = Callable[[int, bytes], tuple[bytes, bytes]]
# The same, once the registration_ids a deletion erased are known.
AuditMaker = Callable[[int, bytes, list[str]], tuple[bytes, bytes]]


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


@dataclass(frozen=True)
class Verification:
    records: int
    first_broken: int | None  # the sequence of the first record that fails a check
    reason: str


def verify(records: Iterable[tuple[int, bytes]], head: tuple[int, bytes]) -> Verification:
    """Walks the chain from the first record; stops at the first that fails. `head` is the
    (last sequence, last hash) kept beside the records."""
    walked, previous = _walk(records)
    if walked.first_broken is not None:
        return walked
    count = walked.records
    head_sequence, head_hash = head
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
