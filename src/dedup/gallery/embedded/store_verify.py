"""The store's full consistency check: every record against its lookups and its vector."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dedup.core.errors import StoreDamaged
from dedup.gallery.embedded.store_format import checked_vectors, decode_registration, from_u64
from dedup.gallery.embedded.store_tables import TableReader

_MAX_PROBLEMS = 20
_PROGRESS_EVERY = 10_000


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


def _count_problems(tables: TableReader) -> list[str]:
    dbs = tables.dbs
    sizes = {name: tables.txn.stat(db)["entries"]
             for name, db in (("records", dbs.records), ("vectors", dbs.vectors),
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
    raw_vector = txn.get(packed, db=dbs.vectors)
    if raw_vector is None or len(raw_vector) != 4 * tables.dimension:
        problems.append(f"record {key}: no embedding of {tables.dimension} floats")
        return problems
    try:
        checked_vectors([key], np.frombuffer(raw_vector, np.float32)[None, :], tables.where)
    except StoreDamaged as error:
        problems.append(str(error))
    return problems
