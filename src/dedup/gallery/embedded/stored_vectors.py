"""Embeddings read from the vector file, told apart from erased slots and from damage.

A slot that does not hold a unit vector is erased (zeros, or being zeroed by a Delete at this
moment: its record is already gone) or damaged. The store's records decide, read afresh: a key
still stored whose slot is not a unit vector is damage (StoreDamaged naming the file); any
other such key is left out, as deleted. So the hot path, re-ranking, reads only the map.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dedup.core.errors import StoreDamaged
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.vector_file import Keys, VectorFile

# Which of these keys the store holds now (a read that sees the latest commit).
StillStored = Callable[[list[int]], set[int]]

UNIT_TOLERANCE = 1e-3


def unit_rows(matrix: Matrix) -> npt.NDArray[np.bool_]:
    """Which rows are finite unit vectors (garbage bytes overflow to inf or NaN: not unit)."""
    with np.errstate(all="ignore"):
        squares = np.einsum("ij,ij->i", matrix, matrix)
    unit: npt.NDArray[np.bool_] = np.isfinite(squares) & (
        np.abs(np.sqrt(squares) - 1.0) <= UNIT_TOLERANCE)
    return unit


def stored_rows(slots: VectorFile, keys: Keys, still_stored: StillStored
                ) -> tuple[list[int], Matrix]:
    """The embeddings of those `keys` that are stored, in order, and those keys."""
    keys = keys[keys >= 1]  # an index pads a short answer with -1
    rows, stored = rows_in_place(slots, keys, still_stored)
    if stored.all():
        return keys.tolist(), rows
    return keys[stored].tolist(), rows[stored]


def rows_in_place(slots: VectorFile, keys: Keys, still_stored: StillStored
                  ) -> tuple[Matrix, npt.NDArray[np.bool_]]:
    """A row for each of `keys`, in their order and shape (…, dimension), and which rows hold
    a stored embedding (the others: keys < 1, as an index pads a short answer, or erased);
    read in one gather, for callers that score many candidates at once."""
    asked = keys >= 1
    rows = slots.rows(np.where(asked, keys, 1).ravel())
    good = unit_rows(rows) & asked.ravel()
    if not good.all():
        rows[~good] = 0.0
        bad = keys.ravel()[asked.ravel() & ~good]
        damaged = sorted(still_stored(bad.tolist())) if len(bad) else []
        if damaged:
            raise not_a_unit_vector(slots.path, damaged)
    return rows.reshape(*keys.shape, slots.dimension), good.reshape(keys.shape)


def not_a_unit_vector(path: Path, keys: list[int]) -> StoreDamaged:
    return StoreDamaged(f"{path}: the store is damaged: the embedding stored under key "
                        f"{keys[0]} is not a unit vector ({len(keys)} such in this batch); "
                        "restore it from a backup (run `dedup doctor` for a full check)")
