"""The bytes of the store's entries: keys, metadata values and registrations."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import numpy.typing as npt

from dedup.core.errors import StoreError
from dedup.core.records import Registration

# meta "format": the layout of the store, checked on opening. 2: embeddings in the vector
# file beside LMDB (vector_file.py); 1: in LMDB's `vectors` database, upgraded at opening
# (store_upgrade.py).
FORMAT = 2
LEGACY_FORMAT = 1
LEGACY_VECTORS_DB = "vectors"  # format 1's database of embeddings: key -> float32 bytes
OP_ADD = b"A"  # change-log operations
OP_REMOVE = b"R"
_LOGGED_CHANGE = np.dtype([("op", "u1"), ("key", ">u8")])  # a change-log entry's value

ERASED_SINCE = b"erased_since"  # meta: when the first erasure not yet compacted away was made
MODEL_PREFIX = b"model:"  # meta "model:<model_id>": registrations per embedding model

_U64 = struct.Struct(">Q")


def u64(value: int) -> bytes:
    return _U64.pack(value)


def from_u64(raw: bytes | memoryview | None) -> int:
    if raw is None:
        raise StoreError("the store is damaged: a metadata or index entry is missing")
    return int(_U64.unpack(raw)[0])


def model_key(model_id: str) -> bytes:
    return MODEL_PREFIX + model_id.encode()


def party_key(party: int | str) -> bytes:
    """One side of a settled pair in an adjudications key, self-delimiting: b"k" and an
    enrolled registration's key, or b"p", an application's registration_id and a NUL."""
    if isinstance(party, int):
        return b"k" + u64(party)
    return b"p" + party.encode() + b"\x00"


def split_party(raw: bytes) -> tuple[int | str, bytes]:
    """The party at the start of `raw`, and what follows it."""
    if raw[:1] == b"k":
        return from_u64(raw[1:9]), raw[9:]
    name, _, rest = raw[1:].partition(b"\x00")
    return name.decode(), rest


def encode_registration(registration: Registration) -> bytes:
    fields: dict[str, object] = {
        "r": registration.registration_id,
        "i": registration.id_number,
        "m": registration.msisdn,
        "c": registration.carrier,
        "g": registration.region,
        "t": registration.enrolled_at_us,
        "e": registration.embedding_model,
        "b": registration.enrolled_by,
    }
    # Only when known: a registration without them is written as before they existed.
    if registration.quality is not None:
        fields["q"] = registration.quality
    if registration.client_quality is not None:
        fields["k"] = registration.client_quality
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_registration(raw: bytes) -> Registration:
    fields = json.loads(raw)
    return Registration(
        registration_id=fields["r"],
        id_number=fields["i"],
        msisdn=fields["m"],
        carrier=fields["c"],
        region=fields["g"],
        enrolled_at_us=fields["t"],
        embedding_model=fields.get("e", ""),
        enrolled_by=fields.get("b", ""),  # not in records written before it was recorded
        quality=fields.get("q"),  # only in records of photos since it is recorded
        client_quality=fields.get("k"),  # only when the client sent one
    )


def logged_changes(txn: lmdb.Transaction, changes: Any, after: int, where: Path
                   ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The op and the key of each change in the log `changes` after sequence `after`, in log
    order, as two arrays: 9 bytes a change, where an object apiece took ~168 (an import of
    10,000,000 that failed leaves that many changes for the next start to replay)."""
    cursor = txn.cursor(db=changes)
    if not cursor.set_range(u64(after + 1)):
        return np.empty(0, np.uint8), np.empty(0, np.int64)
    values = cursor.iternext(keys=False, values=True)
    entries = np.concatenate([_logged(chunk, where) for chunk in
                              iter(lambda: list(itertools.islice(values, 1 << 14)), [])])
    return entries["op"].copy(), entries["key"].astype(np.int64)


def _logged(values: list[bytes | memoryview], where: Path) -> npt.NDArray[np.void]:
    # Checked entry by entry: two damaged entries whose lengths add up to 18 would be misread.
    if any(len(value) != _LOGGED_CHANGE.itemsize for value in values):
        raise StoreError(f"{where}: the store is damaged: a change-log entry is not "
                         f"{_LOGGED_CHANGE.itemsize} bytes")
    return np.frombuffer(b"".join(values), dtype=_LOGGED_CHANGE)
