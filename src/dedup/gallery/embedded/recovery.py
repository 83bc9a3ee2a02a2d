"""The index at start: its checkpoint loaded and the store's change log after it replayed.

A missing or damaged checkpoint, a change log that no longer reaches back to it, or any
disagreement with the store is a warning and a rebuild from the store.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dedup.core.errors import CheckpointError
from dedup.gallery.embedded.checkpoint import temporary_of
from dedup.gallery.embedded.checkpointer import Checkpointer
from dedup.gallery.embedded.index import VectorIndex, load_index
from dedup.gallery.embedded.index_plan import IndexPlan
from dedup.gallery.embedded.rebuild import build_in_process
from dedup.gallery.embedded.replay import replay_changes

log = logging.getLogger("dedup.gallery")


def recover_index(plan: IndexPlan, checkpointer: Checkpointer,
                  rebuild_file: Path) -> tuple[VectorIndex, int]:
    """The index as of the store's latest change, and the change the checkpoint on disk
    covers. `rebuild_file`: a live rebuild's side file, left over if it never swapped."""
    store, model_id, path = plan.store, plan.model_id, checkpointer.path
    plan.warn_about_other_models()
    # Files a crash may have left, each holding every embedding as of its writing (erased
    # ones among them): nothing reads them, and nothing else would ever replace them.
    for leftover in (rebuild_file, temporary_of(rebuild_file), temporary_of(path)):
        leftover.unlink(missing_ok=True)
    try:
        index, covered = load_index(path, store.config.dimension, model_id)
    except CheckpointError as error:
        if path.exists():
            log.warning("index checkpoint unusable, rebuilding from the store: %s", error)
        else:
            log.info("no index checkpoint at %s, building from the store", path)
        return _rebuild_at_start(plan, checkpointer)
    delta = replay_changes(store, index, covered, model_id)
    if delta is None:
        return _rebuild_at_start(plan, checkpointer)
    count = plan.comparable_count()
    if len(index) != count:
        log.warning(
            "index holds %d vectors after replay but the store holds %d: rebuilding",
            len(index), count,
        )
        return _rebuild_at_start(plan, checkpointer)
    if delta.current != covered:
        # The checkpoint on disk still holds those erased since it was written.
        return index, checkpointer.save_at_start(index, delta.current, covered,
                                                 holds_erased=len(delta.removed_older) > 0)
    return index, delta.current


def _rebuild_at_start(plan: IndexPlan, checkpointer: Checkpointer) -> tuple[VectorIndex, int]:
    started = time.monotonic()
    kind = plan.start_kind()  # a rebuild switches to the wanted type later
    built = build_in_process(plan.store, kind, plan.model_id, plan.only_model(),
                             lambda *_: None, plan.pair_score)
    log.info("built a %s index from the store: %d vectors in %.1f s",
             kind, len(built.index), time.monotonic() - started)
    # An unusable checkpoint may still hold anyone erased since it was written.
    return built.index, checkpointer.save_at_start(built.index, built.sequence, 0,
                                                   holds_erased=checkpointer.path.exists())
