"""The gallery: the store and the index derived from it, kept in step.

Writes are serialised by one lock and applied to LMDB first (committed durably), then to
the index, so the index never holds a vector the store does not. At start the index is
loaded from its checkpoint and the store's change log after it is replayed; a missing or
damaged checkpoint, or any disagreement with the store, is a warning and a rebuild.

The index holds only the embeddings of the server's model: registrations another model
made (before a model change) stay in the store but are never compared with a probe.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._checkpoint import write_checkpoint
from ._config import StoreConfig
from ._errors import CheckpointError
from ._index import FlatIndex, VectorIndex
from ._models import DeleteKey, Registration
from ._policy import Scored
from ._store import OP_ADD, Store
from ._vectors import Vector

log = logging.getLogger("dedup.gallery")

CHECKPOINT_FILE = "index.ckpt"
REBUILD_BATCH = 20_000


@dataclass(frozen=True)
class GalleryStats:
    registrations: int
    distinct_id_numbers: int
    index_type: str
    dimension: int
    index_vectors: int
    store_sequence: int
    checkpoint_sequence: int
    registrations_by_model: dict[str, int]


class Gallery:
    def __init__(self, config: StoreConfig, model_id: str) -> None:
        self.config = config
        self.model_id = model_id
        self.data_dir = Path(config.data_dir)
        self.checkpoint_path = self.data_dir / CHECKPOINT_FILE
        self.store = Store(config)
        # Re-entrant, so that a check-then-insert can hold it across both steps.
        self._writes = threading.RLock()
        self._checkpointing = threading.Lock()
        self._closed = threading.Event()
        self.index: VectorIndex
        self.index, self.checkpoint_sequence = self._recover_index()
        self._last_checkpoint_time = time.monotonic()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_periodically, name="dedup-checkpointer", daemon=True
        )
        self._checkpointer.start()

    # -- start-up --------------------------------------------------------------------

    def _recover_index(self) -> tuple[VectorIndex, int]:
        self._warn_about_other_models()
        try:
            index, covered = FlatIndex.load(self.checkpoint_path, self.config.dimension,
                                            self.model_id)
        except CheckpointError as error:
            if self.checkpoint_path.exists():
                log.warning("index checkpoint unusable, rebuilding from the store: %s", error)
            else:
                log.info("no index checkpoint at %s, building from the store", self.checkpoint_path)
            return self._rebuild_and_checkpoint()
        if not self._replay(index, covered):
            return self._rebuild_and_checkpoint()
        count = self._comparable_count()
        if len(index) != count:
            log.warning(
                "index holds %d vectors after replay but the store holds %d: rebuilding",
                len(index), count,
            )
            return self._rebuild_and_checkpoint()
        sequence = self.store.sequence()
        if sequence != covered:
            self._save_checkpoint(index, sequence)
        return index, sequence

    def _replay(self, index: VectorIndex, covered: int) -> bool:
        """Applies the logged changes after the checkpoint; False if the log has a gap."""
        changes, current = self.store.changes_after(covered)
        if covered > current or len(changes) != current - covered:
            log.warning(
                "checkpoint covers change %d, store is at %d with %d logged changes after it: "
                "rebuilding", covered, current, len(changes),
            )
            return False
        added = [change.key for change in changes if change.op == OP_ADD]
        removed = {change.key for change in changes if change.op != OP_ADD}
        alive = [key for key in added if key not in removed]
        ours = [face.key for face in self.store.faces(alive, with_vectors=False)
                if face.registration.embedding_model == self.model_id]
        keys, vectors = self.store.vectors(ours)
        index.add(np.asarray(keys, np.int64), vectors)
        index.remove(np.asarray(sorted(removed.difference(added)), np.int64))
        if changes:
            log.info("replayed %d change(s) after the checkpoint", len(changes))
        return True

    def _rebuild_and_checkpoint(self) -> tuple[VectorIndex, int]:
        started = time.monotonic()
        sequence = self.store.sequence()
        index = FlatIndex(self.config.dimension)
        others = set(self.store.model_counts()) - {self.model_id}
        only = self.model_id if others else None
        for keys, vectors in self.store.iter_vectors(REBUILD_BATCH, only_model=only):
            index.add(np.asarray(keys, np.int64), vectors)
        log.info(
            "built the index from the store: %d vectors in %.1f s",
            len(index), time.monotonic() - started,
        )
        self._save_checkpoint(index, sequence)
        return index, sequence

    def _comparable_count(self) -> int:
        return self.store.model_counts().get(self.model_id, 0)

    def _warn_about_other_models(self) -> None:
        for model, count in self.store.model_counts().items():
            if model != self.model_id:
                log.warning(
                    "%d registration(s) were embedded by model %r, not the current %r: they "
                    "are left out of every check until enrolled again", count, model,
                    self.model_id,
                )

    # -- writes ----------------------------------------------------------------------

    @contextmanager
    def exclusive_writes(self) -> Iterator[None]:
        """Holds off every other write, e.g. across a check and the insert it allows."""
        with self._writes:
            yield

    def insert(self, registration: Registration, vector: Vector) -> Registration:
        """Stores a registration whose vector the server's model made, then indexes it."""
        with self._writes:
            face = self.store.insert(self._stamped(registration), vector)
            self.index.add(np.array([face.key], np.int64), vector.reshape(1, -1))
        return face.registration

    def insert_many(self, batch: list[tuple[Registration, Vector]]) -> list[Registration]:
        """Stores a batch in one durable transaction (bulk loads), then indexes it."""
        with self._writes:
            faces = self.store.insert_many([(self._stamped(r), v) for r, v in batch])
            keys = np.array([face.key for face in faces], np.int64)
            self.index.add(keys, np.vstack([vector for _, vector in batch]))
        return [face.registration for face in faces]

    def _stamped(self, registration: Registration) -> Registration:
        return dataclasses.replace(registration, embedding_model=self.model_id)

    def delete(self, by: DeleteKey, value: str) -> list[Registration]:
        with self._writes:
            faces = self.store.delete(by, value)
            self.index.remove(np.array([face.key for face in faces], np.int64))
        return [face.registration for face in faces]

    # -- reads -----------------------------------------------------------------------

    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        """The probe's nearest registrations scoring >= floor, and always the best one.

        Scores are exact: recomputed from the stored vectors unless the index is exact.
        """
        ((keys, scores),) = self.index.search(vector.reshape(1, -1), k)
        if not self.index.exact:
            kept, vectors = self.store.vectors(int(key) for key in keys)
            keys, scores = np.asarray(kept, np.int64), vectors @ vector
            order = np.argsort(-scores, kind="stable")
            keys, scores = keys[order], scores[order]
        wanted = [i for i, score in enumerate(scores) if i == 0 or score >= floor]
        by_key = {int(keys[i]): float(scores[i]) for i in wanted}
        faces = self.store.faces(by_key, with_vectors=False)
        return [Scored(face.key, face.registration, by_key[face.key]) for face in faces
                if face.registration.embedding_model == self.model_id]

    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        """Every registration under `id_number`, scored 1:1 against the probe."""
        faces = [face for face in self.store.faces_of_id_number(id_number)
                 if face.registration.embedding_model == self.model_id]
        if not faces:
            return []
        scores = np.vstack([face.vector for face in faces if face.vector is not None]) @ vector
        return [
            Scored(face.key, face.registration, float(score))
            for face, score in zip(faces, scores, strict=True)
        ]

    def get(self, registration_id: str) -> Registration | None:
        return self.store.get(registration_id)

    def stats(self) -> GalleryStats:
        return GalleryStats(
            registrations=self.store.count(),
            distinct_id_numbers=self.store.distinct_id_numbers(),
            index_type=self.index.kind,
            dimension=self.index.dimension,
            index_vectors=len(self.index),
            store_sequence=self.store.sequence(),
            checkpoint_sequence=self.checkpoint_sequence,
            registrations_by_model=self.store.model_counts(),
        )

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint(self) -> int:
        """Writes the index with the sequence it covers; returns that sequence."""
        with self._checkpointing:
            with self._writes:  # the index and the sequence must agree
                sequence = self.store.sequence()
                if sequence == self.checkpoint_sequence and self.checkpoint_path.exists():
                    return sequence
                snapshot = self.index.snapshot(sequence, self.model_id)
            write_checkpoint(self.checkpoint_path, snapshot)
            self._after_checkpoint(sequence)
            return sequence

    def _save_checkpoint(self, index: VectorIndex, sequence: int) -> None:
        write_checkpoint(self.checkpoint_path, index.snapshot(sequence, self.model_id))
        self._after_checkpoint(sequence)

    def _after_checkpoint(self, sequence: int) -> None:
        self.checkpoint_sequence = sequence
        self._last_checkpoint_time = time.monotonic()
        self.store.truncate_changes(sequence)

    def _checkpoint_periodically(self) -> None:
        poll = min(5.0, self.config.checkpoint_interval_s)
        while not self._closed.wait(poll):
            pending = self.store.sequence() - self.checkpoint_sequence
            elapsed = time.monotonic() - self._last_checkpoint_time
            overdue = elapsed >= self.config.checkpoint_interval_s
            if pending >= self.config.checkpoint_every_changes or (pending and overdue):
                try:
                    self.checkpoint()
                except Exception:  # the store is the truth; a failed checkpoint only costs replay
                    log.exception("background index checkpoint failed")

    def close(self, checkpoint: bool = True) -> None:
        self._closed.set()
        self._checkpointer.join()
        if checkpoint:
            self.checkpoint()
        self.store.close()
