"""The store's full consistency check: every record against its lookups, and every slot of
the vector file against the records (`dedup doctor`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dedup.gallery.embedded.store_format import OP_REMOVE, decode_registration, from_u64
from dedup.gallery.embedded.store_tables import TableReader
from dedup.gallery.embedded.stored_vectors import unit_rows

_MAX_PROBLEMS = 20
_PROGRESS_EVERY = 10_000
_SLOTS_AT_ONCE = 16_384


@dataclass(frozen=True)
class VectorCheck:
    slots: int  # the slots checked: keys 1 .. the last key assigned
    stored: int  # of them, stored registrations' (each must be a unit vector)
    problems: list[str]
    # Erased keys whose slot is not zeros yet while their OP_REMOVE is still in the change
    # log: a Delete zeroing it this moment, or a crash before it did (zeroed at next start).
    unzeroed: list[int]


def verify(tables: TableReader, progress: Callable[[int], object]) -> list[str]:
    """What is inconsistent, reading every record (reporting progress every 10,000)."""
    problems = _count_problems(tables)
    for done, (packed, raw) in enumerate(tables.txn.cursor(db=tables.dbs.records), start=1):
        problems.extend(_record_problems(tables, bytes(packed), bytes(raw)))
        if done % _PROGRESS_EVERY == 0:
            progress(_PROGRESS_EVERY)
        if len(problems) >= _MAX_PROBLEMS:
            problems.append(f"... stopped after {_MAX_PROBLEMS} problems")
            break
    return problems


def check_vectors(tables: TableReader, progress: Callable[[int], object]) -> VectorCheck:
    """Every slot up to the last key assigned: a stored registration's a finite unit vector,
    an erased one's zeros (reporting progress per block of slots)."""
    assigned = tables.meta(b"next_key") - 1
    stored = tables.record_keys()
    ops, logged_keys = tables.change_log(0)
    removed = set(logged_keys[ops == OP_REMOVE[0]].tolist())
    problems: list[str] = []
    unzeroed: list[int] = []
    for first in range(1, assigned + 1, _SLOTS_AT_ONCE):
        count = min(_SLOTS_AT_ONCE, assigned + 1 - first)
        block = tables.slots.block(first, count)
        if len(block) < count:
            problems.append(f"{tables.slots.path} holds no slot for key {first + len(block)}")
            break
        keys = np.arange(first, first + count, dtype=np.int64)
        live = np.isin(keys, stored, assume_unique=True)
        problems += _live_problems(tables, keys[live & ~unit_rows(block)])
        for key in keys[~live & block.any(axis=1)].tolist():
            if key in removed:
                unzeroed.append(key)
            else:
                problems.append(f"key {key} is erased but its slot in {tables.slots.path.name} "
                                "is not zeros")
        progress(count)
        if len(problems) >= _MAX_PROBLEMS:
            problems.append(f"... stopped after {_MAX_PROBLEMS} problems")
            break
    return VectorCheck(assigned, len(stored), problems, unzeroed)


def _live_problems(tables: TableReader, suspects: np.ndarray) -> list[str]:
    # A Delete committed after this snapshot may be zeroing the slot: not a problem.
    damaged = sorted(tables.still_stored(suspects.tolist())) if len(suspects) else []
    return [f"key {key}: its embedding in {tables.slots.path.name} is not a unit vector"
            for key in damaged]


def _count_problems(tables: TableReader) -> list[str]:
    dbs = tables.dbs
    sizes = {name: tables.txn.stat(db)["entries"]
             for name, db in (("records", dbs.records),
                              ("by_registration_id", dbs.by_registration_id))}
    counted = sum(tables.model_counts().values())
    if len(set(sizes.values()) | {counted}) != 1:
        return [f"entry counts disagree: {sizes}, registrations by model {counted}"]
    return []


def _record_problems(tables: TableReader, packed: bytes, raw: bytes) -> list[str]:
    txn, dbs, key = tables.txn, tables.dbs, from_u64(packed)
    try:
        registration = decode_registration(raw)
    except (ValueError, KeyError) as error:
        return [f"record {key} does not decode ({error})"]
    problems = []
    if txn.get(registration.registration_id.encode(), db=dbs.by_registration_id) != packed:
        problems.append(f"record {key}: registration_id lookup does not lead back to it")
    if registration.msisdn and txn.get(registration.msisdn.encode(), db=dbs.by_msisdn) != packed:
        problems.append(f"record {key}: msisdn lookup does not lead back to it")
    return problems
