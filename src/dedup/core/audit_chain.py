"""The audit trail's record format: canonical JSON records, each holding the hash of the one
before it and a MAC under the audit key, and the check that walks such a chain.

Each record is one JSON object holding the hash of the record before it; its own hash is the
SHA-256 of its canonical JSON (sorted keys, no spaces) without the `hash` and `mac` fields,
and its `mac` the HMAC-SHA256 of the same bytes under the audit key, which is kept apart from
the records (named in the security file). ID numbers and phone numbers in a query are stored
as keyed pseudonyms (`pseudonym()`), never as values. Both backends store records in this
format; `verify()` names the first record edited, removed, reordered, cut off the end or
(with the key) written without it. Anchors (`dedup.core.audit_anchor`) pin the chain's head
outside the data directory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The hash the first record follows.
GENESIS = bytes(32)
KEY_BYTES = 32

# make(sequence, previous hash) -> (record bytes, record hash), inside the write that stores it.
RecordMaker = Callable[[int, bytes], tuple[bytes, bytes]]
# The same, once the registration_ids a deletion erased are known.
AuditMaker = Callable[[int, bytes, list[str]], tuple[bytes, bytes]]

# Query fields that hold personal values, and the kind of value each holds: both ID number
# fields share one kind, so that `dedup audit export --id-number` finds them together.
PERSONAL_FIELDS = {"id_number": "id_number", "claimed_id_number": "id_number",
                   "msisdn": "msisdn"}
PSEUDONYM_PREFIX = "hmac:"


@dataclass(frozen=True)
class Caller:
    """Who is calling: a certificate subject, a token's name, or the unauthenticated local user."""

    identity: str
    role: str
    via: str  # "mtls", "token" or "none"
    # When the credential stops being accepted (a token's `expires`); a request stream's
    # items are refused from then on (api/calls.py).
    expires: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AuditKey:
    """The secret that authenticates records and pseudonymises personal values."""

    secret: bytes = field(repr=False)

    def mac(self, content: bytes) -> str:
        return hmac.new(self.secret, content, hashlib.sha256).hexdigest()

    def pseudonym(self, kind: str, value: str) -> str:
        """How an ID number or phone number appears in the trail: the same for the same value
        under one key, and of no use for recovering the value without the key."""
        return PSEUDONYM_PREFIX + self.mac(f"{kind}\x00{value}".encode())

    def verifies(self, content: bytes, mac: object) -> bool:
        return isinstance(mac, str) and hmac.compare_digest(self.mac(content), mac)


def parse_audit_key(text: str, where: str) -> AuditKey:
    """A key file's contents: hex, at least 32 bytes of it (`dedup keys` writes 32)."""
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{where}: an audit key file holds hex digits only") from None
    if len(secret) < KEY_BYTES:
        raise ValueError(f"{where}: an audit key is at least {KEY_BYTES} bytes "
                         f"({2 * KEY_BYTES} hex digits), this one {len(secret)}")
    return AuditKey(secret)


def read_audit_key(path: Path) -> AuditKey:
    return parse_audit_key(Path(path).read_text(), str(path))


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_content(record: dict[str, Any]) -> bytes:
    """What the hash and the MAC cover: everything but themselves."""
    return canonical({k: v for k, v in record.items() if k not in ("hash", "mac")})


def pseudonymised(key: AuditKey, query: dict[str, Any]) -> dict[str, Any]:
    """The query with its ID numbers and phone numbers replaced by their pseudonyms."""
    return {name: key.pseudonym(PERSONAL_FIELDS[name], value)
            if name in PERSONAL_FIELDS and isinstance(value, str) and value else value
            for name, value in query.items()}


def record_maker(key: AuditKey, caller: Caller, method: str, case_id: str, purpose: str,
                 query: dict[str, Any]) -> AuditMaker:
    """The record, once its sequence, the previous hash and the ids returned are known
    (inside the store transaction that writes it). Query fields named in PERSONAL_FIELDS are
    stored as pseudonyms: never put an ID number or phone number under another name."""
    stored_query = pseudonymised(key, query)

    def make(sequence: int, previous: bytes, returned: list[str]) -> tuple[bytes, bytes]:
        record = {
            "seq": sequence, "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "caller": caller.identity, "role": caller.role, "via": caller.via,
            "method": method, "case_id": case_id, "purpose": purpose, "query": stored_query,
            "returned": returned, "prev": previous.hex(),
        }
        content = signed_content(record)
        digest = hashlib.sha256(content).digest()
        record["hash"], record["mac"] = digest.hex(), key.mac(content)
        return canonical(record), digest

    return make


@dataclass(frozen=True)
class Verification:
    records: int
    first_broken: int | None  # the sequence of the first record that fails a check
    reason: str
    anchors: int = 0  # anchors the chain was checked against

    @property
    def intact(self) -> bool:
        return self.first_broken is None


# An anchor as verification reads it: (when, sequence, hash) of a record seen earlier.
Pinned = tuple[str, int, bytes]


def verify(records: Iterable[tuple[int, bytes]], head: tuple[int, bytes],
           key: AuditKey | None = None, pinned: Sequence[Pinned] = ()) -> Verification:
    """Walks the chain from the first record; stops at the first that fails. `head` is the
    (last sequence, last hash) kept beside the records; with `key` every record's MAC is
    checked; `pinned` are anchors of this chain, which the chain must still hold."""
    walked, hashes = _walk(records, key)
    if walked.first_broken is not None:
        return walked
    count = walked.records
    head_sequence, head_hash = head
    if (head_sequence, head_hash) != (count, hashes[-1] if hashes else GENESIS):
        return _broken(walked, count + 1, f"the chain ends at record {count}, but the head says "
                       f"{head_sequence} records: records were cut off the end")
    return _check_pinned(walked, hashes, pinned)


def verify_chains(chains: dict[str, list[tuple[int, bytes]]], key: AuditKey | None = None,
                  pinned: dict[str, list[Pinned]] | None = None) -> dict[str, Verification]:
    """The Milvus backend's trail: one chain per node process, each walked alone. Milvus
    keeps no head beside them: only anchors show records cut off a chain's end, or a chain
    removed whole."""
    pinned = pinned or {}
    results = {}
    for chain, records in chains.items():
        walked, hashes = _walk(records, key)
        results[chain] = walked if not walked.intact else \
            _check_pinned(walked, hashes, pinned.get(chain, []))
    for chain, anchors in pinned.items():
        if chain not in chains and anchors:
            when, sequence, _ = max(anchors, key=lambda anchor: anchor[1])
            results[chain] = Verification(0, 1, f"the chain is gone: an anchor of {when} saw "
                                          f"its record {sequence}", anchors=len(anchors))
    return results


def _broken(walked: Verification, sequence: int, reason: str) -> Verification:
    return Verification(walked.records, sequence, reason, walked.anchors)


def _check_pinned(walked: Verification, hashes: list[bytes], pinned: Sequence[Pinned]
                  ) -> Verification:
    count = walked.records
    for when, sequence, digest in sorted(pinned, key=lambda anchor: anchor[1]):
        if sequence > count:
            return _broken(walked, count + 1, f"the chain ends at record {count}, but an anchor "
                           f"of {when} saw record {sequence}: records were cut off the end, or "
                           "the trail was rolled back to an older copy")
        if sequence >= 1 and hashes[sequence - 1] != digest:
            return _broken(walked, sequence, f"record {sequence} is not the one an anchor of "
                           f"{when} saw: the trail was rewritten, or replaced by another copy")
    return Verification(count, None, "ok", len(pinned))


def _walk(records: Iterable[tuple[int, bytes]], key: AuditKey | None
          ) -> tuple[Verification, list[bytes]]:
    """Checks (sequence, record) pairs from sequence 1; returns the result and the hashes."""
    hashes: list[bytes] = []
    for key_sequence, raw in records:
        previous = hashes[-1] if hashes else GENESIS
        record, problem = _problem(key_sequence, raw, len(hashes) + 1, previous)
        if not problem and key is not None:
            problem = _mac_problem(key, key_sequence, record)
        if problem:
            return Verification(len(hashes) + 1, key_sequence, problem), hashes
        hashes.append(bytes.fromhex(record["hash"]))
    return Verification(len(hashes), None, "ok"), hashes


def _problem(key: int, raw: bytes, expected_sequence: int, previous: bytes
             ) -> tuple[dict[str, Any], str]:
    if key != expected_sequence:
        return {}, f"record key {key} where {expected_sequence} was due: a record was removed"
    try:
        record = json.loads(raw)
        stored_hash = bytes.fromhex(record["hash"])
        sequence, prev = record["seq"], bytes.fromhex(record["prev"])
    except (ValueError, KeyError, TypeError) as error:
        return {}, f"record {key} is not a readable audit record ({error})"
    if hashlib.sha256(signed_content(record)).digest() != stored_hash:
        return record, f"record {key} was edited: its content does not hash to its stored hash"
    if sequence != key:
        return record, f"record {key} holds sequence {sequence}: records were reordered"
    if prev != previous:
        return record, f"record {key} does not follow record {key - 1}: the chain is broken"
    return record, ""


def _mac_problem(key: AuditKey, sequence: int, record: dict[str, Any]) -> str:
    if "mac" not in record:
        # Stripping MACs leaves the hashes as they were: a record without one is refused.
        return (f"record {sequence} carries no MAC: it was written without the audit key "
                "(before the trail had one), or its MAC was removed")
    if not key.verifies(signed_content(record), record["mac"]):
        return (f"record {sequence}'s MAC does not match: it was edited and re-hashed, or "
                "written with another key")
    return ""


def export(records: Iterable[tuple[int, bytes]], since: datetime | None,
           until: datetime | None, about: frozenset[str] = frozenset()) -> Iterator[str]:
    """JSON lines of the records with since <= time < until; with `about` (pseudonyms), only
    those whose query holds one of them."""
    for _, raw in records:
        record = json.loads(raw)
        moment = datetime.fromisoformat(record["time"])
        if (since is None or moment >= since) and (until is None or moment < until) \
                and (not about or about & set(map(str, record["query"].values()))):
            yield json.dumps(record, sort_keys=True, ensure_ascii=False)
