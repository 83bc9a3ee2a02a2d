"""The store and the index derived from it, kept in step by one write lock.

Writes are applied to the store first (committed durably), then to the index, under the
lock, so the index never holds a vector the store does not.
"""

from __future__ import annotations

import threading

from dedup.gallery.embedded.index import VectorIndex
from dedup.gallery.embedded.store import Store


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
