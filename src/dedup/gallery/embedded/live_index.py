"""The store and the index derived from it, kept in step by one write lock.

Writes are applied to the store first (committed durably), then to the index, under the
lock, so the index never holds a vector the store does not.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from dedup.core.errors import CheckpointError
from dedup.gallery.embedded.index import Ids, VectorIndex
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.gallery")


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
        self.unremoved: set[int] = set()

    def remove(self, keys: Ids) -> None:
        """Under `writes`, once the store has erased `keys`: out of the index. A failure (no
        memory) leaves them in `unremoved`; searches drop them meanwhile, as the store no
        longer has them."""
        try:
            self.index.remove(keys)
        except Exception:
            self.unremoved.update(keys.tolist())
            log.exception("could not remove %d erased registration(s) from the index: "
                          "tried again before the next checkpoint", len(keys))

    def remove_unremoved(self) -> None:
        """Under `writes`, before a snapshot of the index: raises CheckpointError while the
        erased it still holds cannot be removed."""
        if not self.unremoved:
            return
        keys = np.array(sorted(self.unremoved), np.int64)
        try:
            self.index.remove(keys)
        except Exception as error:
            raise CheckpointError(f"the index still holds {len(keys)} erased registration(s) "
                                  f"it cannot remove ({error}): no checkpoint until it can"
                                  ) from error
        self.unremoved.clear()

    def swap(self, index: VectorIndex) -> None:
        """Under `writes`: `index`, built from the store and caught up with its log, holds
        none of the erased."""
        self.index = index
        self.unremoved.clear()
