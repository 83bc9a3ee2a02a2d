"""The gRPC Investigate service: validation, the audit record before every reply, conversion."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api import convert as convert
from dedup.api import reads as reads
from dedup.api.auth import current_caller
from dedup.api.status import answered, rpc, seconds_left
from dedup.core import validation
from dedup.core.adjudication import Adjudication
from dedup.core.audit_chain import Caller
from dedup.core.errors import InvalidArgument, NotFound
from dedup.core.policy import Scored
from dedup.core.records import Probe
from dedup.core.settings import Limits, ServerConfig
from dedup.core.vectors import Vector
from dedup.service.audit import AuditTrail, embedding_digest
from dedup.service.clusters import (
    Caps,
    Cluster,
    JobSlot,
    JobSlots,
    audit_batches,
    cluster_floor,
    find_clusters,
)
from dedup.service.investigate import Links, SearchFilter, links, widening_search
from dedup.service.registrations import DedupService

DEFAULT_K = 10
MAX_K = 1000
MAX_MIN_DISTINCT_IDS = 1000


def _case(request: Any) -> tuple[str, str]:
    return reads.case_and_purpose(request.case_id, request.purpose)


@dataclass(frozen=True)
class _ClusterJob:
    """A FindClusters job admitted: what it asked, and its slot among the running jobs."""

    caller: Caller
    case_id: str
    purpose: str
    floor: float
    min_ids: int
    query: dict[str, Any]
    slot: JobSlot


def _score(value: float, field: str) -> float:
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise InvalidArgument(field, f"must be a cosine similarity in [-1, 1], got {value}")
    return value


def _k(value: int) -> int:
    if value > MAX_K:
        raise InvalidArgument("k", f"at most {MAX_K}, got {value}")
    return value or DEFAULT_K


def _search_filter(request: pb.SearchRequest, limits: Limits) -> SearchFilter:
    label = limits.max_label_chars
    start = convert.timestamp_us(request.enrolled_from, request.HasField("enrolled_from"),
                                 "enrolled_from")
    end = convert.timestamp_us(request.enrolled_until, request.HasField("enrolled_until"),
                               "enrolled_until")
    if start is not None and end is not None and start >= end:
        raise InvalidArgument("enrolled_until", "must be later than enrolled_from")
    return SearchFilter(validation.text(request.carrier, "carrier", label, required=False),
                        validation.text(request.region, "region", label, required=False),
                        start, end)


def _adjudicated_pair(request: pb.AdjudicateRequest, limits: Limits) -> tuple[str, str, str, str]:
    """The two registration ids, the decision's name and the note, validated."""
    limit = limits.max_registration_id_chars
    first = validation.text(request.registration_id, "registration_id", limit, True, key=True)
    second = validation.text(request.matched_registration_id, "matched_registration_id",
                             limit, True, key=True)
    if first == second:
        raise InvalidArgument("matched_registration_id", "must differ from registration_id")
    if request.decision not in (pb.SAME_PERSON_CONFIRMED, pb.DIFFERENT_PEOPLE):
        raise InvalidArgument("decision", "SAME_PERSON_CONFIRMED or DIFFERENT_PEOPLE")
    note = validation.text(request.note, "note", 1000, required=False)
    decision = pb.Decision.Name(request.decision).replace("_CONFIRMED", "")
    return first, second, decision, note


def _links_response(found: Links, digest: str) -> pb.LinksResponse:
    return pb.LinksResponse(
        registrations=[convert.registration_to_proto(r) for r in found.registrations],
        linked=[pb.LinkedIdNumber(
            id_number=link.id_number, best_score=link.best_score,
            registration_id=link.registration_id,
            matched_registration_id=link.matched_registration_id,
            registrations=[convert.registration_to_proto(r) for r in link.registrations])
            for link in found.linked],
        audit_record_hash=digest)


def _match(scored: Scored) -> pb.Match:
    return pb.Match(registration=convert.registration_to_proto(scored.registration),
                    score=scored.score)


class InvestigateServicer(pb_grpc.InvestigateServicer):
    def __init__(self, service: DedupService, config: ServerConfig, audit: AuditTrail) -> None:
        self.service = service
        self.gallery = service.gallery
        self.policy = config.policy
        self.limits = config.limits
        self.dimension = config.store.dimension
        self.audit = audit
        queries = config.queries
        self.cluster_caps = Caps(queries.max_pairs_per_registration, queries.max_cluster_size,
                                 queries.cluster_job_threads)
        self.cluster_jobs = JobSlots(queries.cluster_jobs_per_caller, queries.cluster_jobs)

    # -- Search ----------------------------------------------------------------------

    @rpc
    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext
               ) -> pb.SearchResponse:
        with reads.read(self.audit, current_caller(), "Investigate.Search") as read:
            read.case_id, read.purpose = _case(request)
            k = _k(request.k)
            floor = _score(request.min_score, "min_score") if request.HasField("min_score") \
                else -1.0
            search_filter = _search_filter(request, self.limits)
            read.query.update(k=k, min_score=floor if request.HasField("min_score") else None,
                              carrier=search_filter.carrier, region=search_filter.region,
                              enrolled_from_us=search_filter.enrolled_from_us,
                              enrolled_until_us=search_filter.enrolled_until_us)
            vector, exclude, probe = self._probe(request, context, read.query)
            found = widening_search(
                self.gallery, vector, floor, k,
                lambda s: s.key != exclude and search_filter.admits(s.registration))
            digest = read.answered([s.registration.registration_id for s in found])
        response = pb.SearchResponse(matches=[_match(s) for s in found], audit_record_hash=digest)
        if probe is not None and probe.quality is not None:
            response.quality.CopyFrom(convert.quality_to_proto(probe.quality))
        if probe is not None and probe.detected is not None:
            response.detected_face.CopyFrom(convert.detected_to_proto(probe.detected))
        return response

    def _probe(self, request: pb.SearchRequest, context: grpc.ServicerContext,
               query: dict[str, Any]) -> tuple[Vector, int | None, Probe | None]:
        """The probe vector, the key to leave out and a photo's probe (its detected face and
        quality); how the probe appears in the trail goes into `query` (before a lookup that
        may end NOT_FOUND)."""
        which = request.WhichOneof("probe")
        if which == "registration_id":
            registration_id = validation.text(request.registration_id, "registration_id",
                                              self.limits.max_registration_id_chars,
                                              required=True, key=True)
            query["registration_id"] = registration_id
            stored = self.gallery.stored_face(registration_id)
            if stored is None:
                raise NotFound(f"registration_id: no registration {registration_id!r}")
            return stored[2], stored[0], None
        if which != "face":
            raise InvalidArgument("probe", "give face or registration_id")
        face = convert.face_input(request.face, True, "face", self.dimension)
        probe = self.service.probe(face, "face", timeout=seconds_left(context),
                                   caller=current_caller().identity)
        query["embedding_sha256"] = embedding_digest(probe.vector.tobytes())
        return probe.vector, None, probe

    # -- Links -----------------------------------------------------------------------

    @rpc
    def Links(self, request: pb.LinksRequest, context: grpc.ServicerContext) -> pb.LinksResponse:
        with reads.read(self.audit, current_caller(), "Investigate.Links") as read:
            read.case_id, read.purpose = _case(request)
            id_number = validation.text(request.id_number, "id_number",
                                        self.limits.max_id_number_chars, required=True,
                                        key=True)
            read.query = {"id_number": id_number}
            found = links(self.gallery, id_number, self.policy.match_threshold)
            returned = [r.registration_id for r in found.registrations] + [
                r.registration_id for link in found.linked for r in link.registrations]
            digest = read.answered(returned)
        return _links_response(found, digest)

    # -- Adjudicate --------------------------------------------------------------------

    @rpc
    def Adjudicate(self, request: pb.AdjudicateRequest, context: grpc.ServicerContext
               ) -> pb.AdjudicateResponse:
        caller = current_caller()
        with reads.read(self.audit, caller, "Investigate.Adjudicate") as read:
            read.case_id, read.purpose = _case(request)
            first, second, decision, note = _adjudicated_pair(request, self.limits)
            read.query = {"registration_id": first, "matched_registration_id": second,
                          "decision": decision}
            score, checked, matched = self._pair(request, first, second)
            record = Adjudication.now(first, second, decision, score, read.case_id, note,
                                      caller.identity).encode()
            # The settlement and the record of the answer are written together.
            digest = read.answered_within(
                functools.partial(self.gallery.settle, checked, matched, record),
                [first, second])
        return pb.AdjudicateResponse(score=score, audit_record_hash=digest.hex())

    def _pair(self, request: pb.AdjudicateRequest, first: str, second: str
              ) -> tuple[float, int | str, int]:
        """The pair's score and its parties: the registrations' keys, or for a checked
        application that is not enrolled its registration_id."""
        matched = self.gallery.stored_face(second)
        if matched is None:
            raise NotFound(f"matched_registration_id: no registration {second!r}")
        checked = self.gallery.stored_face(first)
        if checked is not None:
            return float(checked[2] @ matched[2]), checked[0], matched[0]
        validation.application_id(first, "registration_id")
        if not request.HasField("score"):
            raise InvalidArgument("score", f"required: registration {first!r} is not enrolled, "
                                  "so give the score from the verdict's evidence")
        return _score(request.score, "score"), first, matched[0]

    # -- FindClusters ------------------------------------------------------------------

    def FindClusters(self, request: pb.FindClustersRequest, context: grpc.ServicerContext
                     ) -> Iterator[pb.ClusterUpdate]:
        job = answered(context, lambda: self._begin_clusters(request), "FindClusters")
        try:
            found: list[Cluster] = []
            for item in find_clusters(self.gallery, job.floor, job.min_ids, self.cluster_caps):
                if isinstance(item, Cluster):
                    found.append(item)
                    continue
                yield from self._release(found, job, context)
                found = []
                yield pb.ClusterUpdate(progress=pb.ClusterProgress(
                    searched=item.searched, total=item.total, clusters=item.clusters))
        finally:
            job.slot.release()

    def _begin_clusters(self, request: pb.FindClustersRequest) -> _ClusterJob:
        """Validates the request, takes a job slot and audits the job's start (or refusal)."""
        caller = current_caller()
        with reads.read(self.audit, caller, "Investigate.FindClusters") as read:
            read.case_id, read.purpose = _case(request)
            min_ids = request.min_distinct_id_numbers or 2
            if not 2 <= min_ids <= MAX_MIN_DISTINCT_IDS:
                raise InvalidArgument("min_distinct_id_numbers",
                                      f"must be 2 to {MAX_MIN_DISTINCT_IDS}, got {min_ids}")
            asked = (_score(request.min_score, "min_score") if request.HasField("min_score")
                     else None)
            read.query = {"min_distinct_id_numbers": min_ids, "min_score": asked}
            read.query["min_score"] = floor = cluster_floor(asked, self.policy)
            slot = self.cluster_jobs.take(caller.identity)
            try:
                read.answered([])
            except BaseException:
                slot.release()
                raise
        return _ClusterJob(caller, read.case_id, read.purpose, floor, min_ids, read.query, slot)

    def _release(self, found: list[Cluster], job: _ClusterJob, context: grpc.ServicerContext
                 ) -> Iterator[pb.ClusterUpdate]:
        """Audits a batch of clusters (a record per audit batch), then sends them."""
        for batch in audit_batches(found):
            returned = [r.registration_id for cluster in batch for r in cluster.registrations]
            digest = answered(context, functools.partial(
                self.audit.append, job.caller, "Investigate.FindClusters", job.case_id,
                job.purpose, job.query, returned), "FindClusters")
            yield from (_cluster_update(cluster, digest) for cluster in batch)


def _cluster_update(cluster: Cluster, digest: str) -> pb.ClusterUpdate:
    return pb.ClusterUpdate(audit_record_hash=digest, cluster=pb.Cluster(
        registrations=[convert.registration_to_proto(r) for r in cluster.registrations],
        id_numbers=cluster.id_numbers, min_link_score=cluster.min_link_score,
        truncated=bool(cluster.truncated_by), truncated_by=cluster.truncated_by))
