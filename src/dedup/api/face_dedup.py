"""The gRPC FaceDedup service: enrolment, checks, erasure, lookups and statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import grpc

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api import convert as convert
from dedup.api import reads as reads
from dedup.api.auth import current_caller
from dedup.api.bridge import RequestFeed
from dedup.api.metrics import Metrics
from dedup.api.rate_limit import CallerRate
from dedup.api.status import details, rpc, seconds_left, status_of
from dedup.core import validation
from dedup.core.audit_chain import Caller
from dedup.core.errors import (
    DedupError,
    InvalidArgument,
    NotFound,
    NotServedHere,
    PermissionDenied,
    RefusedUnstarted,
    ResourceExhausted,
)
from dedup.core.records import EnrollResult, Probe, Registration
from dedup.core.settings import Policy, ServerConfig
from dedup.service import calibration as calibration
from dedup.service.audit import AuditTrail, embedding_digest
from dedup.service.registrations import TRUSTED_ROLES, DedupService, ServiceStats

log = logging.getLogger("dedup.server")

# The most requests of an EnrollStream stored together (those already waiting, never more).
ENROLL_BATCH = 64


class CheckElsewhere(Protocol):
    """Where a read replica sends the stream items its store cannot answer: the primary."""

    def serving(self) -> bool:
        """Whether this process's store answers checks now."""

    def __call__(self, request: pb.CheckRequest) -> pb.CheckResponse:
        """The request answered elsewhere, or its error in the response."""


class FaceDedupServicer(pb_grpc.FaceDedupServicer):
    def __init__(self, service: DedupService, config: ServerConfig, metrics: Metrics,
                 audit: AuditTrail, check_rate: CallerRate | None = None) -> None:
        self.service = service
        self.metrics = metrics
        self.audit = audit
        self.limits = config.limits
        self.dimension = config.store.dimension
        queries = config.queries
        self.check_rate = check_rate or CallerRate(queries.check_rate_per_caller,
                                                   queries.check_burst_per_caller)
        self.queries = queries

    def _probe(self, request: pb.CheckRequest | pb.EnrollRequest,
               context: grpc.ServicerContext) -> Probe:
        face = convert.face_input(request.face, request.HasField("face"), "face", self.dimension)
        return self.service.probe(face, "face", timeout=seconds_left(context),
                                  caller=current_caller().identity)

    @rpc
    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        return self._check(request, context, "FaceDedup.Check")

    def CheckStream(self, requests: Iterator[pb.CheckRequest],
                    context: grpc.ServicerContext) -> Iterator[pb.CheckResponse]:
        return self.checks(requests, context)

    def checks(self, requests: Iterator[pb.CheckRequest], context: grpc.ServicerContext,
               elsewhere: CheckElsewhere | None = None) -> Iterator[pb.CheckResponse]:
        """CheckStream's answers: one a request, in order, each checked as Check would, its
        error answered in its place (api/calls.py reads the next request meanwhile). On a
        read replica, `elsewhere` answers a request its store cannot: one that comes while
        the store is not served here goes there before anything is charged or embedded; one
        caught by a release mid-check (NotServedHere) goes there too, as a Check would."""
        for request in requests:
            try:
                if elsewhere is not None and not elsewhere.serving():
                    response = elsewhere(request)
                else:
                    response = self._check(request, context, "FaceDedup.CheckStream")
            except NotServedHere as error:
                response = (elsewhere(request) if elsewhere is not None
                            else pb.CheckResponse(error=_item_error(error, "CheckStream")))
            except Exception as error:
                response = pb.CheckResponse(error=_item_error(error, "CheckStream"))
            self._count_item("CheckStream", response)
            yield response

    def _count_item(self, method: str, response: pb.CheckResponse | pb.EnrollResponse) -> None:
        status = response.error.code if response.HasField("error") else "OK"
        self.metrics.stream_items.labels(method, status).inc()

    def _check(self, request: pb.CheckRequest, context: grpc.ServicerContext,
               method: str) -> pb.CheckResponse:
        caller = current_caller()
        desk = caller.role == "registration"
        if desk:
            self._admit_desk_check(caller, request, method.removeprefix("FaceDedup."))
        with self._refunded_unless_checked_here(caller if desk else None), \
                reads.face_dedup_read(self.audit, caller, method, context) as read:
            claimed = validation.text(request.claimed_id_number, "claimed_id_number",
                                      self.limits.max_id_number_chars, required=False,
                                      key=True)
            limit = convert.max_candidates(request.max_candidates, self.limits)
            registration_id = validation.text(request.registration_id, "registration_id",
                                              self.limits.max_registration_id_chars,
                                              required=False, key=True)
            read.query = {"claimed_id_number": claimed}
            probe = self._probe(request, context)
            if read.trail is not None:  # the digest only for a read that is audited
                read.query["embedding_sha256"] = embedding_digest(probe.vector.tobytes())
            result = self.service.check(probe, claimed, limit, registration_id,
                                        trusted=caller.role in TRUSTED_ROLES)
            read.answered([m.registration.registration_id for m in result.matches])
        self.metrics.verdicts.labels(result.verdict.name).inc()
        return convert.check_to_proto(result, claimed if desk else None)

    def _refuse_what_desks_may_not(self, request: pb.CheckRequest | pb.EnrollRequest
                                   ) -> None:
        """A registration desk sends the photo, which the server measures and embeds, and
        enrols with check_first, unless the server allows otherwise (QueryLimits)."""
        if current_caller().role != "registration":
            return
        if request.face.WhichOneof("input") == "embedding" and not self.queries.desk_embeddings:
            self.metrics.refusals.labels("desk_embedding").inc()
            raise PermissionDenied(
                "face.embedding: a registration desk sends the photo, whose quality the server "
                "measures before it embeds it (a server started with --allow-desk-embeddings "
                "takes desks' embeddings)")
        if isinstance(request, pb.EnrollRequest) and not request.check_first and \
                not self.queries.desk_unchecked_enrolments:
            self.metrics.refusals.labels("desk_unchecked").inc()
            raise PermissionDenied(
                "check_first: a registration desk enrols with check_first, searched first (a "
                "server started with --allow-unchecked-desk-enrolments takes them without)")

    def _admit_desk_check(self, caller: Caller, request: pb.CheckRequest, method: str) -> None:
        """A registration desk checks an applicant's claim, so names the claimed ID number."""
        self._refuse_what_desks_may_not(request)
        self._charge_desk_check(caller, method)
        if not request.claimed_id_number:
            self.metrics.refusals.labels("no_claimed_id_number").inc()
            raise InvalidArgument("claimed_id_number", "is required for the registration role")

    @contextlib.contextmanager
    def _refunded_unless_checked_here(self, charged: Caller | None) -> Iterator[None]:
        """A desk's check charged to its rate is given back when it is not done here: refused
        before any of its work was done (no photo slot), or going to the primary, which
        charges it (NotServedHere, on a read replica)."""
        try:
            yield
        except (RefusedUnstarted, NotServedHere):
            if charged is not None:
                self.check_rate.refund(charged.identity)
            raise

    def _charge_desk_check(self, caller: Caller, method: str) -> None:
        """Each desk credential's checks are rate limited, a Check's and an enrolment's with
        check_first alike (refusals are counted: probing faces fast is itself a signal)."""
        if not self.check_rate.admit(caller.identity):
            self.metrics.refusals.labels("rate").inc()
            raise ResourceExhausted(
                f"{method}: {caller.identity} is over {self.check_rate.rate:g} checks a second "
                f"(bursts of {self.check_rate.burst:g}); slow down")

    @rpc
    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        return self._enroll(request, context)

    def EnrollStream(self, requests: Iterator[pb.EnrollRequest],
                     context: grpc.ServicerContext) -> Iterator[pb.EnrollResponse]:
        # One response per request, in order, each once its registration is stored. The
        # requests already read are stored together (api/bridge.py: RequestFeed).
        batches = (requests.batches(ENROLL_BATCH) if isinstance(requests, RequestFeed)
                   else ([request] for request in requests))
        for batch in batches:
            for response in self._enroll_batch(batch, context):
                self._count_item("EnrollStream", response)
                yield response

    def _enroll_batch(self, batch: list[pb.EnrollRequest], context: grpc.ServicerContext
                      ) -> list[pb.EnrollResponse]:
        """As if enrolled one after another: runs of enrolments without check_first are
        stored together, and a check_first enrolment judges after those before it."""
        responses: list[pb.EnrollResponse] = []
        run: list[tuple[pb.EnrollRequest, Registration, Probe]] = []
        for request in batch:
            if request.check_first:
                responses += self._enroll_run(run)
                run = []
                responses.append(self._enroll_one(request, context))
                continue
            try:
                self._refuse_what_desks_may_not(request)
                run.append((request, self._new_registration(request),
                            self._probe(request, context)))
            except Exception as error:
                responses += self._enroll_run(run)
                run = []
                responses.append(_stream_failure(request, error))
        return responses + self._enroll_run(run)

    def _enroll_run(self, run: list[tuple[pb.EnrollRequest, Registration, Probe]]
                    ) -> list[pb.EnrollResponse]:
        if not run:
            return []
        try:
            outcomes = self.service.enroll_each([(registration, probe)
                                                 for _, registration, probe in run])
        except Exception as error:
            return [_stream_failure(request, error) for request, _, _ in run]
        return [_stream_failure(request, outcome) if isinstance(outcome, DedupError)
                else self._enroll_response(outcome, registration)
                for (request, registration, _), outcome in zip(run, outcomes, strict=True)]

    def _enroll_one(self, request: pb.EnrollRequest, context: grpc.ServicerContext
                    ) -> pb.EnrollResponse:
        try:
            return self._enroll(request, context)
        except Exception as error:
            return _stream_failure(request, error)

    def _registration(self, request: pb.EnrollRequest) -> Registration:
        return dataclasses.replace(convert.registration_from_proto(
            request.registration, request.HasField("registration"), self.limits
        ), enrolled_by=current_caller().identity)

    def _new_registration(self, request: pb.EnrollRequest) -> Registration:
        """The request's registration; with a photo, one whose registration_id is enrolled
        is refused before the photo is decoded and embedded (tens of milliseconds of a core,
        which a caller repeating an enrolment would otherwise spend for nothing). Not the
        msisdn: that would tell a desk, for a junk photo, whether a phone number is taken.
        The store checks both as it stores."""
        registration = self._registration(request)
        if request.face.image:
            self.service.ensure_not_enrolled(registration.registration_id)
        return registration

    def _enroll(self, request: pb.EnrollRequest,
                context: grpc.ServicerContext) -> pb.EnrollResponse:
        caller = current_caller()
        self._refuse_what_desks_may_not(request)
        charged = request.check_first and caller.role == "registration"
        if charged:
            self._charge_desk_check(caller, "check_first")
        with self._refunded_unless_checked_here(caller if charged else None):
            registration = self._new_registration(request)
            probe = self._probe(request, context)
        result = self.service.enroll(registration, probe, request.check_first,
                                     trusted=caller.role in TRUSTED_ROLES)
        return self._enroll_response(result, registration)

    def _enroll_response(self, result: EnrollResult, registration: Registration
                         ) -> pb.EnrollResponse:
        caller = current_caller()
        response = pb.EnrollResponse(
            registration=convert.registration_to_proto(result.registration),
            enrolled=result.enrolled,
        )
        if result.check is not None:
            self.metrics.verdicts.labels(result.check.verdict.name).inc()
            # The evidence as a desk sees it, whoever enrols: whole records are audited reads.
            shown = None if caller.via == "none" else registration.id_number
            response.check.CopyFrom(convert.check_to_proto(result.check, shown))
        if result.detected is not None:
            response.detected_face.CopyFrom(convert.detected_to_proto(result.detected))
        if result.quality is not None:
            response.quality.CopyFrom(convert.quality_to_proto(result.quality))
        return response

    @rpc
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        by, value = convert.delete_key(request, self.limits)
        # The erasure's reason (a subject's request, a case), recorded with it when given.
        case_id, purpose = reads.optional_metadata_case(context)
        caller = current_caller()
        maker = self.audit.maker(caller, "FaceDedup.Delete", case_id, purpose, {by.value: value})
        try:
            erasure = self.service.delete(by, value, maker)
        except NotFound:
            self.audit.append(caller, "FaceDedup.Delete", case_id, purpose,
                              {by.value: value, "outcome": "NOT_FOUND"}, [])
            raise
        response = pb.DeleteResponse(
            deleted=len(erasure.registrations),
            registration_ids=[registration.registration_id
                              for registration in erasure.registrations],
            audit_record_hash=(erasure.audit_hash or b"").hex(),
        )
        response.erased_at.GetCurrentTime()
        if erasure.compaction_due is not None:
            response.compaction_due.FromNanoseconds(int(erasure.compaction_due * 1e9))
        if erasure.checkpoint_due is not None:
            response.checkpoint_due.FromNanoseconds(int(erasure.checkpoint_due * 1e9))
        return response

    @rpc
    def GetRegistration(
        self, request: pb.GetRegistrationRequest, context: grpc.ServicerContext
    ) -> pb.Registration:
        caller = current_caller()
        method = "FaceDedup.GetRegistration"
        with reads.face_dedup_read(self.audit, caller, method, context) as read:
            registration_id = validation.text(request.registration_id, "registration_id",
                                              self.limits.max_registration_id_chars,
                                              required=True, key=True)
            read.query = {"registration_id": registration_id}
            # A desk finds only what its own credential enrolled.
            owner = caller.identity if caller.role == "registration" else None
            registration = self.service.get(registration_id, enrolled_by=owner)
            read.answered([registration_id])
        return convert.registration_to_proto(registration)

    @rpc
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return _stats_response(self.service.stats())


def _stream_failure(request: pb.EnrollRequest, error: Exception) -> pb.EnrollResponse:
    """An EnrollStream item's error, in its place in the response stream."""
    return pb.EnrollResponse(registration=request.registration, enrolled=False,
                             error=_item_error(error, "EnrollStream"))


def _item_error(error: Exception, method: str) -> pb.StreamError:
    """A stream item's error: the status and message a unary call would have ended with."""
    if isinstance(error, DedupError):
        return pb.StreamError(code=status_of(error).name, message=details(error))
    log.error("%s item failed", method, exc_info=error)
    return pb.StreamError(code=grpc.StatusCode.INTERNAL.name, message="internal error")


def _stats_response(stats: ServiceStats) -> pb.StatsResponse:
    gallery = stats.gallery
    return pb.StatsResponse(
        registrations=gallery.registrations,
        distinct_id_numbers=gallery.distinct_id_numbers,
        index_type=gallery.index_type,
        dimension=gallery.dimension,
        index_vectors=gallery.index_vectors,
        data_dir=stats.data_dir,
        policy=pb.Policy(
            match_threshold=stats.policy.match_threshold,
            review_threshold=stats.policy.review_threshold,
            max_sims_per_id=stats.policy.max_sims_per_id,
        ),
        store_sequence=gallery.store_sequence,
        checkpoint_sequence=gallery.checkpoint_sequence,
        model=pb.ModelInfo(
            model_id=stats.model.model_id,
            model_dir=str(stats.model.directory),
            files=[pb.ModelFile(name=f.name, sha256=f.sha256) for f in stats.model.files],
        ),
        registrations_by_model=gallery.registrations_by_model,
        calibration=_calibration(stats.calibration_dir, gallery.registrations, stats.policy),
    )


def _calibration(data_dir: Path, gallery_size: int, policy: Policy) -> pb.Calibration:
    try:
        model = calibration.load(data_dir)
    except ValueError as error:
        log.warning("%s", error)
        return pb.Calibration()
    if model is None:
        return pb.Calibration()
    return pb.Calibration(
        recorded=True, gallery_size=gallery_size, made_at=model.made_at, source=model.source,
        fpir_at_match_threshold=model.fpir(policy.match_threshold, gallery_size),
        fpir_at_review_threshold=model.fpir(policy.review_threshold, gallery_size))
