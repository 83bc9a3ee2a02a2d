"""An investigator's settlement of a pair of registrations: one record format, built and read
only here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

SAME_PERSON = "SAME_PERSON"
DIFFERENT_PEOPLE = "DIFFERENT_PEOPLE"


@dataclass(frozen=True)
class Adjudication:
    registration_id: str
    matched_registration_id: str
    decision: str  # SAME_PERSON or DIFFERENT_PEOPLE
    score: float
    case_id: str
    note: str
    by: str
    at: str  # ISO 8601, seconds

    @classmethod
    def now(cls, registration_id: str, matched_registration_id: str, decision: str,
            score: float, case_id: str, note: str, by: str) -> Adjudication:
        return cls(registration_id, matched_registration_id, decision, score, case_id, note, by,
                   datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def different_people(self) -> bool:
        return self.decision == DIFFERENT_PEOPLE

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Adjudication:
        return cls(**json.loads(raw))
