"""`dedup migrate --from DATA_DIR --to URI`: copy an embedded deployment into Milvus.

Registrations go over in key order, a batch at a time, under their LMDB keys as upserts: a
batch copied twice is stored once. After each batch the last key copied is written to a
state file, so an interrupted run resumes after it (from the start when the target holds
nothing of what the earlier run copied there: dropped or made anew since). Then the audit
trail (as the chain "embedded:<data dir>", every record and hash unchanged) and the
adjudications. Last, the copy is verified: Milvus holds exactly the store's registrations,
key by key, and a sample of stored embeddings finds the same nearest registrations in both
(exact top-k from the store). The data directory is locked throughout: no server may write
it meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedup.core.errors import StoreError
from dedup.core.files import open_private
from dedup.core.settings import MilvusConfig
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.checkpoint import fsync_directory
from dedup.gallery.embedded.data_dir import lock_data_dir, refuse_unfinished_backup
from dedup.gallery.embedded.layout import store_file
from dedup.gallery.embedded.store import Store
from dedup.gallery.milvus import MilvusGallery

log = logging.getLogger("dedup.migrate")

STATE_FILE = "milvus-migration.json"
# Sampled embeddings per Milvus search: a search of a hundred over a million freshly copied
# rows outlasted a call's time limit on a Milvus 2.3 server (2 cores).
SAMPLES_PER_SEARCH = 10
TOP_K = 10
_KEYS_A_PAGE = 16_384
SCORE_TOLERANCE = 1e-5

Advance = Callable[[int], None]


@dataclass(frozen=True)
class Migration:
    copied: int
    resumed_after: int
    started_over: bool  # the state file's target had lost an earlier run's copy
    audit_records: int
    adjudications: int
    store_registrations: int
    milvus_registrations: int
    sampled: int
    sample_agreeing: int  # sampled probes whose top-k keys are the same in both

    # Keys the store holds and Milvus lacks, and keys Milvus holds the store does not (erased
    # from the store since an earlier run copied them): compared key by key, not by count.
    missing_in_milvus: int = 0
    not_in_store: int = 0

    @property
    def verified(self) -> bool:
        return (self.store_registrations == self.milvus_registrations
                and not self.missing_in_milvus and not self.not_in_store
                and self.sample_agreeing == self.sampled)


def _resume_point(state_file: Path, config: MilvusConfig) -> int:
    """The last key copied to this Milvus collection by an earlier run, else 0."""
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as error:
        raise StoreError(f"{state_file}: unreadable migration state ({error}); delete it to "
                         "copy everything again (copies are upserts: nothing is duplicated; "
                         "registrations erased in Milvus since are copied back too)"
                         ) from error
    same_target = state.get("uri") == config.uri and state.get("prefix") == config.prefix
    return int(state.get("last_key", 0)) if same_target else 0


def _save_state(state_file: Path, config: MilvusConfig, last_key: int) -> None:
    """Durably: a state file a power cut left empty would have the run start over, and an
    operator follow its error's advice."""
    temporary = state_file.with_suffix(".tmp")
    with open_private(temporary, "wb") as handle:
        handle.write(json.dumps({"uri": config.uri, "prefix": config.prefix,
                                 "last_key": last_key}).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, state_file)
    fsync_directory(state_file.parent)


def migrate(data_dir: Path, config: MilvusConfig, batch: int, sample: int,
            start: Callable[[int, int], Advance]) -> Migration:
    """`start(total, already_done)` makes the progress callback (a bar in the CLI). Holds
    the data directory's lock throughout: a server writing it meanwhile would leave an
    enrolment uncopied or an erased registration in Milvus."""
    if not store_file(data_dir).exists():
        raise StoreError(f"{data_dir}: no dedup store to migrate")
    refuse_unfinished_backup(data_dir)
    with lock_data_dir(data_dir):
        return _migrate(data_dir, config, batch, sample, start)


def _migrate(data_dir: Path, config: MilvusConfig, batch: int, sample: int,
             start: Callable[[int, int], Advance]) -> Migration:
    store = Store.reader(data_dir)
    try:
        counts = store.model_counts()
        model_id = max(counts, key=lambda model: counts[model]) if counts else ""
        target = MilvusGallery(config, model_id, data_dir=data_dir, background=False)
        try:
            state_file = data_dir / STATE_FILE
            resumed = _resume_point(state_file, config)
            done = _count_upto(store, resumed)
            started_over = bool(resumed) and _earlier_copy_gone(target, resumed, done,
                                                                state_file)
            if started_over:
                resumed, done = 0, 0
            copied = _copy_registrations(store, target, batch, resumed, state_file,
                                         start(store.count(), done))
            audit = target.import_audit(f"embedded:{data_dir.resolve()}",
                                        store.audit_records())
            adjudications = target.import_settlements(store.settlements())
            target.checkpoint()
            agreeing, sampled = _compare_samples(store, target, sample)
            missing, extra = _keys_differing(store, target)
            return Migration(copied, resumed, started_over, audit, adjudications, store.count(),
                             target.stats().registrations, sampled, agreeing, missing, extra)
        finally:
            target.close(checkpoint=False)
    finally:
        store.close()


def _earlier_copy_gone(target: MilvusGallery, last_key: int, copied: int,
                       state_file: Path) -> bool:
    """Whether the target holds nothing of what an earlier run copied there (dropped or made
    anew since: copy from the start). Holding only part of it is refused: registrations
    erased there since would be copied back."""
    held = target.count_keys_upto(last_key)
    if held == 0:
        return True
    if held < copied:
        raise StoreError(
            f"the target holds {held:,} of the {copied:,} registrations an earlier run copied "
            f"there (up to key {last_key}): erased there since, or partly dropped? To copy "
            f"everything again, erased ones too, delete {state_file} and run again")
    return False


def _keys_differing(store: Store, target: MilvusGallery) -> tuple[int, int]:
    """How many of the store's keys Milvus lacks, and how many keys Milvus holds that the
    store does not."""
    stored = store.record_keys()
    copied = target.keys_upto(int(stored[-1]) if len(stored) else 0, _KEYS_A_PAGE)
    beyond = target.count_keys_upto(2**62) - len(copied)  # keys past the store's last
    held = np.isin(stored, copied, assume_unique=True)
    return int((~held).sum()), int(len(copied) - held.sum()) + beyond


def _count_upto(store: Store, last_key: int) -> int:
    """Registrations an earlier run copied (keys up to `last_key`)."""
    done = 0
    if last_key:
        for keys, _ in store.iter_vectors(20_000):
            done += sum(1 for key in keys if key <= last_key)
            if keys[-1] >= last_key:
                break
    return done


def _copy_registrations(store: Store, target: MilvusGallery, batch: int, after: int,
                        state_file: Path, advance: Advance) -> int:
    copied = 0
    for keys, matrix in store.iter_vectors(batch, after=after):
        faces = store.faces(keys, with_vectors=False)
        by_key = {face.key: face.registration for face in faces}
        target.insert_rows([(key, by_key[key], vector)
                            for key, vector in zip(keys, matrix, strict=True)
                            if key in by_key])
        _save_state(state_file, target.config, keys[-1])
        copied += len(keys)
        advance(len(keys))
    return copied


def _compare_samples(store: Store, target: MilvusGallery, size: int) -> tuple[int, int]:
    """How many of `size` stored embeddings (spread over the store) find the same top-k
    registrations in Milvus as by exact search over the store."""
    only = target.model_id if len(store.model_counts()) > 1 else None
    if size <= 0:
        return 0, 0
    with store.snapshot() as snapshot:
        probes = snapshot.sample(size, target.model_id, only)[:size]
    if not len(probes):
        return 0, 0
    k = top_k(target.config)
    expected, best = _exact_top_k(store, probes, k, only)
    found = [neighbours for start in range(0, len(probes), SAMPLES_PER_SEARCH)
             for neighbours in target.neighbours_of_many(
                 probes[start:start + SAMPLES_PER_SEARCH], k, -1.0)]
    if k == 1:  # an approximate index: its own stored vector (score 1), re-scored exactly
        agreeing = sum(1 for want, got in zip(best, found, strict=True)
                       if got and abs(got[0][1] - want) <= SCORE_TOLERANCE)
    else:
        agreeing = sum(1 for want, got in zip(expected, found, strict=True)
                       if want == {key for key, _ in got})
    return agreeing, len(probes)


def top_k(config: MilvusConfig) -> int:
    """The neighbours a sample must find alike: the exact top-10 on FLAT; on an approximate
    index, whose top-10 of mostly unrelated registrations may rightly differ, the best one
    (the sample's own registration, found and re-scored from its copied embedding)."""
    return TOP_K if config.exact else 1


def _exact_top_k(store: Store, probes: Matrix, k: int, only: str | None
                 ) -> tuple[list[set[int]], list[float]]:
    best_scores = np.full((len(probes), k), -np.inf, np.float32)
    best_keys = np.full((len(probes), k), -1, np.int64)
    for keys, matrix in store.iter_vectors(20_000, only_model=only):
        scores = np.hstack([best_scores, probes @ matrix.T])
        ids = np.hstack([best_keys, np.broadcast_to(np.asarray(keys, np.int64),
                                                   (len(probes), len(keys)))])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_keys = np.take_along_axis(ids, top, axis=1)
    return ([{int(key) for key in row if key >= 0} for row in best_keys],
            [float(row[0]) for row in best_scores])
