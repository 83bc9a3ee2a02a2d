"""Anchors: the audit chain's head exported outside the data directory (a file on other
storage, a log line for the SIEM), so that `dedup audit verify --anchor` tells a trail cut
short, rewritten, or rolled back to an older copy.

One JSON object a line: `time`, `seq` and `hash` (hex) of the chain's last record, `chain`
(a Milvus node chain's name; absent for an embedded data directory) and `mac`, the
HMAC-SHA256 of the other fields' canonical JSON under the audit key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dedup.core.audit_chain import AuditKey, Pinned, canonical
from dedup.core.files import open_private


@dataclass(frozen=True)
class Anchor:
    time: str
    seq: int
    hash: str  # hex
    mac: str
    chain: str = ""

    def _fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"time": self.time, "seq": self.seq, "hash": self.hash}
        if self.chain:
            fields["chain"] = self.chain
        return fields

    def content(self) -> bytes:
        """What the MAC covers."""
        return canonical(self._fields())

    def line(self) -> str:
        return json.dumps(self._fields() | {"mac": self.mac}, sort_keys=True,
                          ensure_ascii=False)

    def pinned(self) -> Pinned:
        return self.time, self.seq, bytes.fromhex(self.hash)


def make_anchor(key: AuditKey, seq: int, digest: bytes, chain: str = "") -> Anchor:
    unsigned = Anchor(datetime.now(UTC).isoformat(timespec="seconds"), seq, digest.hex(), "",
                      chain)
    return Anchor(unsigned.time, seq, unsigned.hash, key.mac(unsigned.content()), chain)


def parse_anchors(text: str, where: str) -> list[Anchor]:
    """The anchors of an anchor file (blank lines skipped); ValueError naming the bad line."""
    anchors = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            anchor = Anchor(str(fields["time"]), int(fields["seq"]), str(fields["hash"]),
                            str(fields.get("mac", "")), str(fields.get("chain", "")))
            bytes.fromhex(anchor.hash)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where} line {number}: not an audit anchor ({error})") from None
        anchors.append(anchor)
    return anchors


def forged(anchors: list[Anchor], key: AuditKey) -> list[Anchor]:
    """The anchors whose MAC the key does not make."""
    return [anchor for anchor in anchors if not key.verifies(anchor.content(), anchor.mac)]


def pinned_by_chain(anchors: list[Anchor]) -> dict[str, list[Pinned]]:
    chains: dict[str, list[Pinned]] = {}
    for anchor in anchors:
        chains.setdefault(anchor.chain, []).append(anchor.pinned())
    return chains


def append_anchors(path: Path, anchors: list[Anchor]) -> None:
    """Appends the lines and fsyncs them; the file is created 0600."""
    with open_private(path, "ab") as handle:
        handle.write("".join(anchor.line() + "\n" for anchor in anchors).encode())
        handle.flush()
        os.fsync(handle.fileno())
