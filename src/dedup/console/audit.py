"""The audit trail on the admin pages. The trail has no gRPC read: the console runs the
auditors' own commands, `dedup audit verify` and `dedup audit export`, on the data directory
(or Milvus URI) it was given, so it needs to run beside the server as its user. Records are
filtered here by case and caller, newest first."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dedup.console.settings import AuditSource

RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Verification:
    intact: bool
    report: str  # what `dedup audit verify` printed


@dataclass(frozen=True)
class RecordFilter:
    case_id: str = ""
    caller: str = ""
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 200

    def admits(self, record: dict[str, Any]) -> bool:
        return ((not self.case_id or record.get("case_id") == self.case_id)
                and (not self.caller or self.caller in str(record.get("caller", ""))))


def _dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "--log-level", "error", *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def verify(source: AuditSource) -> Verification:
    args = ["audit", "verify", *source.trail_arguments()]
    if source.key is not None:
        args += ["--key", str(source.key)]
    if source.anchor is not None:
        args += ["--anchor", str(source.anchor)]
    done = _dedup(*args)
    return Verification(done.returncode == 0, (done.stdout + done.stderr).strip())


def records(source: AuditSource, wanted: RecordFilter) -> list[dict[str, Any]]:
    """The records `wanted` admits, newest first, at most `wanted.limit`; ValueError with
    the command's message when it fails."""
    args = ["audit", "export", *source.trail_arguments()]
    if wanted.since is not None:
        args += ["--since", wanted.since.isoformat()]
    if wanted.until is not None:
        args += ["--until", wanted.until.isoformat()]
    done = _dedup(*args)
    if done.returncode != 0:
        raise ValueError(done.stderr.strip() or f"dedup audit export exited {done.returncode}")
    found = [record for record in map(json.loads, done.stdout.splitlines())
             if wanted.admits(record)]
    return found[::-1][:wanted.limit]
