"""How a servicer method answers: the gRPC status each DedupError becomes, the message sent
with it, and the time the caller left it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from dedup.core.errors import (
    AlreadyExists,
    AuditUnavailable,
    BackendUnavailable,
    DeadlineExceeded,
    DedupError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Stopping,
    StoreDamaged,
    Unauthenticated,
)

log = logging.getLogger("dedup.server")

_Handler = TypeVar("_Handler", bound=Callable[..., Any])
_T = TypeVar("_T")

_STATUS: dict[type[DedupError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    StoreDamaged: grpc.StatusCode.DATA_LOSS,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    Stopping: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: DedupError) -> grpc.StatusCode:
    for kind, code in _STATUS.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


MAX_DETAILS_CHARS = 1000


def details(error: BaseException) -> str:
    """The error's message, cut short: it may quote a huge request field, and gRPC refuses
    trailing metadata over 8 KiB (the caller would get a transport error instead)."""
    text = str(error)
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return f"{text[:MAX_DETAILS_CHARS]}... ({len(text) - MAX_DETAILS_CHARS} more characters)"


def answered(context: grpc.ServicerContext, work: Callable[[], _T], name: str) -> _T:
    """Runs `work`: a DedupError becomes its status, anything else is logged and INTERNAL."""
    try:
        return work()
    except DedupError as error:
        context.abort(status_of(error), details(error))
    except Exception:
        log.exception("%s failed", name)
        context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error")
    raise AssertionError("context.abort returns only by raising")


def rpc(handler: _Handler) -> _Handler:
    """A unary servicer method whose errors become statuses (see `answered`)."""

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        return answered(context, lambda: handler(self, request, context), handler.__name__)

    return wrapper  # type: ignore[return-value]


def seconds_left(context: grpc.ServicerContext) -> float | None:
    """Seconds left for the call, or None without a deadline (gRPC then reports ~1e308)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else max(0.0, float(remaining))
