"""A FindClusters sweep started from the console: a thread reads the server's stream and keeps
the progress and the clusters as they arrive, for the page to poll and for the downloads
(CSV, one row per registration; JSON lines, one cluster a line, as `dedup clusters` writes)."""

from __future__ import annotations

import csv
import io
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.console.backend import ServerRefused, cluster_updates
from dedup.console.sessions import Case

CSV_COLUMNS = ["cluster", "id_numbers", "min_link_score", "registration_id", "id_number",
               "msisdn", "carrier", "region", "audit_record_hash", "truncated_by"]


def cluster_dict(cluster: pb.Cluster, audit_record_hash: str) -> dict[str, Any]:
    return {"id_numbers": list(cluster.id_numbers),
            "min_link_score": round(cluster.min_link_score, 6),
            "registrations": [{"registration_id": r.registration_id, "id_number": r.id_number,
                               "msisdn": r.msisdn, "carrier": r.carrier, "region": r.region}
                              for r in cluster.registrations],
            "audit_record_hash": audit_record_hash,
            "truncated_by": list(cluster.truncated_by)}


@dataclass
class ClusterJob:
    """One sweep: what it asked, how far it is, what it found, how it ended."""

    case: Case
    min_distinct_id_numbers: int
    min_score: float | None
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    searched: int = 0
    total: int = 0
    clusters: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error: str = ""
    _call: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, open_call: Callable[[], Any]) -> None:
        self._call = open_call()
        threading.Thread(target=self._read, name=f"clusters-{self.id}", daemon=True).start()

    def cancel(self) -> None:
        if self._call is not None and not self.done:
            self._call.cancel()

    def _read(self) -> None:
        try:
            for update in cluster_updates(self._call):
                with self._lock:
                    if update.HasField("progress"):
                        self.searched = update.progress.searched
                        self.total = update.progress.total
                    else:
                        self.clusters.append(cluster_dict(update.cluster,
                                                          update.audit_record_hash))
        except ServerRefused as refused:
            self.error = ("the sweep was cancelled" if refused.code == "CANCELLED"
                          else f"{refused.code}: {refused.message}")
        finally:
            self.done = True

    def state(self, after: int) -> dict[str, Any]:
        """Progress, and the clusters from number `after` on, for the page's poll."""
        with self._lock:
            return {"searched": self.searched, "total": self.total,
                    "found": len(self.clusters), "done": self.done, "error": self.error,
                    "clusters": self.clusters[after:]}

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.clusters)

    def as_jsonl(self) -> str:
        return "".join(json.dumps(cluster) + "\n" for cluster in self.snapshot())

    def as_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for number, cluster in enumerate(self.snapshot(), start=1):
            for r in cluster["registrations"]:
                writer.writerow([number, " ".join(cluster["id_numbers"]),
                                 f"{cluster['min_link_score']:.6f}", r["registration_id"],
                                 r["id_number"], r["msisdn"], r["carrier"], r["region"],
                                 cluster["audit_record_hash"],
                                 " ".join(cluster["truncated_by"])])
        return out.getvalue()
