"""Writing the audit trail through the gallery: a record before every audited reply, made
with the audit key; and the key itself, from the security file or (without one) the data
directory.

The record format and the chain check are in `dedup.core.audit_chain`; anchoring the chain's
head outside the data directory in `dedup.service.audit_anchors`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from dedup.core.audit_chain import (
    KEY_BYTES,
    AuditKey,
    AuditMaker,
    Caller,
    read_audit_key,
    record_maker,
)
from dedup.core.errors import AuditUnavailable, ConfigError, DedupError
from dedup.core.files import open_private
from dedup.core.settings import ServerConfig
from dedup.gallery.base import Gallery
from dedup.service.audit_anchors import Anchoring

log = logging.getLogger("dedup.audit")

# Without a key file in the security file: the key generated once in the data directory.
LOCAL_KEY_FILE = "audit.key"


def embedding_digest(vector_bytes: bytes) -> str:
    """How a probe appears in the trail: never the embedding or photo, only this hash."""
    return hashlib.sha256(vector_bytes).hexdigest()


class AuditTrail:
    def __init__(self, backend: Gallery, key: AuditKey, anchoring: Anchoring | None = None
                 ) -> None:
        self.backend = backend
        self.key = key
        self.anchoring = anchoring

    @classmethod
    def for_server(cls, backend: Gallery, config: ServerConfig) -> AuditTrail:
        """The trail with the security file's key (else the data directory's), anchored
        every `audit_anchor_interval_s` once started."""
        configured = config.security.audit_key if config.security else None
        key = configured or local_audit_key(backend.data_dir)
        if configured is None:
            log.warning(
                "NO AUDIT KEY FILE: the audit trail is authenticated with %s, which lies beside "
                "the records it protects, so whoever can write the data directory can rewrite "
                "the trail and authenticate it again. Name a key kept elsewhere in the security "
                "file ([audit] key_file, made by `dedup keys`).",
                Path(backend.data_dir) / LOCAL_KEY_FILE)
        return cls(backend, key, Anchoring(backend, key, config.audit_anchor_file,
                                           config.audit_anchor_interval_s))

    def start(self) -> None:
        if self.anchoring is not None:
            self.anchoring.start()

    def close(self) -> None:
        """Stops anchoring, after a last anchor of the head (before the gallery closes)."""
        if self.anchoring is not None:
            self.anchoring.stop()

    def maker(self, caller: Caller, method: str, case_id: str, purpose: str,
              query: dict[str, Any]) -> AuditMaker:
        """A record to be written inside a backend's own write (a Delete, an Adjudicate)."""
        return record_maker(self.key, caller, method, case_id, purpose, query)

    def append(self, caller: Caller, method: str, case_id: str, purpose: str,
               query: dict[str, Any], returned: list[str]) -> str:
        """Writes one record durably; returns its hash (hex). AuditUnavailable if it cannot be
        written: the caller must then fail the call and return nothing."""
        make = self.maker(caller, method, case_id, purpose, query)
        try:
            return self.backend.append_audit(lambda seq, prev: make(seq, prev, returned)).hex()
        except DedupError as error:
            raise AuditUnavailable(f"audit: the record could not be written ({error}); "
                                   "the call returns nothing") from error
        except Exception as error:
            raise AuditUnavailable(f"audit: the record could not be written "
                                   f"({type(error).__name__}: {error})") from error


def local_audit_key(data_dir: Path) -> AuditKey:
    """The key in `data_dir`, made (32 random bytes, mode 0600) the first time."""
    path = Path(data_dir) / LOCAL_KEY_FILE
    if not path.exists():
        partial = path.with_name(f"{LOCAL_KEY_FILE}.{os.getpid()}.partial")
        with open_private(partial, "w", exclusive=True) as handle:
            handle.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, path)  # whole or not at all, and never over another's key
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    try:
        return read_audit_key(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"the data directory's audit key: {error}") from error
