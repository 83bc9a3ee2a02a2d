"""Service logic: checks, enrolments and deletions on validated input, with verdicts."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from ._config import Limits, Policy
from ._embedder import FaceEmbedder
from ._errors import FailedPrecondition, NotFound
from ._gallery import Erasure, Gallery, GalleryStats
from ._logging import mask
from ._model_pack import ModelPack
from ._models import (
    CheckResult,
    DeleteKey,
    EnrollResult,
    FaceInput,
    Probe,
    Registration,
    Verdict,
)
from ._policy import Scored, decide
from ._store import AuditMaker
from ._vectors import Vector

log = logging.getLogger("dedup.service")

ENROLLING_VERDICTS = frozenset({Verdict.CLEAR, Verdict.SAME_PERSON})


@dataclass(frozen=True)
class ServiceStats:
    gallery: GalleryStats
    data_dir: str
    policy: Policy
    model: ModelPack


class DedupService:
    def __init__(self, gallery: Gallery, embedder: FaceEmbedder, policy: Policy,
                 limits: Limits) -> None:
        self.gallery = gallery
        self.embedder = embedder
        self.policy = policy
        self.limits = limits

    def probe(self, face: FaceInput, field: str, timeout: float | None = None) -> Probe:
        """The face as a unit vector of the server's model, embedding a photo if need be."""
        if face.vector is not None:
            if face.vector_model and face.vector_model != self.embedder.model_id:
                raise FailedPrecondition(
                    f"{field}.embedding.model: {face.vector_model!r} is not the server's model "
                    f"{self.embedder.model_id!r}; embeddings of different models are never "
                    "compared")
            return Probe(face.vector)
        embedded = self.embedder.embed(face.image, face.use_largest_face, f"{field}.image",
                                       timeout)
        return Probe(embedded.vector, embedded.face)

    def check(self, probe: Probe, claimed_id_number: str, max_matches: int,
              registration_id: str = "") -> CheckResult:
        same_id = self._same_id(probe.vector, claimed_id_number)
        candidates = self._candidates(probe.vector, max_matches, same_id)
        result = decide(self.policy, claimed_id_number, candidates, same_id, max_matches,
                        self._settled_different(registration_id))
        return dataclasses.replace(result, detected=probe.detected)

    def _settled_different(self, registration_id: str) -> frozenset[str]:
        """Registrations an investigator settled as a different person from this one."""
        settled = self.gallery.store.settled(registration_id)
        return frozenset(other for other, record in settled.items()
                         if json.loads(record)["decision"] == "DIFFERENT_PEOPLE")

    def _same_id(self, vector: Vector, claimed_id_number: str) -> list[Scored]:
        if not claimed_id_number:
            return []
        return self.gallery.same_id_number(vector, claimed_id_number)

    def _candidates(self, vector: Vector, max_matches: int, same_id: list[Scored]
                    ) -> list[Scored]:
        # Widened by the claimed ID's own registrations, which may fill the top of the list,
        # so that at least min_search_k registrations under other ID numbers are looked at.
        k = max(max_matches, self.limits.min_search_k) + len(same_id)
        return self.gallery.neighbours(vector, k, floor=self.policy.review_threshold)

    def enroll(self, registration: Registration, probe: Probe, check_first: bool) -> EnrollResult:
        vector, detected = probe.vector, probe.detected
        if not check_first:
            stored = self.gallery.insert(registration, vector)
            return EnrollResult(stored, enrolled=True, detected=detected)
        self._ensure_new(registration)
        claimed, limit = registration.id_number, self.limits.default_candidates
        # The search runs beside other calls; only what changed since it began is looked at
        # under the write lock. So the check and the insert it allows still form one step:
        # two captures of one face under two ID numbers cannot both pass.
        seen = self.gallery.sequence_in_step()
        candidates = self._candidates(vector, limit, self._same_id(vector, claimed))
        with self.gallery.exclusive_writes():
            candidates = self._caught_up(vector, claimed, limit, seen, candidates)
            same_id = self._same_id(vector, claimed)
            settled = self._settled_different(registration.registration_id)
            result = dataclasses.replace(
                decide(self.policy, claimed, candidates, same_id, limit, settled),
                detected=detected)
            if result.verdict not in ENROLLING_VERDICTS:
                return EnrollResult(registration, enrolled=False, check=result, detected=detected)
            stored = self.gallery.insert(registration, vector)
        return EnrollResult(stored, enrolled=True, check=result, detected=detected)

    def _caught_up(self, vector: Vector, claimed: str, limit: int, seen: int,
                   candidates: list[Scored]) -> list[Scored]:
        """The candidates as of now: without registrations deleted since `seen`, with those
        added since scored exactly. Runs under the write lock."""
        delta = self.gallery.changes_since(seen)
        if delta is None:  # a checkpoint truncated the log meanwhile: search again, locked
            return self._candidates(vector, limit, self._same_id(vector, claimed))
        added, removed = delta
        fresh = [scored for scored in self.gallery.scored(vector, added)
                 if scored.score >= self.policy.review_threshold]
        return [scored for scored in candidates if scored.key not in removed] + fresh

    def _ensure_new(self, registration: Registration) -> None:
        # The store enforces uniqueness again inside its transaction; checking first only
        # spares a search and keeps the error the same with or without check_first.
        self.gallery.store.ensure_unique(registration)

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None) -> Erasure:
        """Erases by one key; the audit record (if any) commits with the erasure."""
        erasure = self.gallery.delete(by, value, audit)
        if not erasure.registrations:
            raise NotFound(f"{by.value}: no registration with {by.value} {value!r}")
        # Registration ids are the carrier's own keys; ID numbers and phone numbers are personal.
        shown = value if by is DeleteKey.REGISTRATION_ID else mask(value)
        log.info("erased %d registration(s) by %s %s: %s", len(erasure.registrations),
                 by.value, shown,
                 ", ".join(registration.registration_id for registration in erasure.registrations))
        return erasure

    def get(self, registration_id: str) -> Registration:
        registration = self.gallery.get(registration_id)
        if registration is None:
            raise NotFound(f"registration_id: no registration {registration_id!r}")
        return registration

    def stats(self) -> ServiceStats:
        return ServiceStats(self.gallery.stats(), str(self.gallery.data_dir), self.policy,
                            self.embedder.pack)
