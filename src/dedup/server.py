"""The gRPC API layer: FaceDedup, health and reflection over one gallery."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api import convert as convert
from dedup.api.auth import (
    CALLER,
    UNAUTHENTICATED_CALLER,
    Authorizer,
    is_loopback,
    mtls_credentials,
    tls_credentials,
)
from dedup.api.investigate import InvestigateServicer
from dedup.api.metrics import Metrics
from dedup.api.observe import CallObserver
from dedup.api.status import details, rpc, status_of
from dedup.api.wire import add_service
from dedup.core import validation
from dedup.core.audit_chain import record_maker
from dedup.core.errors import ConfigError, DedupError, NotFound
from dedup.core.records import Probe
from dedup.core.settings import Policy, ServerConfig
from dedup.face.embedder import FaceEmbedder
from dedup.face.model_pack import resolve_model_dir
from dedup.gallery.base import Gallery, IndexStatus
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.service import calibration as calibration
from dedup.service.audit import AuditTrail, embedding_digest
from dedup.service.registrations import DedupService

log = logging.getLogger("dedup.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceDedup"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name
INVESTIGATE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Investigate"].full_name

def _deadline(context: grpc.ServicerContext) -> float | None:
    """Seconds left for the call, or None without a deadline (gRPC then reports ~1e308)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else max(0.0, float(remaining))


class FaceDedupServicer(pb_grpc.FaceDedupServicer):
    def __init__(self, service: DedupService, config: ServerConfig, metrics: Metrics,
                 audit: AuditTrail) -> None:
        self.service = service
        self.metrics = metrics
        self.audit = audit
        self.limits = config.limits
        self.dimension = config.store.dimension

    def _probe(self, request: pb.CheckRequest | pb.EnrollRequest,
               context: grpc.ServicerContext) -> Probe:
        face = convert.face_input(request.face, request.HasField("face"), "face", self.dimension)
        return self.service.probe(face, "face", timeout=_deadline(context))

    @rpc
    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        claimed = validation.text(request.claimed_id_number, "claimed_id_number",
                               self.limits.max_id_number_chars, required=False)
        limit = convert.max_candidates(request.max_candidates, self.limits)
        registration_id = validation.text(request.registration_id, "registration_id",
                                       self.limits.max_registration_id_chars, required=False)
        probe = self._probe(request, context)
        result = self.service.check(probe, claimed, limit, registration_id)
        self._audit_investigator(context, "FaceDedup.Check", lambda: {
            "embedding_sha256": embedding_digest(probe.vector.tobytes()),
            "claimed_id_number": claimed}, [m.registration.registration_id for m in result.matches])
        self.metrics.verdicts.labels(result.verdict.name).inc()
        return convert.check_to_proto(result)

    def _audit_investigator(self, context: grpc.ServicerContext, method: str,
                            query: Callable[[], dict[str, str]], returned: list[str]) -> None:
        """An investigator's reads of FaceDedup are audited like Investigate calls; the case
        and purpose come from `x-case-id` / `x-purpose` metadata, when sent. `query` is only
        made for them: other callers' checks pay nothing."""
        caller = CALLER.get() or UNAUTHENTICATED_CALLER
        if caller.role != "investigator":
            return
        metadata = dict(context.invocation_metadata() or ())
        self.audit.append(caller, method, str(metadata.get("x-case-id", "")),
                          str(metadata.get("x-purpose", "")), query(), returned)

    @rpc
    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        return self._enroll(request, context)

    def EnrollStream(self, requests: Iterator[pb.EnrollRequest],
                     context: grpc.ServicerContext) -> Iterator[pb.EnrollResponse]:
        # One response per request, in order; the client's sends are paced by our reads.
        for request in requests:
            try:
                yield self._enroll(request, context)
            except DedupError as error:
                yield _stream_error(request, status_of(error), details(error))
            except Exception:
                log.exception("EnrollStream item failed")
                yield _stream_error(request, grpc.StatusCode.INTERNAL, "internal error")

    def _enroll(self, request: pb.EnrollRequest,
                context: grpc.ServicerContext) -> pb.EnrollResponse:
        registration = convert.registration_from_proto(
            request.registration, request.HasField("registration"), self.limits
        )
        probe = self._probe(request, context)
        result = self.service.enroll(registration, probe, request.check_first)
        response = pb.EnrollResponse(
            registration=convert.registration_to_proto(result.registration),
            enrolled=result.enrolled,
        )
        if result.check is not None:
            self.metrics.verdicts.labels(result.check.verdict.name).inc()
            response.check.CopyFrom(convert.check_to_proto(result.check))
        if result.detected is not None:
            response.detected_face.CopyFrom(convert.detected_to_proto(result.detected))
        return response

    @rpc
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        by, value = convert.delete_key(request, self.limits)
        caller = CALLER.get() or UNAUTHENTICATED_CALLER
        maker = record_maker(caller, "FaceDedup.Delete", "", "", {by.value: value})
        try:
            erasure = self.service.delete(by, value, maker)
        except NotFound:
            self.audit.append(caller, "FaceDedup.Delete", "", "", {by.value: value}, [])
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
        registration_id = validation.text(request.registration_id, "registration_id",
                                       self.limits.max_registration_id_chars, required=True)
        registration = self.service.get(registration_id)
        self._audit_investigator(context, "FaceDedup.GetRegistration",
                                 lambda: {"registration_id": registration_id}, [registration_id])
        return convert.registration_to_proto(registration)

    @rpc
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats = self.service.stats()
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
            calibration=self._calibration(stats.calibration_dir, gallery.registrations,
                                          stats.policy),
        )

    def _calibration(self, data_dir: Path, gallery_size: int, policy: Policy) -> pb.Calibration:
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


def _stream_error(request: pb.EnrollRequest, code: grpc.StatusCode,
                  message: str) -> pb.EnrollResponse:
    return pb.EnrollResponse(registration=request.registration, enrolled=False,
                             error=pb.StreamError(code=code.name, message=message))


class IndexAdminServicer(pb_grpc.IndexAdminServicer):
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def Rebuild(self, request: pb.RebuildRequest,
                context: grpc.ServicerContext) -> Iterator[pb.RebuildProgress]:
        updates: queue.Queue[pb.RebuildProgress | BaseException] = queue.Queue()

        def progress(phase: str, done: int, total: int) -> None:
            updates.put(pb.RebuildProgress(phase=phase, done=done, total=total))

        def run() -> None:
            try:
                status = self.gallery.rebuild(request.index_factory or None, progress)
                updates.put(pb.RebuildProgress(phase="done", done=status.vectors,
                                               total=status.vectors, index=_index_info(status)))
            except BaseException as error:
                updates.put(error)

        # The rebuild is a server job: it finishes even if this caller goes away.
        threading.Thread(target=run, name="dedup-rebuild-rpc", daemon=True).start()
        while True:
            update = updates.get()
            if isinstance(update, BaseException):
                if not isinstance(update, DedupError):
                    log.error("rebuild failed", exc_info=update)
                context.abort(status_of(update) if isinstance(update, DedupError)
                              else grpc.StatusCode.INTERNAL, f"rebuild failed: {details(update)}")
                return
            yield update
            if update.phase == "done":
                return

    @rpc
    def GetIndexInfo(self, request: pb.GetIndexInfoRequest,
                     context: grpc.ServicerContext) -> pb.IndexInfo:
        return _index_info(self.gallery.index_status())

    @rpc
    def Compact(self, request: pb.CompactRequest,
                context: grpc.ServicerContext) -> pb.CompactResponse:
        started = time.monotonic()
        before, after = self.gallery.compact()
        return pb.CompactResponse(bytes_before=before, bytes_after=after,
                                  seconds=time.monotonic() - started)

    @rpc
    def Checkpoint(self, request: pb.CheckpointRequest,
                   context: grpc.ServicerContext) -> pb.CheckpointResponse:
        sequence = self.gallery.checkpoint()
        return pb.CheckpointResponse(sequence=sequence, path=str(self.gallery.checkpoint_path))


def _index_info(status: IndexStatus) -> pb.IndexInfo:
    return pb.IndexInfo(**dataclasses.asdict(status))


class DedupServer:
    """A running dedup: the gRPC server, its health service and the gallery behind it."""

    def __init__(self, server: grpc.Server, service: DedupService,
                 health_servicer: health.HealthServicer, config: ServerConfig,
                 metrics: Metrics) -> None:
        self.grpc_server = server
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.token_port: int | None = None
        self._metrics_http: Any = None
        self.service = service
        self.gallery = service.gallery
        self.health = health_servicer
        self.config = config
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def start(self) -> None:
        if self.config.metrics_address is not None:
            self._metrics_http, self.metrics_port = self.metrics.serve(self.config.metrics_address)
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health turns NOT_SERVING, in-flight calls finish, the index is checkpointed."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self.health.enter_graceful_shutdown()
            self.grpc_server.stop(self.config.shutdown_grace_s if grace is None else grace).wait()
            self.service.embedder.close()
            self.gallery.close(checkpoint=True)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def open_backend(config: ServerConfig, model_id: str) -> Gallery:
    """The embedded gallery in the data directory, or Milvus when configured."""
    if config.milvus is None:
        return EmbeddedGallery(config.store, model_id, config.index)
    from dedup.gallery.milvus.gallery import (
        MilvusGallery,  # needs pymilvus, only installed for this backend
    )

    return MilvusGallery(config.milvus, model_id, config.store.dimension,
                         config.store.data_dir)


def create_server(config: ServerConfig, address: str = "127.0.0.1:0") -> tuple[DedupServer, int]:
    """Loads the face model, opens the gallery and binds `address`.

    Returns the server (not started) and its port. A missing model directory or an unusable
    data directory raises before anything listens.
    """
    if config.security is None and not is_loopback(address):
        raise ConfigError(f"refusing to listen on {address} without a security file: "
                         "unauthenticated, dedup serves on loopback only (see `dedup keys`)")
    metrics = Metrics()
    embedder = FaceEmbedder(resolve_model_dir(config.model_dir), config.capture,
                            workers=config.embed_workers, max_batch=config.embed_batch,
                            max_pending=config.max_pending_images, metrics=metrics)
    try:
        gallery = open_backend(config, embedder.model_id)
    except BaseException:
        embedder.close()
        raise
    try:
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.max_workers,
                thread_name_prefix="dedup-rpc",
                # OpenMP's thread count is per calling thread: set it in every worker.
                initializer=faiss.omp_set_num_threads,
                initargs=(config.faiss_omp_threads,),
            ),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        service = DedupService(gallery, embedder, config.policy, config.limits)
        metrics.watch_gallery(gallery)
        observer = CallObserver(metrics)
        authorizer = Authorizer(config.security)
        audit = AuditTrail(gallery)
        services = pb.DESCRIPTOR.services_by_name
        add_service(server, services["FaceDedup"],
                    FaceDedupServicer(service, config, metrics, audit), observer, authorizer)
        add_service(server, services["IndexAdmin"], IndexAdminServicer(gallery), observer,
                    authorizer)
        add_service(server, services["Investigate"],
                    InvestigateServicer(service, config, audit), observer, authorizer)
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, ADMIN_SERVICE_NAME, INVESTIGATE_SERVICE_NAME,
                 health.SERVICE_NAME, reflection.SERVICE_NAME),
                server,
            )
        port, token_port = _listen(server, config, address)
    except BaseException:
        embedder.close()
        gallery.close(checkpoint=False)
        raise
    dedup_server = DedupServer(server, service, health_servicer, config, metrics)
    dedup_server.token_port = token_port
    return dedup_server, port


def _listen(server: grpc.Server, config: ServerConfig, address: str) -> tuple[int, int | None]:
    """Binds `address` (mutual TLS with a security file, else plain on loopback) and the
    security file's token listener (server TLS); returns both ports."""
    security = config.security
    if security is None:
        log.warning("NO SECURITY FILE: serving UNAUTHENTICATED on %s (loopback only); every "
                    "caller has every right. Give --security FILE in production.", address)
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, mtls_credentials(security))
    if port == 0:
        raise OSError(f"cannot bind {address}")
    if security is None or security.token_address is None:
        return port, None
    token_port = server.add_secure_port(security.token_address, tls_credentials(security))
    if token_port == 0:
        raise OSError(f"cannot bind {security.token_address}")
    return port, token_port
