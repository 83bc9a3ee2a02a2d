"""Per-call bookkeeping: request id, access log line, request count and latency."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from dedup.api.metrics import Metrics
from dedup.core.logs import REQUEST_ID

access_log = logging.getLogger("dedup.access")

REQUEST_ID_KEY = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CLIENT_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class CallObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    @contextmanager
    def call(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Around one RPC: a request id (the caller's `x-request-id`, else a new one) is set
        for log lines and returned in trailing metadata; the outcome is counted and logged."""
        request_id = _request_id(context)
        token = REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        started = time.perf_counter()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self._record(method, context, time.perf_counter() - started, failed)
            REQUEST_ID.reset(token)

    def _record(self, method: str, context: grpc.ServicerContext, seconds: float,
                failed: bool) -> None:
        code = context.code()  # set by abort(); None when the handler returned normally
        status = code.name if code is not None else ("UNKNOWN" if failed else "OK")
        self.metrics.requests.labels(method, status).inc()
        self.metrics.latency.labels(method).observe(seconds)
        access_log.info("%s %s %.1f ms", method, status, seconds * 1000,
                        extra={"method": method, "status": status,
                               "duration_ms": round(seconds * 1000, 3), "peer": context.peer()})
