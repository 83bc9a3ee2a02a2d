"""One call from its start to its status, on the event loop: observed (request id, access log,
metrics), admitted before any request byte is read (api/admission.py), its requests read
within time bounds and decoded, its servicer work run on the worker pool (api/bridge.py),
and whatever ends it turned into a status."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message

from dedup.api.admission import Admission
from dedup.api.auth import CALLER
from dedup.api.bridge import END, CallWork, End, RequestFeed
from dedup.api.metrics import Metrics
from dedup.api.observe import CallObserver
from dedup.api.status import details, status_of
from dedup.api.sync_context import Aborted, SyncContext
from dedup.core.errors import DedupError

log = logging.getLogger("dedup.server")

_T = TypeVar("_T")


class Wakeable(Protocol):
    """A request stream's reader, waiting for the client's next item until woken."""

    def wake(self) -> None: ...


_W = TypeVar("_W", bound=Wakeable)


@dataclass(frozen=True)
class Waits:
    """How long a call may wait for its client."""

    request_s: float  # for the (first) request message, from the call's start
    idle_s: float  # for each next item of a request stream


class Gate:
    """What every dedup call of one server passes through."""

    def __init__(self, observer: CallObserver, admission: Admission, pool: Executor,
                 waits: Waits) -> None:
        self.observer = observer
        self.admission = admission
        self.pool = pool
        self.waits = waits
        self.draining = False  # read and set on the event loop only
        self._streams: weakref.WeakSet[Wakeable] = weakref.WeakSet()

    def drain_after(self, seconds: float) -> None:
        """On the loop, as the server stops: `seconds` on, every request stream takes no
        next item (Call.stream ends it UNAVAILABLE), so what is left of the grace period
        goes to the work already taken rather than to items that keep coming."""
        asyncio.get_running_loop().call_later(seconds, self._drain)

    def _drain(self) -> None:
        self.draining = True
        for stream in list(self._streams):
            stream.wake()

    def follow(self, stream: _W) -> _W:
        """Has `stream` woken when the server drains (at once if it already does)."""
        self._streams.add(stream)
        if self.draining:
            stream.wake()
        return stream

    @property
    def metrics(self) -> Metrics:
        return self.admission.metrics

    async def serve(self, method: MethodDescriptor, context: Any,
                    request_class: type[Message],
                    body: Callable[[Call], Awaitable[_T]]) -> _T:
        """Runs `body` for an admitted call (CALLER set); whatever ends the call becomes its
        status, counted and logged before it is sent."""
        with self.observer.call(method.name, context) as observed:
            # A call a replica relayed is counted there, where its client called.
            observed.counted = not self.admission.authorizer.relayed(context)
            try:
                caller = self.admission.admit(method, context)
            except DedupError as error:
                await observed.abort(status_of(error), details(error))
            CALLER.set(caller)
            call = Call(self, method, context, request_class)
            try:
                return await body(call)
            except Aborted as aborted:
                await observed.abort(aborted.code, aborted.details)
            except DedupError as error:
                await observed.abort(status_of(error), details(error))
            except Exception:
                log.exception("%s failed", method.name)
                await observed.abort(grpc.StatusCode.INTERNAL, f"{method.name}: internal error")
            finally:
                call.work.when_idle(lambda: self.admission.release(caller))


class Call:
    """One admitted call: its requests, its work on the pool and its responses."""

    def __init__(self, gate: Gate, method: MethodDescriptor, context: Any,
                 request_class: type[Message]) -> None:
        self.gate = gate
        self.method = method
        self.context = context
        self.request_class = request_class
        self.sync = SyncContext(context)
        self.work = CallWork(gate.pool)  # after CALLER was set: the work sees it

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        return await self.work.run(function, *args)

    async def request(self) -> Message:
        """The call's one request message."""
        return self.decoded(await self.request_bytes())

    async def request_bytes(self) -> bytes:
        """The call's one request, as its bytes."""
        raw = await self.read_bytes(first=True)
        if isinstance(raw, End):
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request: the call ended without a {self._type_name} message")
        return raw

    async def read(self, first: bool) -> Message | End:
        """The next request message, or END; DEADLINE_EXCEEDED when the client sends
        nothing in time (request_read_timeout_s for the first, stream_idle_timeout_s for
        each next), INVALID_ARGUMENT when it is not a message of the method's type."""
        raw = await self.read_bytes(first)
        return END if isinstance(raw, End) else self.decoded(raw)

    async def read_bytes(self, first: bool, bounded: bool = True) -> bytes | End:
        """The next request as its bytes, or END, within the same time bounds as `read`
        (none when not `bounded`: someone else keeps them)."""
        waits = self.gate.waits
        seconds = waits.request_s if first else waits.idle_s
        try:
            # asyncio.timeout, not wait_for: wait_for runs the read as a task of its own,
            # which costs every call two more turns of the event loop
            async with asyncio.timeout(seconds if bounded else None):
                raw = await self.context.read()
        except TimeoutError:
            raise self.timed_out(first) from None
        return END if raw is grpc.aio.EOF else bytes(raw)

    def timed_out(self, first: bool) -> Aborted:
        """DEADLINE_EXCEEDED for a client that sent no (next) request in time, counted."""
        waits = self.gate.waits
        seconds = waits.request_s if first else waits.idle_s
        reason, setting, what = (("request_timeout", "request_read_timeout_s", "request")
                                 if first else
                                 ("stream_idle", "stream_idle_timeout_s", "next request"))
        self.gate.metrics.calls_refused.labels(reason).inc()
        return Aborted(grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"{self.method.name}: no {what} within {seconds:g} s of "
                       f"{'the call' if first else 'the last'} ({setting})")

    @property
    def _type_name(self) -> str:
        return self.request_class.DESCRIPTOR.full_name

    def decoded(self, data: bytes) -> Message:
        """grpcio would answer bytes its deserializer cannot parse with INTERNAL, which
        tells the caller nothing and reads as a server fault."""
        try:
            return self.request_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            reason = str(error) or type(error).__name__
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request: not a valid {self._type_name} message ({reason})") \
                from None

    def feed(self) -> RequestFeed:
        """The request stream a client-streaming servicer reads (filled by `stream`)."""
        waits = self.gate.waits
        return self.gate.follow(RequestFeed(asyncio.get_running_loop(),
                                            (waits.request_s, waits.idle_s), self.timed_out))

    async def stream(self, responses: Iterator[Message], feed: RequestFeed | None) -> None:
        """Writes the servicer's responses, stepping its generator on the pool one item at a
        time. With a request stream (one response per request), reads its requests ahead
        meanwhile; once every request taken is answered, the servicer is stepped only when
        the next has arrived, within the time bounds."""
        finished = False
        reader = None if feed is None else asyncio.create_task(self._read_ahead(feed))
        written = 0
        try:
            while True:
                if feed is not None and written >= feed.taken:
                    # the servicer takes a request next (an EnrollStream's step answers a
                    # batch already stored: never refused halfway)
                    await self._next_request(feed)
                    if self.gate.draining and not feed.ended:  # an ended one is answered
                        raise self.shutting_down(written)
                    self._refuse_if_expired()
                response = await self.work.step(responses)
                if isinstance(response, End):
                    finished = True
                    return
                await self.write(response)
                written += 1
        finally:
            if reader is not None and feed is not None:
                reader.cancel()
                feed.close()
            if not finished:
                self.work.close(responses)

    async def write(self, response: Message | bytes) -> None:
        """Sends one response of a response stream. A client that reads none for
        stream_idle_timeout_s ends the call: its flow control would otherwise hold the call,
        its slot and its read-ahead for as long as it pleased."""
        seconds = self.gate.waits.idle_s
        try:
            async with asyncio.timeout(seconds):
                await self.context.write(response)
        except TimeoutError:
            self.gate.metrics.calls_refused.labels("stream_unread").inc()
            raise Aborted(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"{self.method.name}: the client read no response within "
                          f"{seconds:g} s (stream_idle_timeout_s)") from None

    def shutting_down(self, answered: int) -> Aborted:
        """UNAVAILABLE for a request stream the server's stop ends, between two items."""
        self.gate.metrics.calls_refused.labels("shutting_down").inc()
        return Aborted(grpc.StatusCode.UNAVAILABLE,
                       f"{self.method.name}: the server is shutting down; the stream ends "
                       f"after {answered} answered {'request' if answered == 1 else 'requests'}"
                       ": send the rest on a new call")

    def _refuse_if_expired(self) -> None:
        """A request stream's items are answered only while its caller's credential holds: a
        token that expires mid-stream ends the stream, as it would refuse a new call."""
        caller = CALLER.get()
        if caller is None or caller.expires is None or caller.expires > datetime.now(UTC):
            return
        self.gate.metrics.calls_refused.labels("unauthenticated").inc()
        raise Aborted(grpc.StatusCode.UNAUTHENTICATED,
                      f"{self.method.name}: the credential of {caller.identity} expired at "
                      f"{caller.expires.isoformat()}; the stream ends")

    async def _next_request(self, feed: RequestFeed) -> None:
        first = feed.taken == 0
        waits = self.gate.waits
        try:
            async with asyncio.timeout(waits.request_s if first else waits.idle_s):
                await feed.arrival()
        except TimeoutError:
            raise self.timed_out(first) from None

    async def _read_ahead(self, feed: RequestFeed) -> None:
        """Reads the request stream into `feed` within its budget. The time bounds apply
        while every request read is answered (`_next_request`): a client waiting for an
        answer before it sends its next request is not idle."""
        try:
            while not feed.ended:
                await feed.wait_for_room()
                raw = await self.context.read()
                feed.put(END if raw is grpc.aio.EOF else self.decoded(bytes(raw)))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # the servicer raises it where it reads
            feed.fail(error)
