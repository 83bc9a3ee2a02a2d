"""Searches of the live index with exact scores.

An approximate index's candidates are re-scored from the stored float32 vectors, so
verdicts never rest on approximate scores: a search asks the index for
max(k, rerank_candidates) candidates (k is at least Limits.min_search_k, 64, for a check)
and re-ranks all of them. Only the server's model's registrations are ever returned.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dedup.core.policy import Scored
from dedup.core.records import StoredFace
from dedup.core.settings import IndexConfig
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.embedded.batcher import SearchBatcher
from dedup.gallery.embedded.index import Ids, Scores, SearchOptions
from dedup.gallery.embedded.live_index import LiveIndex


class ExactSearch:
    def __init__(self, live: LiveIndex, dimension: int, index_config: IndexConfig,
                 options: SearchOptions) -> None:
        self.live = live
        # The configured re-rank depth travels with the other search parameters.
        self.options = dataclasses.replace(
            options, rerank_candidates=index_config.rerank_candidates)
        self._batcher = SearchBatcher(
            self._search_batch,
            dimension=dimension,
            max_batch=index_config.max_batch,
            max_wait_s=index_config.max_batch_wait_s,
            dispatchers=index_config.search_dispatchers,
            threads=index_config.search_threads,
        )

    def neighbours(self, vector: Vector, k: int, floor: float) -> list[Scored]:
        """The probe's nearest registrations scoring >= floor, and always the best one."""
        # Before the search: a checkpoint adding them to the index meanwhile empties it.
        missing = self.live.unadded()
        found = self._batcher.search(vector, max(k, self.options.rerank_candidates))
        keys, scores = found.ids, found.scores
        if not found.exact:
            keys, scores = self._rerank(keys, vector)
        wanted = [i for i, score in enumerate(scores) if i == 0 or score >= floor]
        by_key = {int(keys[i]): float(scores[i]) for i in wanted}
        return self._with_unadded(self._scored(by_key), missing, vector, floor)

    def _scored(self, by_key: dict[int, float]) -> list[Scored]:
        """The stored registrations of the server's model among `by_key`, with its scores."""
        return [Scored(face.key, face.registration, by_key[face.key])
                for face in self.live.store.faces(by_key, with_vectors=False)
                if face.registration.embedding_model == self.live.model_id]

    def _with_unadded(self, found: list[Scored], missing: Ids, vector: Vector, floor: float
                      ) -> list[Scored]:
        """`found`, with `missing` (stored registrations the index failed to take:
        LiveIndex.add; none but after a failure for want of memory) scored exactly, best
        first."""
        if not len(missing):
            return found
        kept, vectors = self.live.store.vectors(missing)
        scores = vectors @ vector if kept else np.empty(0, np.float32)
        have = {scored.key for scored in found}
        by_key = {key: float(score) for key, score in zip(kept, scores, strict=True)
                  if key not in have and (score >= floor or not found)}
        merged = sorted(found + self._scored(by_key), key=lambda scored: -scored.score)
        return [scored for i, scored in enumerate(merged) if i == 0 or scored.score >= floor]

    def neighbours_of_many(self, queries: Matrix, k: int, floor: float,
                           options: SearchOptions | None = None
                           ) -> list[list[tuple[int, float]]]:
        """Per query: (key, exact score) of its k nearest scoring >= floor, best first.

        One FAISS search for the whole block (batch jobs: cluster finding), not the
        micro-batcher the per-call searches share; `options` (default: the server's) apply
        to this call only.
        """
        options = options or self.options
        # Both before the search: a checkpoint or a swap meanwhile empties them.
        gone = self.live.unremoved()  # erased, their removal from the index failed: rare
        missing = self.live.unadded()  # stored, their addition failed: rare
        exact, found = self._search_batch(queries, max(k, options.rerank_candidates), options)
        rows = []
        for query, (keys, scores) in zip(queries, found, strict=True):
            if not exact:
                keys, scores = self._rerank(keys[keys >= 0], query)
            elif len(gone):  # not re-ranked from the store, which no longer has them
                kept = ~np.isin(keys, gone)
                keys, scores = keys[kept], scores[kept]
            rows.append([(int(key), float(score)) for key, score in zip(keys[:k], scores[:k],
                                                                          strict=True)
                         if key >= 0 and score >= floor])
        return self._rows_with_unadded(rows, missing, queries, k, floor)

    def _rows_with_unadded(self, rows: list[list[tuple[int, float]]], missing: Ids,
                           queries: Matrix, k: int, floor: float
                           ) -> list[list[tuple[int, float]]]:
        """Each row with `missing` (stored registrations the index failed to take) scored
        exactly. (They are the server's model's: every insert path stamps it.)"""
        if not len(missing):
            return rows
        kept, vectors = self.live.store.vectors(missing)
        if not kept:
            return rows
        scores = np.asarray(queries, np.float32) @ vectors.T
        merged = []
        for row, row_scores in zip(rows, scores, strict=True):
            have = {key for key, _ in row}
            extra = [(key, float(score)) for key, score in zip(kept, row_scores, strict=True)
                     if score >= floor and key not in have]
            merged.append(sorted(row + extra, key=lambda pair: -pair[1])[:k])
        return merged

    def same_id_number(self, vector: Vector, id_number: str) -> list[Scored]:
        """Every registration under `id_number`, scored 1:1 against the probe."""
        if not id_number:
            return []
        return self.score(vector, self.live.store.faces_of_id_number(id_number))

    def score(self, vector: Vector, faces: list[StoredFace]) -> list[Scored]:
        """The faces of the server's model, scored exactly against the probe."""
        ours = [face for face in faces if face.registration.embedding_model == self.live.model_id]
        if not ours:
            return []
        scores = np.vstack([face.vector for face in ours if face.vector is not None]) @ vector
        return [Scored(face.key, face.registration, float(score))
                for face, score in zip(ours, scores, strict=True)]

    def close(self) -> None:
        self._batcher.close()

    def batch_counts(self) -> tuple[int, int]:
        """(batch searches, queries in them) so far."""
        return self._batcher.counts()

    def _search_batch(self, queries: Matrix, k: int, options: SearchOptions | None = None
                      ) -> tuple[bool, list[tuple[Ids, Scores]]]:
        index = self.live.index  # one index for the whole batch, even if a rebuild swaps it now
        return index.exact, index.search(queries, k, options or self.options)

    def _rerank(self, keys: np.ndarray, vector: Vector) -> tuple[np.ndarray, np.ndarray]:
        kept, vectors = self.live.store.vectors(keys)
        exact: np.ndarray = vectors @ vector
        order = np.argsort(-exact, kind="stable")
        return np.asarray(kept, np.int64)[order], exact[order]
