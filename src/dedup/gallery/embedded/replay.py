"""The store's change log after a sequence: what it added and removed, and its replay onto
an index (at start, after a live rebuild, and by `dedup doctor`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dedup.gallery.embedded.index import VectorIndex
from dedup.gallery.embedded.store import Store
from dedup.gallery.embedded.store_format import OP_ADD
from dedup.gallery.embedded.vector_file import Keys

log = logging.getLogger("dedup.gallery")

# Added rows are read from the store and indexed this many at a time: a log after a failed
# import can hold millions of additions, whose vectors at once would not fit in memory.
REPLAY_BATCH = 20_000


@dataclass(frozen=True)
class ChangeDelta:
    """The logged changes after `since`, by key."""

    since: int
    current: int  # the store's sequence when the log was read
    logged: int  # how many changes the log holds after `since`
    added: Keys  # keys added after `since` and not removed since, in log order
    removed: set[int]  # keys removed after `since`
    removed_older: Keys  # of those, the ones not added after `since`, in increasing order

    @property
    def complete(self) -> bool:
        """False if a checkpoint has truncated the log past `since`: changes are missing."""
        return self.logged == self.current - self.since


def change_delta(store: Store, since: int) -> ChangeDelta:
    ops, keys, current = store.change_log(since)
    is_add = ops == OP_ADD[0]
    added, removed = keys[is_add], keys[~is_add]
    return ChangeDelta(since=since, current=current, logged=len(ops),
                       added=added[~np.isin(added, removed)] if len(removed) else added,
                       removed=set(removed.tolist()),
                       removed_older=np.setdiff1d(removed, added))


def replay_changes(store: Store, index: VectorIndex, covered: int, model_id: str
                   ) -> ChangeDelta | None:
    """Applies the logged changes after `covered` to `index`; returns them (the index now
    covers their `current`).

    None if the log has a gap (it was truncated past `covered`): rebuild instead.
    """
    delta = apply_logged_changes(store, index, covered, model_id)
    if not delta.complete:
        log.warning(
            "checkpoint covers change %d, store is at %d with %d logged changes after it: "
            "rebuilding", covered, delta.current, delta.logged,
        )
        return None
    return delta


def apply_logged_changes(store: Store, index: VectorIndex, covered: int, model_id: str
                         ) -> ChangeDelta:
    """The logged changes after `covered`, applied to `index` if the log holds them all
    (else, `complete` false, nothing is applied)."""
    delta = change_delta(store, covered)
    if delta.complete:
        apply_delta(store, index, delta, model_id)
        if delta.logged:
            log.info("replayed %d change(s) after sequence %d", delta.logged, covered)
    return delta


def apply_delta(store: Store, index: VectorIndex, delta: ChangeDelta, model_id: str) -> None:
    """Applies a complete delta to an index that covers `delta.since`, reading the added
    rows from the store REPLAY_BATCH at a time."""
    for start in range(0, len(delta.added), REPLAY_BATCH):
        chunk = delta.added[start:start + REPLAY_BATCH].tolist()
        ours = [face.key for face in store.faces(chunk, with_vectors=False)
                if face.registration.embedding_model == model_id]
        keys, vectors = store.vectors(ours)
        index.add(np.asarray(keys, np.int64), vectors)
    index.remove(delta.removed_older)
