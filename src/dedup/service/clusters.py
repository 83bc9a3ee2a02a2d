"""Cluster finding: every group of registrations that share one face across ID numbers.

The gallery is walked in key order, a block of stored embeddings at a time; each block is one
search for every embedding's neighbours at or above the score with higher keys (the gallery's
sweep search; an exact one returns the lower keys too), and each pair found is joined in a
union-find. Every pair is seen when its lower key is searched, so a group is complete once its
highest key has been searched: every pair of a member with a registration of any key was then
seen. Complete groups are yielded at once, while the walk goes on.

A job cannot be driven quadratic: the score is at least the review threshold, each
registration is linked to at most its `max_pairs` best neighbours, and a group grows to at
most `max_size` registrations. A group a cap cut off is reported as truncated, naming the cap;
its members are then left out of any later group (they were reported once).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from dedup.core.errors import InvalidArgument, ResourceExhausted
from dedup.core.records import Registration
from dedup.core.settings import Policy
from dedup.gallery.base import Gallery, Neighbours

BLOCK = 1024
SEARCH_ROWS = 256  # rows searched at once: bounds the neighbour lists held before the cap
PAIRS_CAP, SIZE_CAP = "max_pairs_per_registration", "max_cluster_size"
# The registration_ids one audit record lists: well under a Milvus record's 64 KiB.
AUDIT_IDS_CHARS = 32_000


@dataclass(frozen=True)
class Cluster:
    registrations: list[Registration]
    id_numbers: list[str]
    min_link_score: float
    truncated_by: tuple[str, ...] = ()  # the caps that cut it off, if any


@dataclass(frozen=True)
class Progress:
    searched: int
    total: int
    clusters: int


@dataclass(frozen=True)
class Caps:
    max_pairs: int = 256  # per registration: its best neighbours
    max_size: int = 400  # registrations in a cluster
    threads: int = 0  # of the gallery's sweep search, where it has a choice; 0: one a core


def audit_batches(clusters: list[Cluster], max_chars: int = AUDIT_IDS_CHARS
                  ) -> Iterator[list[Cluster]]:
    """The clusters in batches, each audited in one record, whose registration_ids add up to
    at most `max_chars` (a batch holds at least one cluster)."""
    batch: list[Cluster] = []
    size = 0
    for cluster in clusters:
        chars = sum(len(r.registration_id) + 3 for r in cluster.registrations)
        if batch and size + chars > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(cluster)
        size += chars
    if batch:
        yield batch


def cluster_floor(min_score: float | None, policy: Policy) -> float:
    """The job's score: the match threshold by default, never below the review threshold
    (lower scores link nearly every pair: a job quadratic in the gallery)."""
    if min_score is None:
        return policy.match_threshold
    if min_score < policy.review_threshold:
        raise InvalidArgument("min_score", f"must be at least the review threshold "
                              f"{policy.review_threshold}, got {min_score}")
    return min_score


class JobSlots:
    """Running jobs: at most `per_caller` of one caller and `total` in all."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller, self.total = per_caller, total
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, caller: str) -> JobSlot:
        """A slot for the caller's job; ResourceExhausted when none is free."""
        with self._lock:
            if self._running.get(caller, 0) >= self.per_caller:
                raise ResourceExhausted(f"FindClusters: {caller} already runs "
                                        f"{self.per_caller} job(s); wait for it to end")
            if sum(self._running.values()) >= self.total:
                raise ResourceExhausted(f"FindClusters: {self.total} jobs are running, "
                                        "the most at once; try again later")
            self._running[caller] = self._running.get(caller, 0) + 1
        return JobSlot(self, caller)

    def _give_back(self, caller: str) -> None:
        with self._lock:
            left = self._running[caller] - 1
            if left:
                self._running[caller] = left
            else:
                del self._running[caller]


class JobSlot:
    def __init__(self, slots: JobSlots, caller: str) -> None:
        self._slots, self._caller = slots, caller
        self._held = True

    def release(self) -> None:
        """Gives the slot back (once, however often called)."""
        if self._held:
            self._held = False
            self._slots._give_back(self._caller)


class _UnionFind:
    """Groups of keys, each with its members, highest key, weakest joining score and the caps
    that cut it off; no group grows past `max_size`."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.parent: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}  # by root
        self.highest: dict[int, int] = {}  # by root
        self.weakest: dict[int, float] = {}  # by root
        self.cut: dict[int, set[str]] = {}  # by root, only when a cap cut it

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

    def mark(self, key: int, caps: set[str] | frozenset[str]) -> int:
        root = self.root(key)
        if caps:
            self.cut.setdefault(root, set()).update(caps)
        return root

    def join(self, a: int, b: int, score: float) -> tuple[int, int]:
        """Joins the groups of a and b unless that passes max_size (both are then marked);
        returns both roots afterwards."""
        root_a, root_b = self.root(a), self.root(b)
        if root_a == root_b:
            self.weakest[root_a] = min(self.weakest[root_a], score)
            return root_a, root_a
        if len(self.members[root_a]) + len(self.members[root_b]) > self.max_size:
            return self.mark(root_a, {SIZE_CAP}), self.mark(root_b, {SIZE_CAP})
        if len(self.members[root_a]) < len(self.members[root_b]):
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.members[root_a].extend(self.members.pop(root_b))
        self.highest[root_a] = max(self.highest[root_a], self.highest.pop(root_b))
        self.weakest[root_a] = min(self.weakest[root_a], self.weakest.pop(root_b), score)
        self.mark(root_a, self.cut.pop(root_b, set()))
        return root_a, root_a

    def remove(self, root: int) -> tuple[list[int], float, frozenset[str]]:
        members = self.members.pop(root)
        for key in members:
            del self.parent[key]
        del self.highest[root]
        return members, self.weakest.pop(root), frozenset(self.cut.pop(root, set()))


class _Sweep:
    """One job's state: the groups, the groups due for a completeness check, and the keys of
    truncated groups already reported (with their caps)."""

    def __init__(self, gallery: Gallery, caps: Caps, min_ids: int) -> None:
        self.gallery, self.caps, self.min_ids = gallery, caps, min_ids
        self.groups = _UnionFind(caps.max_size)
        self.pending: list[tuple[int, int]] = []  # (highest key, root), checked lazily
        self.reported: dict[int, frozenset[str]] = {}

    def link(self, key: int, neighbours: Neighbours) -> None:
        others = [(other, score) for other, score in neighbours if other != key]
        if len(others) > self.caps.max_pairs:
            ranked = sorted(others, key=lambda pair: (-pair[1], pair[0]))
            others = ranked[:self.caps.max_pairs]
            self._due(self.groups.mark(key, {PAIRS_CAP}))
            self._cut_off(ranked[self.caps.max_pairs:])
        for other, score in others:
            if other in self.reported:  # its truncated group was reported already
                self._due(self.groups.mark(key, self.reported[other]))
                continue
            for root in set(self.groups.join(key, other, score)):
                self._due(root)

    def _cut_off(self, dropped: Neighbours) -> None:
        """The neighbours a cap dropped are marked too: a sweep search that returns each pair
        from one side only never shows them the link again, so their groups may lack it."""
        for other, _ in dropped:
            if other not in self.reported:
                self._due(self.groups.mark(other, {PAIRS_CAP}))

    def _due(self, root: int) -> None:
        heapq.heappush(self.pending, (self.groups.highest[root], root))

    def complete(self, searched_through: int | None) -> Iterator[Cluster]:
        """Pops the groups whose highest key was searched (all of them when
        `searched_through` is None) and yields those spanning enough ID numbers."""
        groups, pending = self.groups, self.pending
        while pending and (searched_through is None or pending[0][0] <= searched_through):
            highest, root = heapq.heappop(pending)
            if root not in groups.members or groups.highest[root] != highest:
                continue  # stale: the group grew or was merged since
            members, weakest, cut = groups.remove(root)
            if cut:
                self.reported.update((key, cut) for key in members)
            cluster = self._cluster(members, weakest, cut)
            if cluster is not None:
                yield cluster

    def _cluster(self, keys: list[int], weakest: float, cut: frozenset[str]
                 ) -> Cluster | None:
        registrations = [face.registration
                         for face in self.gallery.faces(keys, with_vectors=False)]
        id_numbers = sorted({registration.id_number for registration in registrations})
        if len(id_numbers) < self.min_ids:
            return None
        registrations.sort(key=lambda registration: registration.registration_id)
        return Cluster(registrations, id_numbers, weakest, tuple(sorted(cut)))


def find_clusters(gallery: Gallery, min_score: float, min_distinct_id_numbers: int,
                  caps: Caps | None = None) -> Iterator[Cluster | Progress]:
    """Each block's neighbours come from the gallery's sweep search (see
    Gallery.sweep_search: exact, or candidates confirmed by exact scores)."""
    caps = caps or Caps()
    search = gallery.sweep_search(min_score, caps.threads)
    sweep = _Sweep(gallery, caps, min_distinct_id_numbers)
    total = gallery.comparable_count()
    searched = emitted = 0
    for keys, matrix in gallery.iter_vectors(BLOCK):
        for start in range(0, len(keys), SEARCH_ROWS):
            rows = search(keys[start:start + SEARCH_ROWS], matrix[start:start + SEARCH_ROWS])
            for key, neighbours in zip(keys[start:start + SEARCH_ROWS], rows, strict=True):
                sweep.link(key, neighbours)
        searched += len(keys)
        for cluster in sweep.complete(keys[-1]):
            emitted += 1
            yield cluster
        yield Progress(searched, total, emitted)
    for cluster in sweep.complete(None):
        emitted += 1
        yield cluster
    yield Progress(searched, total, emitted)
