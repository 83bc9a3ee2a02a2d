"""The store and the index derived from it, kept in step by one write lock.

Writes are applied to the store first (committed durably), then to the index, under the
lock, so the index never holds a vector the store does not; but for an erasure whose removal
from the index failed (no memory), whose keys it holds until they are removed again
(`unremoved`): before any checkpoint, or by a rebuild's swap.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from dedup.core.errors import CheckpointError
from dedup.gallery.embedded.index import Ids, VectorIndex
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.gallery")


class IndexHoldsErased(CheckpointError):
    """No checkpoint: the index holds erased registrations it cannot remove."""


class LiveIndex:
    def __init__(self, store: Store, model_id: str) -> None:
        self.store = store
        # The only model whose embeddings the index holds.
        self.model_id = model_id
        # Re-entrant, so that a check-then-insert can hold it across both steps.
        self.writes = threading.RLock()
        # Set once recovered at start; a rebuild swaps it under `writes`.
        self.index: VectorIndex
        # An offline import that ends by building its index from the store stores rows
        # without indexing them; until that build replaces `index`, it is not checkpointed.
        self.deferred = False
        # Keys erased from the store whose removal from the index failed: removed again
        # before any snapshot of the index is taken, so that no checkpoint holds their codes.
        # A list of the arrays as they came: appending one needs no memory to speak of.
        self._unremoved: list[Ids] = []

    def remove(self, keys: Ids) -> None:
        """Under `writes`, once the store has erased `keys`: out of the index. A failure (no
        memory) keeps them (`unremoved`); searches drop them meanwhile: a re-ranked or
        per-check search finds no record of them in the store, a sweep's skips them."""
        try:
            self.index.remove(keys)
        except Exception:
            self._unremoved.append(keys)
            log.exception("could not remove %d erased registration(s) from the index: "
                          "tried again before the next checkpoint", len(keys))

    def unremoved(self) -> Ids:
        """The keys erased from the store that the index may still hold, sorted."""
        parts = list(self._unremoved)
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def remove_unremoved(self) -> None:
        """Under `writes`, before a snapshot of the index: raises IndexHoldsErased while the
        erased it still holds cannot be removed."""
        if not self._unremoved:
            return
        keys = self.unremoved()
        try:
            self.index.remove(keys)
        except Exception as error:
            raise IndexHoldsErased(f"the index still holds {len(keys)} erased registration(s) "
                                  f"it cannot remove ({error!r}): no checkpoint until it can"
                                  ) from error
        self._unremoved = []

    def swap(self, index: VectorIndex) -> None:
        """Under `writes`: `index`, built from the store and caught up with its log, holds
        none of the erased."""
        self.index = index
        self._unremoved = []
