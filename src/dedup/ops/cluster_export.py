"""`dedup clusters`: FindClusters' stream written as JSON lines or CSV, with a progress bar."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core.files import open_private


def write_clusters(updates: Iterable[pb.ClusterUpdate], out: Path) -> int:
    """Writes each cluster as it arrives: one JSON object a line (.jsonl, .json) or one CSV row
    per registration (.csv, with a cluster number), into a file of mode 0600. Returns how many
    clusters were written. Written beside `out` and renamed over it once the stream ended: a
    refused or broken stream leaves no partial export, and an earlier one as it was."""
    partial = out.with_name(out.name + ".partial")
    try:
        found = _write_clusters(updates, out, partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return found


def _write_clusters(updates: Iterable[pb.ClusterUpdate], out: Path, partial: Path) -> int:
    as_csv = out.suffix.lower() == ".csv"
    found = 0
    with open_private(partial, "w", newline="") as handle, \
            tqdm(desc="searching", unit="reg") as bar:
        writer = csv.writer(handle) if as_csv else None
        if writer is not None:
            writer.writerow(["cluster", "id_numbers", "min_link_score", "registration_id",
                             "id_number", "msisdn", "carrier", "region", "audit_record_hash",
                             "truncated_by"])
        for update in updates:
            if update.HasField("progress"):
                bar.total = update.progress.total
                bar.n = update.progress.searched
                bar.set_postfix(clusters=update.progress.clusters)
                continue
            found += 1
            cluster = update.cluster
            if writer is None:
                handle.write(json.dumps({
                    "id_numbers": list(cluster.id_numbers),
                    "min_link_score": round(cluster.min_link_score, 6),
                    "registrations": [{"registration_id": r.registration_id,
                                       "id_number": r.id_number, "msisdn": r.msisdn,
                                       "carrier": r.carrier, "region": r.region}
                                      for r in cluster.registrations],
                    "audit_record_hash": update.audit_record_hash,
                    "truncated_by": list(cluster.truncated_by)}) + "\n")
            else:
                for r in cluster.registrations:
                    writer.writerow([found, " ".join(cluster.id_numbers),
                                     f"{cluster.min_link_score:.6f}", r.registration_id,
                                     r.id_number, r.msisdn, r.carrier, r.region,
                                     update.audit_record_hash, " ".join(cluster.truncated_by)])
        bar.refresh()
        handle.flush()
        os.fsync(handle.fileno())
    return found
