"""Anchoring the audit chain's head on a schedule: every `audit_anchor_interval_s` (when the
head moved) and at shutdown, a line appended (and fsynced) to the operator's anchor file and
logged on `dedup.audit` for a SIEM. The anchor format is in `dedup.core.audit_anchor`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dedup.core.audit_anchor import Anchor, append_anchors, make_anchor
from dedup.core.audit_chain import AuditKey
from dedup.gallery.base import Gallery

log = logging.getLogger("dedup.audit")


class Anchoring:
    def __init__(self, backend: Gallery, key: AuditKey, anchor_file: Path | None,
                 interval_s: float) -> None:
        self.backend = backend
        self.key = key
        self.anchor_file = anchor_file
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last: tuple[str, int] | None = None

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="dedup-audit-anchor",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the schedule and anchors the head a last time."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._anchor_logged()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._anchor_logged()

    def _anchor_logged(self) -> None:
        try:
            self.anchor()
        except Exception:
            # The trail itself is unharmed; the next anchor covers this one's records too.
            log.exception("audit anchor: could not export the chain's head")

    def anchor(self) -> Anchor | None:
        """Exports the head now, unless it is where the last anchor left it."""
        with self._lock:
            chain, sequence, digest = self.backend.audit_head()
            if sequence == 0 or self._last == (chain, sequence):
                return None
            anchor = make_anchor(self.key, sequence, digest, chain)
            if self.anchor_file is not None:
                append_anchors(self.anchor_file, [anchor])
            log.info("audit anchor %s", anchor.line())
            self._last = (chain, sequence)
            return anchor
