"""Assembles the dedup server: the face model, one gallery (embedded or Milvus), the gRPC
services of dedup.api, health and reflection, on mutual TLS or loopback listeners.

The transport is grpc.aio on an event loop of its own thread (api/transport.py): calls are
admitted and wait for their clients there, and only admitted work reaches the worker pool
(api/wire.py). Health and reflection answer on the loop, whatever the workers are doing."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.api.admission import Admission
from dedup.api.auth import Authorizer, mtls_credentials, tls_credentials
from dedup.api.calls import Gate, Waits
from dedup.api.face_dedup import FaceDedupServicer
from dedup.api.forward import Primary, add_replica_service
from dedup.api.index_admin import IndexAdminServicer
from dedup.api.investigate import InvestigateServicer
from dedup.api.metrics import Metrics, write_to_files
from dedup.api.observe import CallObserver
from dedup.api.rate_limit import SharedCallerRate
from dedup.api.transport import Transport
from dedup.api.wire import add_service
from dedup.core.blas import limit_numpy_blas
from dedup.core.errors import ConfigError
from dedup.core.files import PRIVATE_FILE_MODE
from dedup.core.security import is_loopback
from dedup.core.settings import IndexConfig, ServerConfig
from dedup.face.embedder import FaceEmbedder
from dedup.face.model_pack import resolve_model_dir
from dedup.gallery.base import Gallery
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.replica import ReplicaGallery
from dedup.service.audit import AuditTrail, local_audit_key
from dedup.service.registrations import DedupService

log = logging.getLogger("dedup.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceDedup"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name
INVESTIGATE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Investigate"].full_name


class DedupServer:
    """A running dedup: the gRPC server, its health service and the gallery behind it."""

    def __init__(self, transport: Transport, service: DedupService,
                 health_servicer: health.aio.HealthServicer, config: ServerConfig,
                 metrics: Metrics, gate: Gate) -> None:
        self.grpc_server = transport
        self.gate = gate
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.token_port: int | None = None
        self.audit: AuditTrail | None = None  # anchored from start to stop
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
        if self.audit is not None:
            self.audit.start()
        for name in ("", SERVICE_NAME):
            self.grpc_server.run(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health turns NOT_SERVING, in-flight calls finish within `grace` seconds
        (request streams take new items for the first half of it), the index is
        checkpointed."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if not self.grpc_server.stopped.is_set():
                self.grpc_server.run(self.health.enter_graceful_shutdown())
                self.grpc_server.on_loop(self.gate.drain_after, grace / 2)
            self.grpc_server.stop(grace).wait()
            self.service.embedder.close()
            if self.audit is not None:
                self.audit.close()  # a last anchor of the trail's head
            self.gallery.close(checkpoint=True)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def index_config(config: ServerConfig) -> IndexConfig:
    """The configured index, calibrated (SignIVF, FastScanIVF) on what the verdicts turn on."""
    return dataclasses.replace(config.index,
                               calibration_min_score=config.policy.review_threshold)


def open_backend(config: ServerConfig, model_id: str) -> Gallery:
    """The embedded gallery in the data directory, or Milvus when configured."""
    if config.milvus is None:
        return EmbeddedGallery(config.store, model_id, index_config(config))
    from dedup.gallery.milvus import (
        MilvusGallery,  # needs pymilvus, only installed for this backend
    )

    return MilvusGallery(config.milvus, model_id, config.store.dimension,
                         config.store.data_dir)


@dataclass(frozen=True)
class Forwarding:
    """How the read replicas of a multi-process server (dedup/replicas.py) reach the
    primary: its Unix socket in the data directory, and the secret with which they name
    the callers they authenticated (api/auth.py)."""

    socket: Path
    secret: str
    rates: Path  # the desks' check-rate buckets every process maps (api/rate_limit.py)
    metrics: Path  # the replicas' counts, which the primary's /metrics adds to its own


def create_server(config: ServerConfig, address: str = "127.0.0.1:0",
                  forwarding: Forwarding | None = None) -> tuple[DedupServer, int]:
    """Loads the face model, opens the gallery and binds `address`.

    Returns the server (not started) and its port. A missing model directory or an unusable
    data directory raises before anything listens. With `forwarding`, the primary of a
    multi-process server: `address` is bound with SO_REUSEPORT (the replicas bind it too),
    and the replicas' relayed calls are taken on the Unix socket.

    It limits numpy's BLAS threads for the whole process (`config.numpy_blas_threads`,
    core/blas.py), before the start-up build: they stay limited after the server stops.
    """
    if config.security is None and not is_loopback(address):
        raise ConfigError(f"refusing to listen on {address} without a security file: "
                         "unauthenticated, dedup serves on loopback only (see `dedup keys`)")
    limit_numpy_blas(config.numpy_blas_threads)
    metrics = Metrics()
    embedder = _embedder(config, metrics)
    try:
        gallery = open_backend(config, embedder.model_id)
    except BaseException:
        embedder.close()
        raise
    transport: Transport | None = None
    try:
        transport = _transport(config, reuse_port=forwarding is not None)
        service = DedupService(gallery, embedder, config.policy, config.limits)
        metrics.watch_gallery(gallery)
        gate = (_gate(config, transport, metrics) if forwarding is None else
                _gate(config, transport, metrics, forwarding.secret, "primary"))
        audit = _add_dedup_services(transport, config, service, gate, forwarding)
        health_servicer = transport.on_loop(_add_health_and_reflection, transport.server, config)
        port, token_port = transport.on_loop(_listen, transport.server, config, address)
        if forwarding is not None:
            transport.on_loop(_listen_for_replicas, transport.server, forwarding.socket)
    except BaseException:
        if transport is not None:
            transport.stop(0)
        embedder.close()
        gallery.close(checkpoint=False)
        raise
    dedup_server = DedupServer(transport, service, health_servicer, config, metrics, gate)
    dedup_server.token_port = token_port
    dedup_server.audit = audit
    return dedup_server, port


def _embedder(config: ServerConfig, metrics: Metrics) -> FaceEmbedder:
    """The photo pipeline; a caller's share of its slots only where callers are told apart."""
    per_caller = None if config.security is None else config.max_pending_images_per_caller
    return FaceEmbedder(resolve_model_dir(config.model_dir), config.capture,
                        workers=config.embed_workers, max_batch=config.embed_batch,
                        max_pending=config.max_pending_images, metrics=metrics,
                        max_pending_per_holder=per_caller)


def create_replica_server(config: ServerConfig, address: str, forwarding: Forwarding,
                          number: int, pin: Callable[[int], None]
                          ) -> tuple[DedupServer, ReplicaGallery, int]:
    """A read replica of a multi-process server (dedup/replicas.py): its own gRPC server
    on the primary's `address` (SO_REUSEPORT), answering Checks from a ReplicaGallery and
    relaying every other call to the primary (api/forward.py). Returns the server (not
    started), its gallery (the store not open yet: the primary opens it) and its port.
    Its counters and histograms go to files the primary's /metrics adds to its own; audit
    anchoring is the primary's."""
    if config.metrics_address is not None:  # the primary serves them: this process's, for good
        write_to_files(forwarding.metrics, f"replica{number}")
    config = dataclasses.replace(config, metrics_address=None, audit_anchor_file=None)
    limit_numpy_blas(config.numpy_blas_threads)
    metrics = Metrics()
    embedder = _embedder(config, metrics)
    gallery = ReplicaGallery(config.store, embedder.model_id, index_config(config), pin)
    transport: Transport | None = None
    try:
        transport = _transport(config, reuse_port=True)
        service = DedupService(gallery, embedder, config.policy, config.limits)
        key = (config.security.audit_key if config.security else None) \
            or local_audit_key(gallery.data_dir)
        checks = FaceDedupServicer(service, config, metrics, AuditTrail(gallery, key),
                                   shared_check_rate(config, forwarding, create=False))
        gate = _gate(config, transport, metrics, process=f"replica-{number}")
        primary = transport.run(_primary(forwarding, config))
        services = pb.DESCRIPTOR.services_by_name
        for name in ("FaceDedup", "IndexAdmin", "Investigate"):
            transport.on_loop(add_replica_service, transport.server, services[name], checks,
                              gate, primary, lambda: gallery.serving)
        health_servicer = transport.on_loop(_add_health_and_reflection, transport.server, config)
        port, _ = transport.on_loop(_listen, transport.server, config, address)
    except BaseException:
        if transport is not None:
            transport.stop(0)
        embedder.close()
        gallery.close()
        raise
    return (DedupServer(transport, service, health_servicer, config, metrics, gate), gallery,
            port)


async def _primary(forwarding: Forwarding, config: ServerConfig) -> Primary:
    return Primary(forwarding.socket, forwarding.secret, config.max_message_bytes)


def _transport(config: ServerConfig, reuse_port: bool = False) -> Transport:
    return Transport(
        [("grpc.max_receive_message_length", config.max_message_bytes),
         ("grpc.max_send_message_length", config.max_message_bytes),
         # Only the processes of one multi-process server share a port.
         ("grpc.so_reuseport", int(reuse_port)),
         # A stream's receive window then stays small (64 KiB) until its request is read:
         # grown by bandwidth probes, it let refused callers' bytes pile up in the transport
         # (60-100 MiB over 32 unread 15 MiB requests). Admitted uploads pay on long links:
         # through a 100 ms round trip an 8 MiB photo took 0.95 s instead of 0.2 s, a
         # 512 KiB one 0.2 s instead of 0.1 s.
         ("grpc.http2.bdp_probe", 0)],
        config.max_workers,
        # OpenMP's thread count is per calling thread: set it in every worker.
        functools.partial(faiss.omp_set_num_threads, config.faiss_omp_threads))


def _gate(config: ServerConfig, transport: Transport, metrics: Metrics,
          forward_secret: str | None = None, process: str | None = None) -> Gate:
    """Admission and time bounds of every dedup call. max_concurrent_rpcs counts admitted
    calls only: a caller without credentials, health and reflection never take a slot.
    `forward_secret`: a primary's (replicas name their callers with it); `process`: which
    process of a multi-process server answers, in every call's trailing metadata."""
    admission = Admission(Authorizer(config.security, forward_secret), metrics,
                          config.max_concurrent_rpcs, config.max_calls_per_caller)
    return Gate(CallObserver(metrics, process), admission, transport.pool,
                Waits(config.request_read_timeout_s, config.stream_idle_timeout_s))


def _add_dedup_services(transport: Transport, config: ServerConfig, service: DedupService,
                        gate: Gate, forwarding: Forwarding | None = None) -> AuditTrail:
    """FaceDedup, IndexAdmin and Investigate, each call observed and admitted by `gate`;
    returns their audit trail."""
    metrics = gate.metrics
    audit = AuditTrail.for_server(service.gallery, config)
    services = pb.DESCRIPTOR.services_by_name
    check_rate = None if forwarding is None else \
        shared_check_rate(config, forwarding, create=True)
    for name, servicer in (("FaceDedup", FaceDedupServicer(service, config, metrics, audit,
                                                           check_rate)),
                           ("IndexAdmin", IndexAdminServicer(service.gallery)),
                           ("Investigate", InvestigateServicer(service, config, audit))):
        transport.on_loop(add_service, transport.server, services[name], servicer, gate)
    return audit


def shared_check_rate(config: ServerConfig, forwarding: Forwarding,
                      create: bool) -> SharedCallerRate:
    """The desks' check rates of a multi-process server, in the file the primary creates
    (anew at each start) and its replicas map."""
    return SharedCallerRate(forwarding.rates, config.queries.check_rate_per_caller,
                            config.queries.check_burst_per_caller, create)


def _add_health_and_reflection(server: grpc.aio.Server,
                               config: ServerConfig) -> health.aio.HealthServicer:
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, INVESTIGATE_SERVICE_NAME,
             health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
    return health_servicer


# sockaddr_un's path is 108 bytes on Linux, with its terminating NUL.
_MAX_SOCKET_PATH = 107


def _listen_for_replicas(server: grpc.aio.Server, socket: Path) -> None:
    """The Unix socket the replicas relay calls to: in the data directory (0700), 0600."""
    if len(str(socket)) > _MAX_SOCKET_PATH:
        raise ConfigError(f"{socket}: the path of the replicas' socket is longer than "
                          f"{_MAX_SOCKET_PATH} bytes; use a data directory with a shorter path")
    if server.add_insecure_port(f"unix:{socket}") == 0:
        raise OSError(f"cannot bind unix:{socket}")
    os.chmod(socket, PRIVATE_FILE_MODE)


def _listen(server: grpc.aio.Server, config: ServerConfig,
            address: str) -> tuple[int, int | None]:
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
