"""Per-call bookkeeping: request id, access log line, request count and latency."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc

from dedup.api.metrics import Metrics
from dedup.core.logs import REQUEST_ID

access_log = logging.getLogger("dedup.access")

REQUEST_ID_KEY = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CLIENT_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


def _status(context: Any, failure: BaseException | None) -> str:
    code = context.code()  # set by abort() or set_code(); None when the call went well
    if code is not None:
        return str(code.name)
    if isinstance(failure, asyncio.CancelledError):  # by the client, or by its deadline
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining < 0.01 else "CANCELLED"
    return "UNKNOWN" if failure is not None else "OK"


class ObservedCall:
    """One RPC being observed; its outcome is recorded once."""

    def __init__(self, metrics: Metrics, method: str, context: Any) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context  # the call's grpc.aio.ServicerContext
        self.started = time.perf_counter()
        self.recorded = False
        self.counted = True  # in the request count and latency (else only logged)

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """Ends the call with `code`, counted and logged before the status is sent."""
        self.record(code.name)
        await self.context.abort(code, details)
        raise AssertionError("abort() returns only by raising")

    def record(self, status: str) -> None:
        if self.recorded:
            return
        self.recorded = True
        seconds = time.perf_counter() - self.started
        if self.counted:
            self.metrics.requests.labels(self.method, status).inc()
            self.metrics.latency.labels(self.method).observe(seconds)
        access_log.info("%s %s %.1f ms", self.method, status, seconds * 1000,
                        extra={"method": self.method, "status": status,
                               "duration_ms": round(seconds * 1000, 3),
                               "peer": self.context.peer()})


PROCESS_KEY = "x-dedup-process"


class CallObserver:
    def __init__(self, metrics: Metrics, process: str | None = None) -> None:
        """`process`: which process of a multi-process server answers (trailing metadata)."""
        self.metrics = metrics
        self.trailing: tuple[tuple[str, str], ...] = () if process is None else (
            (PROCESS_KEY, process),)

    @contextmanager
    def call(self, method: str, context: Any) -> Iterator[ObservedCall]:
        """Around one RPC: a request id (the caller's `x-request-id`, else a new one) is set
        for log lines and returned in trailing metadata; the outcome is counted and logged."""
        request_id = _request_id(context)
        token = REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id), *self.trailing))
        observed = ObservedCall(self.metrics, method, context)
        try:
            yield observed
        except BaseException as failure:
            observed.record(_status(context, failure))
            raise
        else:
            observed.record(_status(context, None))
        finally:
            REQUEST_ID.reset(token)
