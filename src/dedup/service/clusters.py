"""Cluster finding: every group of registrations that share one face across ID numbers.

The gallery is walked in key order, a block of stored embeddings at a time; each block is one
search for every embedding's neighbours at or above the score (the gallery's sweep search),
and each pair found is joined in a union-find. Scores are symmetric, so a group is complete
once its highest key has been searched: every neighbour of each member was then seen.
Complete groups are yielded at once, while the walk goes on.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from dedup.core.records import Registration
from dedup.gallery.base import Gallery

BLOCK = 1024


@dataclass(frozen=True)
class Cluster:
    registrations: list[Registration]
    id_numbers: list[str]
    min_link_score: float


@dataclass(frozen=True)
class Progress:
    searched: int
    total: int
    clusters: int


class _UnionFind:
    """Groups of keys, each with its members, highest key and weakest joining score."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}  # by root
        self.highest: dict[int, int] = {}  # by root
        self.weakest: dict[int, float] = {}  # by root

    def root(self, key: int) -> int:
        if key not in self.parent:
            self.parent[key], self.members[key], self.highest[key] = key, [key], key
            self.weakest[key] = 1.0
            return key
        top = key
        while self.parent[top] != top:
            top = self.parent[top]
        while self.parent[key] != top:  # path compression
            self.parent[key], key = top, self.parent[key]
        return top

    def join(self, a: int, b: int, score: float) -> int:
        root_a, root_b = self.root(a), self.root(b)
        if root_a != root_b:
            if len(self.members[root_a]) < len(self.members[root_b]):
                root_a, root_b = root_b, root_a
            self.parent[root_b] = root_a
            self.members[root_a].extend(self.members.pop(root_b))
            self.highest[root_a] = max(self.highest[root_a], self.highest.pop(root_b))
            self.weakest[root_a] = min(self.weakest[root_a], self.weakest.pop(root_b))
        self.weakest[root_a] = min(self.weakest[root_a], score)
        return root_a

    def remove(self, root: int) -> tuple[list[int], float]:
        members = self.members.pop(root)
        for key in members:
            del self.parent[key]
        del self.highest[root]
        return members, self.weakest.pop(root)


def find_clusters(gallery: Gallery, min_score: float, min_distinct_id_numbers: int
                  ) -> Iterator[Cluster | Progress]:
    """Each block's neighbours come from the gallery's sweep search (see
    Gallery.sweep_search: exact, or candidates confirmed by exact scores)."""
    search = gallery.sweep_search(min_score)
    groups = _UnionFind()
    pending: list[tuple[int, int]] = []  # (highest key, root), checked lazily
    total = gallery.comparable_count()
    searched = emitted = 0
    for keys, matrix in gallery.iter_vectors(BLOCK):
        for key, neighbours in zip(keys, search(matrix), strict=True):
            for other, score in neighbours:
                if other != key:
                    root = groups.join(key, other, score)
                    heapq.heappush(pending, (groups.highest[root], root))
        searched += len(keys)
        for cluster in _complete(gallery, groups, pending, keys[-1], min_distinct_id_numbers):
            emitted += 1
            yield cluster
        yield Progress(searched, total, emitted)
    for cluster in _complete(gallery, groups, pending, None, min_distinct_id_numbers):
        emitted += 1
        yield cluster
    yield Progress(searched, total, emitted)


def _complete(gallery: Gallery, groups: _UnionFind, pending: list[tuple[int, int]],
              searched_through: int | None, min_ids: int) -> Iterator[Cluster]:
    """Pops the groups whose highest key was searched (all of them when `searched_through`
    is None) and yields those spanning enough ID numbers."""
    while pending and (searched_through is None or pending[0][0] <= searched_through):
        highest, root = heapq.heappop(pending)
        if root not in groups.members or groups.highest[root] != highest:
            continue  # stale: the group grew or was merged since
        members, weakest = groups.remove(root)
        cluster = _cluster(gallery, members, weakest, min_ids)
        if cluster is not None:
            yield cluster


def _cluster(gallery: Gallery, keys: list[int], weakest: float, min_ids: int
             ) -> Cluster | None:
    registrations = [face.registration for face in gallery.faces(keys, with_vectors=False)]
    id_numbers = sorted({registration.id_number for registration in registrations})
    if len(id_numbers) < min_ids:
        return None
    registrations.sort(key=lambda registration: registration.registration_id)
    return Cluster(registrations, id_numbers, weakest)
