"""Assembles the dedup server: the face model, one gallery (embedded or Milvus), the gRPC
services of dedup.api, health and reflection, on mutual TLS or loopback listeners."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.api.auth import Authorizer, is_loopback, mtls_credentials, tls_credentials
from dedup.api.face_dedup import FaceDedupServicer
from dedup.api.index_admin import IndexAdminServicer
from dedup.api.investigate import InvestigateServicer
from dedup.api.metrics import Metrics
from dedup.api.observe import CallObserver
from dedup.api.wire import add_service
from dedup.core.errors import ConfigError
from dedup.core.settings import ServerConfig
from dedup.face.embedder import FaceEmbedder
from dedup.face.model_pack import resolve_model_dir
from dedup.gallery.base import Gallery
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.service.audit import AuditTrail
from dedup.service.registrations import DedupService

log = logging.getLogger("dedup.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceDedup"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name
INVESTIGATE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Investigate"].full_name


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
    from dedup.gallery.milvus import (
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
        server = _grpc_server(config)
        service = DedupService(gallery, embedder, config.policy, config.limits)
        metrics.watch_gallery(gallery)
        _add_dedup_services(server, config, service, metrics)
        health_servicer = _add_health_and_reflection(server, config)
        port, token_port = _listen(server, config, address)
    except BaseException:
        embedder.close()
        gallery.close(checkpoint=False)
        raise
    dedup_server = DedupServer(server, service, health_servicer, config, metrics)
    dedup_server.token_port = token_port
    return dedup_server, port


def _grpc_server(config: ServerConfig) -> grpc.Server:
    return grpc.server(
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


def _add_dedup_services(server: grpc.Server, config: ServerConfig, service: DedupService,
                        metrics: Metrics) -> None:
    """FaceDedup, IndexAdmin and Investigate, each call observed and authorised."""
    observer = CallObserver(metrics)
    authorizer = Authorizer(config.security)
    audit = AuditTrail(service.gallery)
    services = pb.DESCRIPTOR.services_by_name
    add_service(server, services["FaceDedup"],
                FaceDedupServicer(service, config, metrics, audit), observer, authorizer)
    add_service(server, services["IndexAdmin"], IndexAdminServicer(service.gallery), observer,
                authorizer)
    add_service(server, services["Investigate"],
                InvestigateServicer(service, config, audit), observer, authorizer)


def _add_health_and_reflection(server: grpc.Server,
                               config: ServerConfig) -> health.HealthServicer:
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, INVESTIGATE_SERVICE_NAME,
             health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
    return health_servicer


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
