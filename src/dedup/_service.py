"""Service logic: checks, enrolments and deletions on validated input, with verdicts."""

from __future__ import annotations

from dataclasses import dataclass

from ._config import Limits, Policy
from ._errors import NotFound
from ._gallery import Gallery, GalleryStats
from ._models import CheckResult, DeleteKey, EnrollResult, Registration, Verdict
from ._policy import decide
from ._vectors import Vector

ENROLLING_VERDICTS = frozenset({Verdict.CLEAR, Verdict.SAME_PERSON})


@dataclass(frozen=True)
class ServiceStats:
    gallery: GalleryStats
    data_dir: str
    policy: Policy


class DedupService:
    def __init__(self, gallery: Gallery, policy: Policy, limits: Limits) -> None:
        self.gallery = gallery
        self.policy = policy
        self.limits = limits

    def check(self, vector: Vector, claimed_id_number: str, max_matches: int) -> CheckResult:
        same_id = (
            self.gallery.same_id_number(vector, claimed_id_number) if claimed_id_number else []
        )
        # Widened by the claimed ID's own registrations, which may fill the top of the list,
        # so that at least min_search_k registrations under other ID numbers are looked at.
        k = max(max_matches, self.limits.min_search_k) + len(same_id)
        candidates = self.gallery.neighbours(vector, k, floor=self.policy.review_threshold)
        return decide(self.policy, claimed_id_number, candidates, same_id, max_matches)

    def enroll(self, registration: Registration, vector: Vector, check_first: bool) -> EnrollResult:
        if not check_first:
            return EnrollResult(self.gallery.insert(registration, vector), enrolled=True)
        # The check and the insert it allows form one step: no other enrolment can slip
        # between them, so two captures of one face under two ID numbers cannot both pass.
        with self.gallery.exclusive_writes():
            self._ensure_new(registration)
            result = self.check(vector, registration.id_number, self.limits.default_candidates)
            if result.verdict not in ENROLLING_VERDICTS:
                return EnrollResult(registration, enrolled=False, check=result)
            stored = self.gallery.insert(registration, vector)
        return EnrollResult(stored, enrolled=True, check=result)

    def _ensure_new(self, registration: Registration) -> None:
        # The store enforces uniqueness again inside its transaction; checking first only
        # spares a search and keeps the error the same with or without check_first.
        self.gallery.store.ensure_unique(registration)

    def delete(self, by: DeleteKey, value: str) -> list[Registration]:
        deleted = self.gallery.delete(by, value)
        if not deleted:
            raise NotFound(f"{by.value}: no registration with {by.value} {value!r}")
        return deleted

    def get(self, registration_id: str) -> Registration:
        registration = self.gallery.get(registration_id)
        if registration is None:
            raise NotFound(f"registration_id: no registration {registration_id!r}")
        return registration

    def stats(self) -> ServiceStats:
        return ServiceStats(self.gallery.stats(), str(self.gallery.data_dir), self.policy)
