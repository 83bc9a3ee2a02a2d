"""The grpc.ServicerContext that the synchronous servicers see while their work runs on a
pool thread (api/bridge.py), backed by the call's asyncio context.

Reads (metadata, peer, credentials, deadline) and the trailing metadata, code and details
go straight to the asyncio context, as grpc's own sync adapter does from its threads.
`abort` does not talk to the transport: it raises `Aborted`, and the call's coroutine sends
the status on the event loop once the pool thread has given the call back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc


class Aborted(BaseException):
    """A servicer's `context.abort(code, details)`: the call ends with that status.

    A BaseException, like the end of a generator: a servicer's `except Exception` around its
    work cannot swallow an abort and answer anyway."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class SyncContext:
    """What a servicer method gets as `context` (the parts dedup's servicers use)."""

    def __init__(self, context: Any) -> None:
        self._context = context  # grpc.aio.ServicerContext

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise Aborted(status.code, status.details)

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return tuple(self._context.invocation_metadata() or ())

    def auth_context(self) -> dict[str, list[bytes]]:
        return dict(self._context.auth_context())

    def peer(self) -> str:
        return str(self._context.peer())

    def peer_identities(self) -> list[bytes] | None:
        identities = self._context.peer_identities()
        return None if identities is None else list(identities)

    def time_remaining(self) -> float | None:
        remaining = self._context.time_remaining()
        return None if remaining is None else float(remaining)

    def is_active(self) -> bool:
        return not (self._context.done() or self._context.cancelled())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Adds to the trailing metadata: the call's x-request-id stays in it."""
        kept = tuple(self._context.trailing_metadata() or ())
        self._context.set_trailing_metadata(kept + tuple(metadata))

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def code(self) -> grpc.StatusCode | None:
        code: grpc.StatusCode | None = self._context.code()
        return code

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def details(self) -> str:
        return str(self._context.details() or "")
