"""Audited reads: the case and purpose each names, validated alike whether they come as
request fields (Investigate) or as `x-case-id` / `x-purpose` metadata (FaceDedup), and one
audit record for every read, whatever it ends in: an answer, NOT_FOUND or a refusal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from dedup.api.status import status_of
from dedup.core import validation
from dedup.core.audit_chain import Caller, RecordMaker
from dedup.core.errors import AuditUnavailable, DedupError
from dedup.service.audit import AuditTrail

CASE_CHARS = 256  # case_id and purpose, on every route
CASE_METADATA = ("x-case-id", "x-purpose")


def case_and_purpose(case_id: str, purpose: str,
                     names: tuple[str, str] = ("case_id", "purpose")) -> tuple[str, str]:
    """Both required, at most CASE_CHARS characters, no control characters."""
    return (validation.text(case_id, names[0], CASE_CHARS, required=True),
            validation.text(purpose, names[1], CASE_CHARS, required=True))


def metadata_case(context: grpc.ServicerContext) -> tuple[str, str]:
    metadata = dict(context.invocation_metadata() or ())
    case_id, purpose = (str(metadata.get(name, "")) for name in CASE_METADATA)
    return case_and_purpose(case_id, purpose, CASE_METADATA)


def optional_metadata_case(context: grpc.ServicerContext) -> tuple[str, str]:
    """The case and purpose an erasure names in its metadata: both, or neither ("", "")."""
    metadata = dict(context.invocation_metadata() or ())
    if not any(metadata.get(name) for name in CASE_METADATA):
        return "", ""
    return metadata_case(context)


def audited(caller: Caller) -> bool:
    """Whether FaceDedup's reads by this caller are audited: an identified investigator's or
    admin's. Without a security file nobody is identified (loopback only, every caller has
    every right), and only Investigate and Delete are audited."""
    return caller.role in ("investigator", "admin") and caller.via != "none"


@dataclass
class Read:
    """One read, filled in as its request is validated; `trail` None: not audited."""

    trail: AuditTrail | None
    caller: Caller
    method: str
    case_id: str = ""
    purpose: str = ""
    query: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False

    def answered(self, returned: list[str]) -> str:
        """Writes the record of the answer, before it is sent; its hash ("" unaudited)."""
        return self._append(returned, "OK")

    def answered_within(self, write: Callable[[RecordMaker], bytes], returned: list[str]
                        ) -> bytes:
        """Has `write` store the record of the answer inside its own store write (an
        Adjudicate's settlement), the record and the write whole or not at all; its hash."""
        assert self.trail is not None  # Investigate's reads are always audited
        make = self.trail.maker(self.caller, self.method, self.case_id, self.purpose,
                                self.query)
        digest = write(lambda sequence, previous: make(sequence, previous, returned))
        self.recorded = True
        return digest

    def ended(self, outcome: str) -> None:
        """Writes the record of a read that ended without an answer (a status name)."""
        if not self.recorded:
            self._append([], outcome)

    def _append(self, returned: list[str], outcome: str) -> str:
        if self.trail is None:
            return ""
        self.recorded = True
        # The query records how the read ended when it ended without an answer.
        query = self.query if outcome == "OK" else {**self.query, "outcome": outcome}
        return self.trail.append(self.caller, self.method, self.case_id, self.purpose, query,
                                 returned)


@contextmanager
def read(trail: AuditTrail | None, caller: Caller, method: str) -> Iterator[Read]:
    """A read whose every ending is recorded: an error leaves a record naming its status."""
    current = Read(trail, caller, method)
    try:
        yield current
    except AuditUnavailable:
        raise
    except DedupError as error:
        current.ended(status_of(error).name)
        raise
    except Exception:
        current.ended("INTERNAL")
        raise


@contextmanager
def face_dedup_read(trail: AuditTrail, caller: Caller, method: str,
                    context: grpc.ServicerContext) -> Iterator[Read]:
    """A FaceDedup read: audited, with the case and purpose from metadata, for an
    identified investigator or admin (a missing or bad case is refused, and recorded)."""
    with read(trail if audited(caller) else None, caller, method) as current:
        if current.trail is not None:
            current.case_id, current.purpose = metadata_case(context)
        yield current
