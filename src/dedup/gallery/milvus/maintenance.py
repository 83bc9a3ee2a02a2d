"""The node's background work on Milvus: flushing Milvus Lite's writes, reaping the claims
of dead nodes, compacting after erasures."""

from __future__ import annotations

import logging
import threading
import time

from dedup.core.settings import MilvusConfig
from dedup.gallery.milvus.claims import Claims
from dedup.gallery.milvus.registrations import Registrations

log = logging.getLogger("dedup.milvus")

REAP_EVERY_S = 10.0


class Maintenance:
    """A daemon thread, started by `start`, ended by `stop`."""

    def __init__(self, rows: Registrations, claims: Claims, config: MilvusConfig,
                 also_compacted: tuple[str, ...] = ()) -> None:
        self._rows = rows
        self._claims = claims
        self._config = config
        # Other collections an erasure deletes rows of (the settlements).
        self._also_compacted = also_compacted
        self.compaction_due: float | None = None  # wall-clock time
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dedup-milvus", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()

    def compaction_after_erasure(self) -> float:
        """When the erased rows will be compacted away (the first pending erasure's delay)."""
        if self.compaction_due is None:
            self.compaction_due = time.time() + self._config.compact_delay_s
        return self.compaction_due

    def compact(self) -> None:
        self._rows.compact()
        for collection in self._also_compacted:
            self._rows.client.compact(collection)
        self.compaction_due = None

    def _run(self) -> None:
        reaped = time.monotonic()
        while not self._closed.wait(0.2):
            try:
                if self._flush_due():
                    self._rows.flush()
                if time.monotonic() - reaped >= REAP_EVERY_S:
                    reaped = time.monotonic()
                    self._claims.reap()
                due = self.compaction_due
                if due is not None and time.time() >= due:
                    self.compact()
            except Exception:  # Milvus holds the data; a failure here only costs time
                log.exception("background Milvus maintenance failed")

    def _flush_due(self) -> bool:
        interval = self._config.flush_interval_s
        wrote = self._rows.wrote_at
        return interval is not None and wrote is not None and \
            time.monotonic() - wrote >= interval
