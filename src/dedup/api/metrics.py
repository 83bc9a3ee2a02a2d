"""Prometheus metrics of one server, on its own registry and HTTP port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dedup.gallery.base import Gallery

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Why a call was refused before its work ran (api/admission.py), or ended waiting for its
# client (api/calls.py).
REFUSAL_REASONS = ("unauthenticated", "permission_denied", "caller_limit", "server_limit",
                   "request_timeout", "stream_idle", "stream_unread", "shutting_down")


class Metrics:
    """Counters and histograms the server updates as it works."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dedup_requests", "RPCs answered, by method and status",
                                ["method", "status"], registry=self.registry)
        self.latency = Histogram("dedup_request_seconds", "RPC latency, by method",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.verdicts = Counter("dedup_verdicts", "verdicts given by Check and Enroll",
                                ["verdict"], registry=self.registry)
        self.refusals = Counter("dedup_check_refusals", "registration-role checks refused, "
                                "by reason", ["reason"], registry=self.registry)
        self.embedding = Histogram("dedup_embedding_seconds",
                                   "time to embed one batch of photos (detection + ArcFace)",
                                   buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.embedded = Counter("dedup_photos_embedded", "photos embedded",
                                registry=self.registry)
        self.photos_abandoned = Counter(
            "dedup_photos_abandoned",
            "queued photos skipped because their caller's deadline had passed",
            registry=self.registry)
        self.photos_refused = Counter(
            "dedup_photos_refused",
            "photos refused for want of a slot: the caller's share or the server's",
            ["reason"], registry=self.registry)
        self.calls_refused = Counter(
            "dedup_calls_refused",
            "calls refused before their work ran, or ended waiting for the client, by reason",
            ["reason"], registry=self.registry)
        self.stream_items = Counter(
            "dedup_stream_items",
            "items of a request stream (CheckStream, EnrollStream) answered, by method and "
            "status: OK, or the code of the item's error",
            ["method", "status"], registry=self.registry)
        for reason in REFUSAL_REASONS:
            self.calls_refused.labels(reason)

    def watch_gallery(self, gallery: Gallery) -> None:
        self.registry.register(_GalleryCollector(gallery))

    def serve(self, address: str) -> tuple[Any, int]:
        """Starts the /metrics HTTP server on HOST:PORT (port 0 picks one)."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), host or "127.0.0.1",
                                            registry=self.registry)
        return server, int(server.server_port)


class _GalleryCollector(Collector):
    """Sizes read at scrape time, so they are never stale."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.gallery.index_status()

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        yield gauge("dedup_index_vectors", "vectors in the live index", status.vectors)
        yield gauge("dedup_index_rebuilding", "1 while an index rebuild runs",
                    int(status.rebuilding))
        for extra in self.gallery.gauges():  # registrations, and the backend's own
            yield gauge(extra.name, extra.help, extra.value)
