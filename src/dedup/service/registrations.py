"""Service logic: checks, enrolments and deletions on validated input, with verdicts."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dedup.core.adjudication import Adjudication
from dedup.core.audit_chain import AuditMaker
from dedup.core.errors import DedupError, FailedPrecondition, NotFound, registration_id_taken
from dedup.core.logs import mask
from dedup.core.policy import Scored, decide
from dedup.core.records import (
    CaptureQuality,
    CheckResult,
    DeleteKey,
    EnrollResult,
    FaceInput,
    Probe,
    Registration,
    Verdict,
)
from dedup.core.settings import Limits, Policy
from dedup.core.vectors import Vector
from dedup.face.embedder import FaceEmbedder
from dedup.face.model_pack import ModelPack
from dedup.face.quality import Quality
from dedup.gallery.base import EnrolmentCheck, Erasure, Gallery, GalleryStats

log = logging.getLogger("dedup.service")

ENROLLING_VERDICTS = frozenset({Verdict.CLEAR, Verdict.SAME_PERSON})
# A check naming a registration (CheckRequest.registration_id) is of that registration's
# face when its stored embedding scores at least this against the probe.
SAME_FACE = 0.99
# Roles whose checks apply the settlements of the registration they name, whatever the probe.
TRUSTED_ROLES = frozenset({"investigator", "admin"})


@dataclass(frozen=True)
class ServiceStats:
    gallery: GalleryStats
    data_dir: str  # a data directory or a Milvus URI
    policy: Policy
    model: ModelPack
    calibration_dir: Path


def capture_quality(quality: Quality) -> CaptureQuality:
    """The face package's assessment as the service's record of it."""
    return CaptureQuality(quality.unified, {item.name: getattr(quality.scores, item.name)
                                            for item in dataclasses.fields(quality.scores)})


def _unified(probe: Probe) -> float | None:
    return None if probe.quality is None else probe.quality.unified


T = TypeVar("T")
# On a gallery whose reads wait (Gallery.reads_wait) a Check searches for this many
# candidates beyond its k while it looks up the claimed ID's registrations, which widen k.
SPARE_CANDIDATES = 16


class DedupService:
    def __init__(self, gallery: Gallery, embedder: FaceEmbedder, policy: Policy,
                 limits: Limits) -> None:
        self.gallery = gallery
        self.embedder = embedder
        self.policy = policy
        self.limits = limits
        # Two lookups beside each of the server's (default 32) workers' Checks.
        self._lookups = ThreadPoolExecutor(max_workers=64, thread_name_prefix="dedup-lookup") \
            if gallery.reads_wait else None

    def probe(self, face: FaceInput, field: str, timeout: float | None = None,
              caller: str | None = None) -> Probe:
        """The face as a unit vector of the server's model, embedding a photo if need be
        (`caller`: whose share of the photo slots it takes)."""
        if face.vector is not None:
            if face.vector_model and face.vector_model != self.embedder.model_id:
                raise FailedPrecondition(
                    f"{field}.embedding.model: {face.vector_model!r} is not the server's model "
                    f"{self.embedder.model_id!r}; embeddings of different models are never "
                    "compared")
            return Probe(face.vector, client_quality=face.client_quality)
        embedded = self.embedder.embed(face.image, face.use_largest_face, f"{field}.image",
                                       timeout, holder=caller)
        return Probe(embedded.vector, embedded.face, capture_quality(embedded.quality))

    def check(self, probe: Probe, claimed_id_number: str, max_matches: int,
              registration_id: str = "", trusted: bool = False) -> CheckResult:
        """`trusted`: an investigator's (or admin's) check, which applies the settlements of
        `registration_id` whatever the probe (see _settled_different)."""
        vector = probe.vector
        settled = self._soon(self._settled_different, registration_id, vector, trusted)
        same_id, candidates = self._same_id_and_candidates(vector, claimed_id_number,
                                                           max_matches)
        result = decide(self.policy, claimed_id_number, candidates, same_id, max_matches,
                        settled(), _unified(probe))
        return dataclasses.replace(result, detected=probe.detected, quality=probe.quality)

    def _soon(self, call: Callable[..., T], *args: object) -> Callable[[], T]:
        """`call(*args)`'s result, asked for later: on a gallery whose reads wait it runs at
        once on another thread, else when first asked for (then kept)."""
        if self._lookups is None:
            return functools.cache(lambda: call(*args))
        future: Future[T] = self._lookups.submit(contextvars.copy_context().run, call, *args)
        return future.result

    def _same_id_and_candidates(self, vector: Vector, claimed_id_number: str,
                                max_matches: int) -> tuple[list[Scored], list[Scored]]:
        """The claimed ID's registrations, and the candidates: widened by those, which may
        fill the top of the list, so that at least min_search_k registrations under other
        ID numbers are looked at. On a gallery whose reads wait, both at once."""
        k = max(max_matches, self.limits.min_search_k)
        floor = self.policy.review_threshold
        if self._lookups is None:
            same_id = self.gallery.same_id_number(vector, claimed_id_number)
            return same_id, self.gallery.neighbours(vector, k + len(same_id), floor)
        same_id_soon = self._soon(self.gallery.same_id_number, vector, claimed_id_number)
        candidates = self.gallery.neighbours(vector, k + SPARE_CANDIDATES, floor)
        same_id = same_id_soon()
        if len(same_id) > SPARE_CANDIDATES:
            candidates = self.gallery.neighbours(vector, k + len(same_id), floor)
        return same_id, candidates[:k + len(same_id)]

    def _settled_different(self, registration_id: str, vector: Vector, trusted: bool
                           ) -> frozenset[int]:
        """The keys of registrations an investigator settled as a different person from the
        one `registration_id` names. Only when it names an enrolled registration whose stored
        face is the probe's (or for a trusted caller, who may also name an application that
        was refused and settled but never enrolled): anyone else naming it would switch the
        duplicate check off for any face."""
        settled = {}
        for party in self._settling_parties(registration_id, vector, trusted):
            settled.update(self.gallery.settled(party))
        return frozenset(other for other, record in settled.items()
                         if Adjudication.decode(record).different_people)

    def _settling_parties(self, registration_id: str, vector: Vector, trusted: bool
                          ) -> list[int | str]:
        if not registration_id:
            return []
        stored = self.gallery.stored_face(registration_id)
        if stored is None:
            return [registration_id] if trusted else []
        key, _, stored_vector = stored
        if trusted or float(stored_vector @ vector) >= SAME_FACE:
            # Its settlements, and those made while it was an application not yet enrolled.
            return [key, registration_id]
        return []

    def ensure_not_enrolled(self, registration_id: str) -> None:
        """AlreadyExists if `registration_id` is enrolled (checked again on insert, with the
        msisdn)."""
        if self.gallery.get(registration_id) is not None:
            raise registration_id_taken(registration_id)

    def enroll(self, registration: Registration, probe: Probe, check_first: bool,
               trusted: bool = False) -> EnrollResult:
        """With `check_first`, the check applies settlements as `check` does: the
        registration_id being enrolled names no enrolled registration, so only a trusted
        caller's enrolment applies those made for it as a refused application. The
        registration is stored with the probe's quality: the server's measure of a photo,
        or the client's word for an embedding."""
        registration = _with_quality(registration, probe)
        vector, detected = probe.vector, probe.detected
        if not check_first:
            stored = self.gallery.insert(registration, vector)
            return EnrollResult(stored, enrolled=True, detected=detected,
                                quality=probe.quality)
        # Looked up once: a backend may judge again after waiting for concurrent enrolments.
        settled = self._soon(self._settled_different, registration.registration_id, vector,
                             trusted)
        # The backend enforces uniqueness again as it stores; checking first only spares a
        # search and keeps the error the same with or without check_first.
        self.gallery.ensure_unique(registration)
        settled()  # before the claim is staked: never a claim waiting on a lookup
        claimed, limit = registration.id_number, self.limits.default_candidates

        def judge(candidates: list[Scored], same_id: list[Scored]) -> CheckResult:
            return decide(self.policy, claimed, candidates, same_id, limit, settled(),
                          _unified(probe))

        check = EnrolmentCheck(claimed, max(limit, self.limits.min_search_k),
                               self.policy.review_threshold, judge,
                               lambda result: result.verdict in ENROLLING_VERDICTS)
        result, enrolled = self.gallery.insert_checked(registration, vector, check)
        return EnrollResult(enrolled or registration, enrolled=enrolled is not None,
                            check=dataclasses.replace(result, detected=detected,
                                                      quality=probe.quality),
                            detected=detected, quality=probe.quality)

    def enroll_each(self, batch: list[tuple[Registration, Probe]]
                    ) -> list[EnrollResult | DedupError]:
        """`enroll` without check_first for each of a batch, stored together (one durable
        write for the batch): one outcome per item, in order."""
        stamped = [(_with_quality(registration, probe), probe) for registration, probe in batch]
        stored = self.gallery.insert_each([(registration, probe.vector)
                                           for registration, probe in stamped])
        return [outcome if isinstance(outcome, DedupError) else
                EnrollResult(outcome, enrolled=True, detected=probe.detected,
                             quality=probe.quality)
                for outcome, (_, probe) in zip(stored, stamped, strict=True)]

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

    def get(self, registration_id: str, enrolled_by: str | None = None) -> Registration:
        """With `enrolled_by`, only a registration that principal enrolled: any other is
        NOT_FOUND, just as a missing one, so the answer reveals nothing of it."""
        registration = self.gallery.get(registration_id)
        if registration is None or enrolled_by not in (None, registration.enrolled_by):
            raise NotFound(f"registration_id: no registration {registration_id!r}")
        return registration

    def stats(self) -> ServiceStats:
        return ServiceStats(self.gallery.stats(), self.gallery.location, self.policy,
                            self.embedder.pack, self.gallery.data_dir)


def _with_quality(registration: Registration, probe: Probe) -> Registration:
    """Stored with the probe's quality: the server's measure of a photo, or the client's
    word for an embedding."""
    return dataclasses.replace(registration, quality=_unified(probe),
                               client_quality=probe.client_quality)
