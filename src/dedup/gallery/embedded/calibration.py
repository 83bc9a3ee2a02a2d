"""How many lists a SignIVF or FastScanIVF index searches: measured at its build on the
gallery's own duplicates.

How far a probe's matches lie from the lists nearest it depends on the gallery. On galleries
with structure (an uneven spectrum, persons gathered in groups) an eighth of 4,096 lists held
0.997-0.999 of the duplicates of 1,000,000 registrations; on an isotropic one a quarter held
0.986 (benchmarks/ivf_at_scale.py). So no fixed nprobe is safe, and the build measures it.

Two registrations under one ID number that score at least the review threshold (the lowest
score a verdict turns on) with each other are two captures of one person, as a probe and its
match are. Each such pair's first
registration is searched as a probe would be, at nprobe = nlist/64, nlist/32, ..., nlist; the
first doubling whose candidates hold the partner for at least TARGET of the pairs is then
narrowed down to a quarter of a doubling, and the smallest nprobe found reaching TARGET is kept.
With fewer than MIN_PAIRS pairs nothing is measured and every list is searched: the index
then finds what the flat scan of the same codes finds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from dedup.core.settings import Limits
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.index import (
    CALIBRATION_TARGET,
    Calibration,
    PartitionedIndex,
    SearchOptions,
)
from dedup.gallery.embedded.store import Snapshot

log = logging.getLogger("dedup.gallery")

TARGET = CALIBRATION_TARGET
MAX_PAIRS = 2_000
MIN_PAIRS = 200
SEED = 20191201
SEARCH_BATCH = 256
COARSEST = 64  # the first nprobe tried is nlist / COARSEST
REFINEMENTS = 2  # geometric halvings of the last doubling (see narrowed)


def calibrate_on_snapshot(index: PartitionedIndex, snapshot: Snapshot, model_id: str,
                          only_model: str | None, min_score: float) -> None:
    """Calibrates on pairs scoring at least `min_score`; `only_model`: set when the store
    holds other models' embeddings too (pairs are then drawn among `model_id`'s only)."""
    first, partners = snapshot.same_id_pairs(MAX_PAIRS, only_model, SEED, min_score)
    calibration = calibrate(index, first, np.asarray(partners, np.int64))
    index.calibrated(calibration)
    log.info("%s: nprobe %d (%s)", index.kind, calibration.nprobe, calibration.describe())


def calibrate(index: PartitionedIndex, queries: Matrix, partners: np.ndarray) -> Calibration:
    """The smallest nprobe at which the candidates of `queries[i]` hold `partners[i]` for
    at least TARGET of the pairs, to within a quarter of a doubling; every list when there
    are too few pairs to tell."""
    if len(partners) < MIN_PAIRS:
        return Calibration(nprobe=index.nlist, pairs=len(partners), recall={})
    recall: dict[int, float] = {}

    def reached(nprobe: int) -> bool:
        recall[nprobe] = share_found(index, queries, partners, nprobe)
        return recall[nprobe] >= TARGET

    failed = 0
    for nprobe in nprobes_to_try(index.nlist):
        if reached(nprobe):
            return Calibration(nprobe=narrowed(reached, failed, nprobe),
                               pairs=len(partners), recall=recall)
        failed = nprobe
    return Calibration(nprobe=index.nlist, pairs=len(partners), recall=recall)


def narrowed(reached: Callable[[int], bool], failed: int, passed: int) -> int:
    """Between the doubling that `failed` and the one that `passed`: two halvings of the
    ratio (each a geometric midpoint), so the nprobe kept is at most 2**(1/4) of the
    smallest above `failed` that reaches the target, as far as the share found rises with
    nprobe (more lists can push a partner out of the candidates: it is measured, not
    bounded). With `failed` 0 (the first nprobe tried passed) nothing is narrowed: the
    midpoint is 0. A search's cost grows with its nprobe: at 10,000,000 (4,096 lists) the
    doubling from 256 to 512 was 0.996 -> 0.9985 of the pairs, so 512 where 362 or 431 may
    do."""
    for _ in range(REFINEMENTS):
        middle = round(math.sqrt(failed * passed))
        if not failed < middle < passed:
            break
        if reached(middle):
            passed = middle
        else:
            failed = middle
    return passed


def nprobes_to_try(nlist: int) -> list[int]:
    tried, nprobe = [], max(1, nlist // COARSEST)
    while nprobe < nlist:
        tried.append(nprobe)
        nprobe *= 2
    return [*tried, nlist]


def share_found(index: PartitionedIndex, queries: Matrix, partners: np.ndarray, nprobe: int
                ) -> float:
    # A check asks the index for at least min_search_k candidates; +1: the query's own
    # registration is in the index too.
    depth, options = Limits().min_search_k + 1, SearchOptions(nprobe=nprobe)
    found = 0
    for start in range(0, len(queries), SEARCH_BATCH):
        results = index.search(queries[start:start + SEARCH_BATCH], depth, options)
        wanted = partners[start:start + SEARCH_BATCH]
        found += sum(int(partner in ids) for (ids, _), partner in
                     zip(results, wanted, strict=True))
    return found / len(partners)
