"""Prometheus metrics of one server, on its own registry and HTTP port."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from dedup.core.files import allocate, open_private
from dedup.gallery.base import Gallery

log = logging.getLogger("dedup.server")

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Why a call was refused before its work ran (api/admission.py), or ended waiting for its
# client (api/calls.py).
REFUSAL_REASONS = ("unauthenticated", "permission_denied", "caller_limit", "server_limit",
                   "request_timeout", "stream_idle", "stream_unread", "shutting_down")


class Metrics:
    """Counters and histograms the server updates as it works."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._replicas: Path | None = None
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

    def add_replicas(self, directory: Path) -> None:
        """A multi-process server's primary: /metrics adds the counts of its replicas, which
        write them to `directory` (`write_to_files`)."""
        self._replicas = directory

    def serve(self, address: str) -> tuple[Any, int]:
        """Starts the /metrics HTTP server on HOST:PORT (port 0 picks one)."""
        host, _, port = address.rpartition(":")
        exposed = self.registry
        if self._replicas is not None:
            # without names: a filtered scrape (?name[]=...) asks it too
            exposed = CollectorRegistry(support_collectors_without_names=True)
            exposed.register(_WithReplicas(self.registry, self._replicas))
        server, _thread = start_http_server(int(port), host or "127.0.0.1", registry=exposed)
        return server, int(server.server_port)


# A replica's files hold at most ~50 KB of counts (each of its methods' series a key with
# the help text): the library, which grows a file by truncate, never has to.
REPLICA_METRICS_FILE_BYTES = 1 << 20


def write_to_files(directory: Path, name: str) -> None:
    """A replica process, before its Metrics are made: its counters and histograms are kept
    in prometheus-client's multiprocess files in `directory` (named by `name`, so that a
    replica started again goes on in the files of the one before), where the primary reads
    them. The library takes the directory from the environment, and its kind of value when
    each metric is made (values.ValueClass). The files are made here, allocated (it would
    size them sparse), and it takes their size as its capacity."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    for kind in ("counter", "histogram"):  # the kinds Metrics makes
        with open_private(directory / f"{kind}_{name}.db", "ab") as made:
            allocate(made.fileno(), REPLICA_METRICS_FILE_BYTES)
    values.ValueClass = values.MultiProcessValue(lambda: name)  # type: ignore[no-untyped-call]


class _WithReplicas(Collector):
    """The primary's metrics, each counter and histogram summed with its replicas' (same
    name and labels), so that /metrics counts the whole server."""

    def __init__(self, own: CollectorRegistry, replicas: Path) -> None:
        self.own = own
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        theirs = self._replicas()
        for family in self.own.collect():
            other = theirs.get(family.name)
            if other is None or family.type not in ("counter", "histogram"):
                yield family
                continue
            yield _summed(family, other)

    def _replicas(self) -> dict[str, Metric]:
        """The replicas' families by name; none when their files cannot be read (the
        primary's own metrics are still served). A file being created is empty a moment."""
        try:
            files = [str(path) for path in self.replicas.glob("*.db") if path.stat().st_size]
            merged = MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        except Exception:  # a scrape must not fail for them
            log.warning("cannot read the replicas' metrics in %s", self.replicas, exc_info=True)
            return {}
        return {family.name: family for family in merged}


def _summed(own: Metric, theirs: Metric) -> Metric:
    """The samples of both, added by name and labels. Without `_created`: the replicas have
    none, and the primary's would date series it first served after a replica had."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in (*own.samples, *theirs.samples):
        if sample.name.endswith("_created"):
            continue
        key = (sample.name, tuple(sorted(sample.labels.items())))
        totals[key] = totals.get(key, 0.0) + sample.value
    summed = Metric(own.name, own.documentation, own.type, own.unit)
    summed.samples = [Sample(name, dict(labels), value)
                      for (name, labels), value in totals.items()]
    return summed


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
