"""Who gets in, decided at the call's start, before any request byte is read: the caller is
authenticated and authorised from the call's metadata and TLS session alone, then counted
against the server's limit of calls in flight and the caller's own. A refusal costs no
worker thread and no request parsing; each is counted by reason."""

from __future__ import annotations

import threading
from typing import Any

from google.protobuf.descriptor import MethodDescriptor

from dedup.api.auth import Authorizer
from dedup.api.metrics import Metrics
from dedup.core.audit_chain import Caller
from dedup.core.errors import PermissionDenied, ResourceExhausted, Unauthenticated


class Admission:
    """Admits calls, and holds their slots until `release`."""

    def __init__(self, authorizer: Authorizer, metrics: Metrics, max_calls: int,
                 max_calls_per_caller: int) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        self.max_calls = max_calls
        # Without a security file every call is the one loopback caller: the server's limit
        # is then its limit too.
        self.max_calls_per_caller = (None if authorizer.security is None
                                     else max_calls_per_caller)
        self._lock = threading.Lock()  # release() may come from a worker thread
        self._in_flight = 0
        self._by_caller: dict[str, int] = {}

    def admit(self, method: MethodDescriptor, context: Any) -> Caller:
        """The caller, holding a slot; or Unauthenticated, PermissionDenied or
        ResourceExhausted."""
        try:
            caller = self.authorizer.caller(context)
        except Unauthenticated:
            self.metrics.calls_refused.labels("unauthenticated").inc()
            raise
        try:
            self.authorizer.check(caller, method.containing_service.name, method.name)
        except PermissionDenied:
            self.metrics.calls_refused.labels("permission_denied").inc()
            raise
        self._take(caller)
        return caller

    def _take(self, caller: Caller) -> None:
        with self._lock:
            held = self._by_caller.get(caller.identity, 0)
            if self.max_calls_per_caller is not None and held >= self.max_calls_per_caller:
                reason, refusal = "caller_limit", ResourceExhausted(
                    f"{caller.identity} has {held} calls in flight, its limit "
                    "(max_calls_per_caller): retry when one has finished")
            elif self._in_flight >= self.max_calls:
                reason, refusal = "server_limit", ResourceExhausted(
                    f"server busy: {self._in_flight} calls in flight (max_concurrent_rpcs): "
                    "retry later")
            else:
                self._by_caller[caller.identity] = held + 1
                self._in_flight += 1
                return
        self.metrics.calls_refused.labels(reason).inc()
        raise refusal

    def release(self, caller: Caller) -> None:
        with self._lock:
            self._in_flight -= 1
            held = self._by_caller.pop(caller.identity) - 1
            if held:
                self._by_caller[caller.identity] = held
