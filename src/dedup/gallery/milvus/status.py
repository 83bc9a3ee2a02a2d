"""What the Milvus backend reports about itself: Stats, the index status, metric gauges."""

from __future__ import annotations

import json
import threading
import time

from dedup.gallery.base import GalleryStats, Gauge, IndexStatus
from dedup.gallery.milvus.registrations import Registrations
from dedup.gallery.milvus.schema import PENDING


class SharedStats:
    """Stats for callers at once: each takes the outcome (figures, or the error) of a
    computation that began after it arrived, waiting for one if need be, so callers at once
    cost one or two computations, never one each. (On Milvus Lite a filtered count of
    100,000 rows takes seconds: eight Stats at once each ran past Milvus's call time limit.)
    The distinct ID numbers within come from Registrations.distinct's cache."""

    def __init__(self, rows: Registrations, dimension: int) -> None:
        self._rows, self._dimension = rows, dimension
        self._computing = threading.Lock()
        self._last: tuple[int, GalleryStats | Exception] | None = None  # began at (ns)

    def __call__(self) -> GalleryStats:
        arrived = time.monotonic_ns()
        with self._computing:
            last = self._last
            if last is None or last[0] <= arrived:
                last = self._last = (time.monotonic_ns(), self._outcome())
        if isinstance(last[1], Exception):
            raise last[1]
        return last[1]

    def _outcome(self) -> GalleryStats | Exception:
        try:
            return gallery_stats(self._rows, self._dimension)
        except Exception as error:  # shared with the callers waiting meanwhile
            return error


def gallery_stats(rows: Registrations, dimension: int) -> GalleryStats:
    count = rows.count(rows.live())
    distinct, by_model = rows.distinct()
    return GalleryStats(
        registrations=count, distinct_id_numbers=distinct,
        index_type=f"milvus:{rows.config.index_type}", dimension=dimension,
        index_vectors=rows.count(rows.comparable()), store_sequence=0,
        checkpoint_sequence=0, registrations_by_model=by_model)


def index_status(rows: Registrations, dimension: int) -> IndexStatus:
    """Milvus's index as configured: Milvus builds it, nothing is ever being rebuilt."""
    config = rows.config
    kind, exact = config.index_type, config.scores_exact  # the proto's "exact": the scores
    return IndexStatus(
        index_type=f"milvus:{kind}", dimension=dimension,
        vectors=rows.count(rows.comparable()), exact=exact,
        rerank_candidates=0 if exact else config.rerank_candidates,
        search_parameters=json.dumps(config.search_params, sort_keys=True)
        if config.search_params else "",
        configured_index_type=kind, wanted_index_type=kind, rebuilding=False,
        store_sequence=0, checkpoint_sequence=0,
        bytes_per_vector=4.0 * dimension if exact else 0.0)


def gauges(rows: Registrations) -> list[Gauge]:
    return [
        Gauge("dedup_milvus_calls", "calls this node made to Milvus since it started "
              "(each query iterator page counts)", float(rows.client.calls_made)),
        Gauge("dedup_milvus_strong_reads", "of those, reads at Strong consistency (each "
              "waits for Milvus's next time tick)", float(rows.client.strong_reads)),
        Gauge("dedup_registrations", "registrations in Milvus", rows.count(rows.live())),
        Gauge("dedup_milvus_pending_claims",
              "enrolments being confirmed (PENDING rows, all nodes)",
              rows.count(f"state == {PENDING}"))]
