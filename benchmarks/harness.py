"""The load harness the benchmarks share: N client threads, per-call latencies, percentiles."""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

T = TypeVar("T")


def summarise(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"qps": len(ordered) / elapsed,
            "p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000}


def run_threads(count: int, threads: int, worker: Callable[[], Callable[[int], T]]
                ) -> tuple[dict[str, float], list[T | BaseException | None]]:
    """Items 0..count-1 spread over `threads` threads, each with its own `worker()` callable.

    Returns q/s, p50 and p99 of the calls that succeeded (an exception is kept as the item's
    result and counted under "errors") and every item's result. A thread whose `worker()`
    raises stops the run: RuntimeError, from that error.
    """
    results: list[T | BaseException | None] = [None] * count
    latencies: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)

    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            call = worker()
        except BaseException as error:  # the others, and the caller, must not wait for it
            failures.append(error)
            ready.abort()
            return
        mine = []
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        for n in range(index, count, threads):
            began = time.perf_counter()
            try:
                results[n] = call(n)
            except Exception as error:
                results[n] = error
                continue
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        for thread in pool:
            thread.join()
        raise RuntimeError("a client thread could not start") from failures[0]
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    stats = summarise(latencies, time.perf_counter() - started)
    stats["errors"] = sum(isinstance(r, BaseException) for r in results)
    last_latencies[:] = latencies
    return stats, results


# The latencies of this process's last run_threads (seconds, the calls that succeeded): what
# a pooled percentile over several runs needs.
last_latencies: list[float] = []


def own_channel(target: str) -> grpc.Channel:
    """A channel on a connection of its own, as a separate desk's would be. grpcio otherwise
    shares one connection among every channel of a process to the same target: the
    "clients" of a benchmark were then one HTTP/2 connection, which the kernel cannot spread
    over the processes of `dedup serve --processes N` (they all reached one process)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def connected_stub(port: int) -> pb_grpc.FaceDedupStub:
    """A stub on a channel (and connection) of its own to the server on loopback `port`,
    connected before any clock starts (without a call: Stats on a large Milvus gallery
    takes seconds)."""
    channel = own_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=120)
    return pb_grpc.FaceDedupStub(channel)


def grpc_checks(port: int, requests: list[pb.CheckRequest], clients: int
                ) -> tuple[dict[str, float], list[pb.CheckResponse | BaseException | None]]:
    """`clients` threads, each on its own channel, sending the Check requests."""
    def worker() -> Callable[[int], pb.CheckResponse]:
        stub = connected_stub(port)
        return lambda n: stub.Check(requests[n])

    return run_threads(len(requests), clients, worker)


CHECK_METHOD = "/dedup.v1.FaceDedup/Check"
CHECK_STREAM_METHOD = "/dedup.v1.FaceDedup/CheckStream"


class LockStepStream:
    """One CheckStream on `channel`, its checks sent one at a time, each waiting for its
    answer (as a desk would); `end()` closes it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._responses = channel.stream_stream(CHECK_STREAM_METHOD)(
            iter(self._outbox.get, None), timeout=3600)

    def check(self, payload: bytes) -> bytes:
        """The answer to one serialised CheckRequest (RuntimeError for an item's error)."""
        self._outbox.put(payload)
        answer: bytes = next(self._responses)
        if (response := pb.CheckResponse.FromString(answer)).HasField("error"):
            raise RuntimeError(f"CheckStream item failed: {response.error}")
        return answer

    def end(self) -> None:
        self._outbox.put(None)


def _raw_check_worker(target: str, payloads: list[bytes]) -> Callable[[], Callable[[int], bytes]]:
    def worker() -> Callable[[int], bytes]:
        channel = own_channel(target)
        grpc.channel_ready_future(channel).result(timeout=30)  # connected before the clock
        call = channel.unary_unary(CHECK_METHOD)  # no serialisers: bytes in, bytes out
        return lambda n: call(payloads[n])
    return worker


def _checks_in_child(target: str, payloads: list[bytes], clients: int
                     ) -> tuple[dict[str, float], list[bytes | str | None], list[float]]:
    started_cpu = time.process_time()
    stats, results = run_threads(len(payloads), clients, _raw_check_worker(target, payloads))
    stats["load_cpu_ms_per_check"] = load_cpu_ms(started_cpu, len(payloads))
    return (stats, [r if isinstance(r, bytes) or r is None else repr(r) for r in results],
            list(last_latencies))


def load_cpu_ms(started_cpu: float, checks: int) -> float:
    """The load process's CPU milliseconds a check since `started_cpu` (time.process_time):
    on a machine of 2 cores the clients' share is CPU the server cannot have."""
    return (time.process_time() - started_cpu) * 1000 / checks


def process_checks(port: int, requests: list[pb.CheckRequest], clients: int
                   ) -> tuple[dict[str, float], list[pb.CheckResponse | BaseException | None]]:
    """Like grpc_checks, but the load runs in a process of its own with requests serialised
    before the clock starts, so that the client's Python costs neither the server's GIL nor
    the measurement's serialisation time."""
    import multiprocessing

    payloads = [request.SerializeToString() for request in requests]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        stats, raw, latencies = pool.apply(_checks_in_child,
                                           (f"127.0.0.1:{port}", payloads, clients))
    last_latencies[:] = latencies
    responses: list[pb.CheckResponse | BaseException | None] = []
    for item in raw:
        if isinstance(item, bytes):
            responses.append(pb.CheckResponse.FromString(item))
        else:
            responses.append(None if item is None else RuntimeError(item))
    return stats, responses


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    import os
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_page_cache() -> bool:
    """Empties the page cache (/proc/sys/vm/drop_caches, root only); whether it was emptied."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def timed_ms(work: Callable[[], object]) -> float:
    """Milliseconds `work()` took."""
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000
