"""Which Milvus answers, and what its collections can be built with.

dedup asks the server its version when it connects and builds the collections that version
supports. What differs between the versions dedup supports:
- scalar indexes on the fields it filters by equality: Milvus 2.3 has `Trie` (VARCHAR) and
  `STL_SORT` (numbers), and refuses `INVERTED`; 2.4 and later, and Milvus Lite, have
  `INVERTED` (2.4+ still accept the 2.3 kinds, so a collection made on 2.3 keeps working
  after an upgrade);
- adding a field to an existing collection: 2.6 and later only (see schema.py);
- Milvus Lite is one process with its own storage engine: see lite.py for what dedup does
  about its flushes.
Everything else dedup uses (upsert, delete by filter, `count(*)`, the query iterator,
embeddings in search results, Strong consistency) is in 2.3 and later: older servers are
refused at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dedup.core.errors import StoreError

OLDEST = (2, 3)
LITE_PREFIX = "milvus_lite"
_NUMBER = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
# Field types (pymilvus DataType names) that take a sort index on Milvus 2.3.
_NUMERIC = {"INT8", "INT16", "INT32", "INT64", "FLOAT", "DOUBLE"}


@dataclass(frozen=True)
class ServerVersion:
    """A Milvus server's version as it reports it, parsed."""

    reported: str
    number: tuple[int, int, int]
    lite: bool  # Milvus Lite (milvus-lite), not a Milvus server

    @classmethod
    def parse(cls, reported: str) -> ServerVersion:
        """From `get_server_version()`: "milvus_lite-3.2.2" is Milvus Lite, anything else a
        Milvus server ("v2.3.5-lite" is the `milvus` package's standalone server, "v2.4.9",
        "2.5.4")."""
        lite = reported.startswith(LITE_PREFIX)
        found = _NUMBER.search(reported)
        if found is None:
            raise StoreError(f"milvus: cannot read the server version {reported!r}")
        major, minor, patch = (int(part or 0) for part in found.groups())
        number = (major, minor, patch)
        if not lite and number[:2] < OLDEST:
            raise StoreError(f"milvus: the server is {reported}; dedup needs Milvus "
                             f"{OLDEST[0]}.{OLDEST[1]} or later (upsert, delete by filter, "
                             "embeddings in search results)")
        return cls(reported, number, lite)

    @property
    def name(self) -> str:
        kind = "Milvus Lite" if self.lite else "Milvus"
        return f"{kind} {'.'.join(map(str, self.number))}"

    @property
    def has_inverted_index(self) -> bool:
        return self.lite or self.number[:2] >= (2, 4)

    @property
    def orders_writes_by_timestamp(self) -> bool:
        """Whether a write acknowledged before another always has the older timestamp, as
        when every proxy takes timestamps from the root coordinator's one oracle (2.3 to
        2.5): then a read at a write's timestamp sees every write acknowledged before it.
        2.6's streaming nodes hand out timestamps from batches of their own, so dedup does
        not assume it there. Milvus Lite ignores consistency levels (every read sees every
        acknowledged write)."""
        return self.lite or self.number[:2] < (2, 6)

    @property
    def can_add_field(self) -> bool:
        return not self.lite and self.number[:2] >= (2, 6)

    def scalar_index(self, data_type: str) -> str:
        """The index for equality filters on a field of `data_type` (a DataType name)."""
        if self.has_inverted_index:
            return "INVERTED"
        return "STL_SORT" if data_type in _NUMERIC else "Trie"


def server_version(client: Any) -> ServerVersion:
    """The version of the Milvus `client` talks to."""
    return ServerVersion.parse(str(client.get_server_version()))
