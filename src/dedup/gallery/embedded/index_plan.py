"""What the index holds and which type it should be.

The index holds only the embeddings of the server's model: registrations another model
made (before a model change) stay in the store but are never compared with a probe.
"""

from __future__ import annotations

import logging
import math

from dedup.core.settings import IndexConfig
from dedup.gallery.embedded.index import (
    AUTO,
    BINARY_DEFAULT,
    FAST_SCAN_IVF,
    FLAT,
    SIGN_IVF,
    training_size,
    validate_kind,
)
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.gallery")
MAX_AUTO_LISTS = 4096
# "auto" goes back to a smaller type only once the gallery has shrunk this far below the
# threshold it grew past: a gallery hovering at a threshold, enrolments and erasures
# taking turns, would otherwise be rebuilt back and forth (at 1,000,000, k-means each time).
SWITCH_BACK_BELOW = 0.9


def kind_for(configured_kind: str, count: int, auto_threshold: int,
             lists_threshold: int, serving: str | None = None) -> str:
    """The index type for a gallery of `count` comparable registrations: the configured
    one; for "auto", Flat below `auto_threshold`, BinarySign512 from there on and
    FastScanIVF from `lists_threshold` on (why, with the measurements: see index.py). A
    larger type `serving` now is kept down to SWITCH_BACK_BELOW of its threshold."""
    if configured_kind != AUTO:
        return configured_kind
    grown = _auto_kind(count, auto_threshold, lists_threshold)
    if serving is None or _auto_rank(serving) <= _auto_rank(grown):
        return grown
    spared = _auto_kind(math.ceil(count / SWITCH_BACK_BELOW), auto_threshold, lists_threshold)
    return serving if _auto_rank(serving) <= _auto_rank(spared) else spared


def _auto_kind(count: int, auto_threshold: int, lists_threshold: int) -> str:
    if count >= max(lists_threshold, auto_threshold):
        return f"FastScanIVF{lists_for(count)}"
    return BINARY_DEFAULT if count >= auto_threshold else FLAT


def _auto_rank(kind: str) -> tuple[int, int]:
    """Where `kind` stands in auto's sequence, smallest first, FastScanIVF by its lists
    ((-1, 0): a type auto never picks). SignIVF, which auto chose before FastScanIVF, stands
    beside it: a gallery serving it moves to FastScanIVF of as many lists or more."""
    if kind == FLAT:
        return 0, 0
    if kind == BINARY_DEFAULT:
        return 1, 0
    lists = FAST_SCAN_IVF.match(kind) or SIGN_IVF.match(kind)
    return (2, int(lists.group(1))) if lists else (-1, 0)


def lists_for(count: int) -> int:
    """FastScanIVF's lists for `count` registrations: a power of two, at least 64 registrations
    a list, at most MAX_AUTO_LISTS (4,096: 244 a list at 1,000,000, 2,441 at 10,000,000)."""
    lists = 1
    while lists * 2 <= min(MAX_AUTO_LISTS, count // 64):
        lists *= 2
    return lists


class IndexPlan:
    def __init__(self, store: Store, model_id: str, config: IndexConfig) -> None:
        self.store = store
        self.model_id = model_id
        self.dimension = store.config.dimension
        self.configured_kind = validate_kind(config.index_factory, dimension=self.dimension)
        self.auto_threshold = config.auto_threshold
        self.lists_threshold = config.auto_lists_threshold
        # SignIVF and FastScanIVF calibrate on same-person pairs scoring at least this
        # (calibration.py).
        self.pair_score = config.calibration_min_score
        self.rebuild_niceness = config.rebuild_niceness

    def only_model(self) -> str | None:
        """Filter builds by model only when the store holds another model's embeddings."""
        return self.model_id if set(self.store.model_counts()) - {self.model_id} else None

    def comparable_count(self) -> int:
        return self.store.model_counts().get(self.model_id, 0)

    def can_train(self, kind: str) -> bool:
        return training_size(kind, self.dimension) <= self.comparable_count()

    def start_kind(self) -> str:
        """What to build at start when no checkpoint serves: the wanted type, but quickly:
        Flat while a trained type cannot be trained yet, and BinarySign512 while "auto"
        wants FastScanIVF (k-means and calibration follow in a live rebuild, while
        serving)."""
        wanted = self.wanted_kind()
        if not self.can_train(wanted):
            return FLAT
        if self.configured_kind == AUTO and training_size(wanted, self.dimension):
            return BINARY_DEFAULT
        return wanted

    def wanted_kind(self, serving: str | None = None) -> str:
        """The configured index type; for "auto", what fits the gallery's size (keeping
        the larger type `serving` now until the gallery is well below its threshold)."""
        return kind_for(self.configured_kind, self.comparable_count(), self.auto_threshold,
                        self.lists_threshold, serving)

    def warn_about_other_models(self) -> None:
        for model, count in self.store.model_counts().items():
            if model != self.model_id:
                log.warning(
                    "%d registration(s) were embedded by model %r, not the current %r: they "
                    "are left out of every check until enrolled again", count, model,
                    self.model_id,
                )
