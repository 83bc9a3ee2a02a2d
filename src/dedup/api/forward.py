"""A read replica's services (`dedup serve --processes N`): it answers unaudited Checks and
CheckStreams itself and relays every other call to the primary process.

Every call is admitted here first, as on the primary (api/admission.py): a caller without
credentials is refused before any request byte is read. A relayed call goes over the
primary's Unix socket byte for byte, with its metadata, its deadline and the caller this
replica authenticated (auth.forwarded_caller_metadata); the primary admits it again and
does the authorisation, the audit and the enrolment's check as for any call; its status,
details and trailing metadata come back to the client unchanged. Checks whose read is
audited (an identified investigator's or admin's) are relayed, as is a Check arriving while
this replica's store is not open (NotServedHere).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.api.auth import FORWARD_KEYS, current_caller, forwarded_caller_metadata
from dedup.api.bridge import READ_AHEAD_ITEMS, End
from dedup.api.calls import Call, Gate
from dedup.api.observe import REQUEST_ID_KEY
from dedup.api.reads import audited
from dedup.api.sync_context import Aborted
from dedup.core.errors import NotServedHere
from dedup.core.logs import REQUEST_ID

log = logging.getLogger("dedup.server")

# Served by a replica itself (when the read is not audited); every other method is relayed.
LOCAL_METHODS = frozenset({"dedup.v1.FaceDedup/Check"})
# A stream of checks: served by a replica item by item, an item its store cannot answer
# relayed to the primary as a Check of its own.
LOCAL_STREAMS = frozenset({"dedup.v1.FaceDedup/CheckStream"})
# The longest a replica's worker waits for the primary to check one stream item for it.
_FALLBACK_S = 60.0
# Items of a relayed request stream sent to the primary and not yet answered, at most: what
# the primary still owes when this replica drains is what a stream it serves itself owes.
_UNANSWERED = READ_AHEAD_ITEMS


def _passthrough(response: Message | bytes) -> bytes:
    """A relayed response is the primary's bytes already; a local one is serialised."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class Primary:
    """The replica's channel to the primary process's Unix socket. Made on the event loop."""

    def __init__(self, socket: Path, secret: str, max_message_bytes: int) -> None:
        self.secret = secret
        self.channel = grpc.aio.insecure_channel(
            f"unix:{socket}",
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)])
        self._callables: dict[str, Any] = {}

    def callable(self, method: MethodDescriptor) -> Any:
        """The method's multi-callable, bytes in and out."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        found = self._callables.get(path)
        if found is None:
            shape = {(False, False): self.channel.unary_unary,
                     (False, True): self.channel.unary_stream,
                     (True, False): self.channel.stream_unary,
                     (True, True): self.channel.stream_stream}
            found = shape[method.client_streaming, method.server_streaming](path)
            self._callables[path] = found
        return found

    def metadata(self, context: Any) -> list[tuple[str, str | bytes]]:
        """The client's metadata, with this call's request id and the caller named."""
        kept = [(key, value) for key, value in context.invocation_metadata() or ()
                if key not in FORWARD_KEYS and key != REQUEST_ID_KEY
                and not key.startswith("grpc-") and key != "user-agent"]
        return [*kept, (REQUEST_ID_KEY, REQUEST_ID.get()),
                *forwarded_caller_metadata(current_caller(), self.secret)]


async def relay(call: Call, primary: Primary, request: bytes | None = None) -> bytes | None:
    """Has the primary answer `call`; returns its response (None for a response stream,
    which is written to the client as it comes). `request`: the request, if already read."""
    method, context = call.method, call.context
    rpc_callable = primary.callable(method)
    options = {"metadata": primary.metadata(context), "timeout": context.time_remaining()}
    pump: _Pump | None = None
    if method.client_streaming:
        rpc = rpc_callable(**options)
        pump = _Pump(call, rpc)
    else:
        rpc = rpc_callable(request if request is not None else await call.request_bytes(),
                           **options)
    try:
        if method.server_streaming:
            async for response in rpc:
                await call.write(response)
                if pump is not None:
                    pump.answer_relayed()
            answer = None
        else:
            answer = await rpc
        _relay_trailing(context, await rpc.trailing_metadata())
        if pump is not None and pump.drained:
            raise call.shutting_down(pump.answered)
        return answer
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
        if pump is not None and (failure := pump.failure()) is not None:
            raise failure from None  # the client's stream broke its time bound
        if isinstance(error, asyncio.CancelledError):
            raise  # the client went away
        _relay_trailing(context, error.trailing_metadata())
        raise Aborted(error.code(), error.details() or "") from None
    finally:
        if pump is not None:
            pump.cancel()
        if not rpc.done():
            rpc.cancel()


class _Pump:
    """The client's request stream, item by item, to the primary, read within the same time
    bounds as any request stream: the idle bound applies while every item sent is answered
    (a client waiting for answers is not idle; once they came, the primary's own bound ends
    a silent stream). On a timeout the relayed call is cancelled. Once this server drains
    for its stop (Gate.drain_after), it sends no next item: it ends the primary's request
    stream, whose answers to the items sent still come back, and `drained` is set. At most
    _UNANSWERED items are sent and not yet answered: what the primary still owes when the
    drain comes is one read-ahead's worth, as on a stream it serves itself."""

    def __init__(self, call: Call, rpc: Any) -> None:
        self.call, self.rpc = call, rpc
        self.sent = 0
        self.answered = 0
        self.drained = False
        self._waking = False
        self._read: asyncio.Future[bytes | End] | None = None
        self._room = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        call.gate.follow(self)

    def wake(self) -> None:
        """The server drains: the read waiting for the client's next item ends."""
        self._waking = True
        self._room.set()
        if self._read is not None and not self._read.done():
            self._read.cancel()

    def answer_relayed(self) -> None:
        self.answered += 1
        self._room.set()

    def failure(self) -> Aborted | None:
        task = self._task
        if task.done() and not task.cancelled() and isinstance(task.exception(), Aborted):
            return task.exception()  # type: ignore[return-value]
        return None

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()

    async def _run(self) -> None:
        first = True
        try:
            while (item := await self._next(first)) is not None:
                first = False
                await self.rpc.write(item)
                self.sent += 1
            await self.rpc.done_writing()
        except Aborted:
            self.rpc.cancel()
            raise
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the primary ended the call: its status comes with the responses

    async def _next(self, first: bool) -> bytes | None:
        """The client's next item; None at its end, or once the server drains."""
        while self.sent - self.answered >= _UNANSWERED and not self._waking:
            self._room.clear()
            await self._room.wait()
        if self._waking:
            self.drained = True
            return None
        self._read = asyncio.ensure_future(self.call.read_bytes(
            first, bounded=first or self.answered >= self.sent))
        try:
            item = await self._read
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._waking and current is not None and not current.cancelling():
                self.drained = True
                return None
            raise
        return None if isinstance(item, End) else item


def _relay_trailing(context: Any, metadata: Any) -> None:
    """The primary's trailing metadata after ours (the request id is already ours)."""
    theirs = tuple((key, value) for key, value in metadata or () if key != REQUEST_ID_KEY)
    if theirs:
        context.set_trailing_metadata(tuple(context.trailing_metadata() or ()) + theirs)


def _local_or_relayed(behaviour: Callable[..., Any], primary: Primary,
                      serving: Callable[[], bool]) -> Callable[[Call], Any]:
    """A Check: answered here unless its read is audited or the store is not open here."""
    async def answer(call: Call) -> Any:
        request = await call.request_bytes()
        if audited(current_caller()) or not serving():
            return await relay(call, primary, request)
        try:
            return await call.run(behaviour, call.decoded(request), call.sync)
        except NotServedHere:  # released for a compaction meanwhile
            return await relay(call, primary, request)

    return answer


def _local_stream_or_relayed(servicer: Any, primary: Primary, serving: Callable[[], bool]
                             ) -> Callable[[Call], Any]:
    """A CheckStream: answered here item by item unless its reads are audited or the store is
    not open here when it starts (then relayed whole); an item the store cannot answer
    meanwhile (released for a compaction) goes to the primary as a Check."""
    async def answer(call: Call) -> None:
        if audited(current_caller()) or not serving():
            await relay(call, primary)
            return
        elsewhere = _ChecksOnPrimary(primary, call, asyncio.get_running_loop(), serving)
        feed = call.feed()
        await call.stream(await call.run(servicer.checks, feed, call.sync, elsewhere), feed)

    return answer


class _ChecksOnPrimary:
    """A replica's stream items its store cannot answer, each sent to the primary as a Check
    of its own, from the worker that steps the stream (servicer `checks`)."""

    def __init__(self, primary: Primary, call: Call, loop: asyncio.AbstractEventLoop,
                 serving: Callable[[], bool]) -> None:
        self.primary = primary
        self.call = call
        self.loop = loop
        self.serving = serving

    def __call__(self, request: pb.CheckRequest) -> pb.CheckResponse:
        check = self.primary.callable(self.call.method.containing_service.methods_by_name["Check"])
        metadata = self.primary.metadata(self.call.sync)  # here: the call's caller, request id
        remaining = self.call.sync.time_remaining()
        # Bounded even for a stream without a deadline: the worker waits for the answer.
        timeout = _FALLBACK_S if remaining is None else min(remaining, _FALLBACK_S)

        async def relayed() -> bytes:
            answer: bytes = await check(request.SerializeToString(), metadata=metadata,
                                        timeout=timeout)
            return answer

        future = None
        try:
            future = asyncio.run_coroutine_threadsafe(relayed(), self.loop)
            return pb.CheckResponse.FromString(future.result(timeout + 1.0))
        except grpc.aio.AioRpcError as error:
            return _item_failure(error.code(), error.details() or "")
        except Exception:  # the loop stopping, a timeout: this item fails, the stream goes on
            log.warning("CheckStream item not answered by the primary", exc_info=True)
            if future is not None:
                future.cancel()
            return _item_failure(grpc.StatusCode.UNAVAILABLE,
                                 "CheckStream: this item could not be checked now; send it "
                                 "again")


def _item_failure(code: grpc.StatusCode, message: str) -> pb.CheckResponse:
    return pb.CheckResponse(error=pb.StreamError(code=code.name, message=message))


def _handler(method: MethodDescriptor, answer: Callable[[Call], Any],
             gate: Gate) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)

    async def handle(requests: Any, context: Any) -> Any:
        return await gate.serve(method, context, request_class, answer)

    if method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=_passthrough)
    return grpc.stream_unary_rpc_method_handler(handle, response_serializer=_passthrough)


def add_replica_service(server: grpc.aio.Server, service: ServiceDescriptor,
                        servicer: object, gate: Gate, primary: Primary,
                        serving: Callable[[], bool]) -> None:
    """Every method of `service`: admitted here, then relayed to the primary, or (the
    methods of LOCAL_METHODS and LOCAL_STREAMS) answered by `servicer` while `serving()`."""
    handlers = {}
    for method in service.methods:
        path = f"{service.full_name}/{method.name}"
        if path in LOCAL_METHODS:
            answer = _local_or_relayed(_unwrapped(servicer, method.name), primary, serving)
        elif path in LOCAL_STREAMS:
            answer = _local_stream_or_relayed(servicer, primary, serving)
        else:
            answer = _relayed(primary)
        handlers[method.name] = _handler(method, answer, gate)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _unwrapped(servicer: object, name: str) -> Callable[..., Any]:
    """The servicer method without its @rpc wrapper, so that NotServedHere reaches
    `_local_or_relayed`; Gate.serve turns every other error into the same status."""
    return functools.partial(inspect.unwrap(getattr(type(servicer), name)), servicer)


def _relayed(primary: Primary) -> Callable[[Call], Any]:
    async def answer(call: Call) -> Any:
        return await relay(call, primary)

    return answer
