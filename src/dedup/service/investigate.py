"""Investigator queries: similarity search with filters, and the links around an ID number."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dedup.core.errors import NotFound
from dedup.core.policy import Scored
from dedup.core.records import Registration
from dedup.core.vectors import Vector
from dedup.gallery.base import Gallery

# The most neighbours a search or a link expansion looks at per face.
MAX_NEIGHBOURS = 10_000
_FIRST_LOOK = 64


@dataclass(frozen=True)
class SearchFilter:
    carrier: str = ""
    region: str = ""
    enrolled_from_us: int | None = None
    enrolled_until_us: int | None = None

    def admits(self, registration: Registration) -> bool:
        at = registration.enrolled_at_us
        return ((not self.carrier or registration.carrier == self.carrier)
                and (not self.region or registration.region == self.region)
                and (self.enrolled_from_us is None or at >= self.enrolled_from_us)
                and (self.enrolled_until_us is None or at < self.enrolled_until_us))


def widening_search(gallery: Gallery, vector: Vector, floor: float, wanted: int | None,
                    keep: Callable[[Scored], bool]) -> list[Scored]:
    """The best `wanted` (None: all) registrations scoring >= floor that `keep` admits,
    best first.

    Looks at max(64, wanted) neighbours, then four times as many while the nearest ones were
    all above the floor but too few were admitted, up to MAX_NEIGHBOURS.
    """
    look = _FIRST_LOOK if wanted is None else min(max(_FIRST_LOOK, wanted), MAX_NEIGHBOURS)
    wanted = MAX_NEIGHBOURS if wanted is None else wanted
    while True:
        found = gallery.neighbours(vector, look, floor=floor)
        kept = [scored for scored in found if scored.score >= floor and keep(scored)]
        reached_floor = len(found) < look  # fewer than asked: the rest score below the floor
        if len(kept) >= wanted or reached_floor or look >= MAX_NEIGHBOURS:
            kept.sort(key=lambda scored: (-scored.score, scored.key))
            return kept[:wanted]
        look = min(look * 4, MAX_NEIGHBOURS)


@dataclass(frozen=True)
class Link:
    id_number: str
    best_score: float
    registration_id: str  # theirs
    matched_registration_id: str  # ours
    registrations: list[Registration]


@dataclass(frozen=True)
class Links:
    registrations: list[Registration]
    linked: list[Link]


def links(gallery: Gallery, id_number: str, threshold: float) -> Links:
    """Every registration under `id_number`, and every other ID number with a registration
    scoring >= threshold against any of them, with the best pair."""
    own = [face for face in gallery.faces_of_id_number(id_number)
           if face.registration.embedding_model == gallery.model_id and face.vector is not None]
    if not own:
        raise NotFound(f"id_number: no registration under id_number {id_number!r}")
    best: dict[str, tuple[float, str, str]] = {}
    theirs: dict[str, dict[str, Registration]] = {}
    for face in own:
        assert face.vector is not None
        others = widening_search(gallery, face.vector, threshold, None,
                                 lambda s: s.registration.id_number != id_number)
        for scored in others:
            other = scored.registration
            theirs.setdefault(other.id_number, {})[other.registration_id] = other
            pair = (scored.score, other.registration_id, face.registration.registration_id)
            if pair[0] > best.get(other.id_number, (-2.0, "", ""))[0]:
                best[other.id_number] = pair
    linked = [Link(number, score, registration_id, matched,
                   sorted(theirs[number].values(), key=lambda r: r.registration_id))
              for number, (score, registration_id, matched) in best.items()]
    linked.sort(key=lambda link: (-link.best_score, link.id_number))
    return Links([face.registration for face in own], linked)
