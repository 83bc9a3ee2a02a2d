"""The store and the index derived from it, kept in step by one write lock.

Writes are applied to the store first (committed durably), then to the index, under the
lock, so the index never holds a vector the store does not, and holds every one of the
server's model. Should the index fail to take a change (no memory), the store's commit stands
and the index catches up before the next checkpoint, or by a rebuild's swap: an erasure it
could not remove (`unremoved`) is skipped by every search meanwhile, a registration it could
not add (`unadded`) is scored exactly by every search. No checkpoint is written until the
index is in step: one covering a change the index lacks would be loaded by a read replica,
which replays only the log after it, and miss the registration for good.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from dedup.core.errors import CheckpointError
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.index import Ids, VectorIndex
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.gallery")


class IndexOutOfStep(CheckpointError):
    """No checkpoint: the index cannot take changes the store made (no memory)."""


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
        # Keys stored whose addition to the index failed: added before any snapshot.
        self._unadded: list[Ids] = []

    def add(self, keys: Ids, vectors: Matrix, reraise: bool = False) -> None:
        """Under `writes`, once the store holds `keys`: into the index. A failure (no memory)
        keeps them (`unadded`), scored exactly by every search meanwhile; `reraise`: then
        raises it too (a bulk load stops)."""
        try:
            self.index.add(keys, vectors)
        except Exception:
            self._unadded.append(keys)
            log.exception("could not add %d stored registration(s) to the index: searches "
                          "score them exactly until it can, tried before the next "
                          "checkpoint", len(keys))
            if reraise:
                raise

    def unadded(self) -> Ids:
        """The keys stored that the index may lack, sorted."""
        return _keys_of(self._unadded)

    def add_unadded(self) -> None:
        """Under `writes`, before a snapshot of the index: adds the registrations it lacks
        (not those erased since); raises IndexOutOfStep while it cannot."""
        if not self._unadded:
            return
        try:
            kept, vectors = self.store.vectors(self.unadded())
            keys = np.asarray(kept, np.int64)
            self.index.remove(keys)  # any a failed add put in
            self.index.add(keys, vectors)
        except Exception as error:
            raise IndexOutOfStep(f"the index lacks stored registrations it cannot add "
                                 f"({error!r}): no checkpoint until it can") from error
        self._unadded = []

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
        return _keys_of(self._unremoved)

    def remove_unremoved(self) -> None:
        """Under `writes`, before a snapshot of the index: raises IndexOutOfStep while the
        erased it still holds cannot be removed."""
        if not self._unremoved:
            return
        keys = self.unremoved()
        try:
            self.index.remove(keys)
        except Exception as error:
            raise IndexOutOfStep(f"the index still holds {len(keys)} erased registration(s) "
                                  f"it cannot remove ({error!r}): no checkpoint until it can"
                                  ) from error
        self._unremoved = []

    def swap(self, index: VectorIndex) -> None:
        """Under `writes`: `index`, built from the store and caught up with its log, holds
        every registration stored and none erased."""
        self.index = index
        self._unremoved, self._unadded = [], []


_NO_KEYS: Ids = np.empty(0, np.int64)
_NO_KEYS.flags.writeable = False


def _keys_of(parts: list[Ids]) -> Ids:
    """Every check asks (search.py): nothing allocated when there are none."""
    parts = list(parts)  # as it is now: appended to under `writes`, read without
    return np.unique(np.concatenate(parts)) if parts else _NO_KEYS
