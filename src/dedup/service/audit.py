"""Writing the audit trail through the gallery: a record before every audited reply.

The record format and the chain check are in `dedup.core.audit_chain`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from dedup.core.audit_chain import Caller, record_maker
from dedup.core.errors import AuditUnavailable, DedupError
from dedup.gallery.base import Gallery


def embedding_digest(vector_bytes: bytes) -> str:
    """How a probe appears in the trail: never the embedding or photo, only this hash."""
    return hashlib.sha256(vector_bytes).hexdigest()


class AuditTrail:
    def __init__(self, backend: Gallery) -> None:
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
