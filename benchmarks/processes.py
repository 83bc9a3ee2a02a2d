"""Checks a second from 1 and from 2 serving processes (dedup serve --processes N).

Side by side in one run, on the same gallery; with `--calls check stream`, single Checks and
each client's checks on one CheckStream side by side on each server.

The gallery is scale.py's (same generator, same work directory: a gallery scale.py imported
is reused, else it is imported here). For each process count the server is started, warmed
up, and measured --repeats times: 8 clients (--clients) in a load process of their own
with pre-serialised requests, each client on a connection of its own. SO_REUSEPORT hashes
connections over the processes; so that a run measures the processes and not the luck of
the hash, each client reconnects until the connections are spread evenly (--no-balance: as
the kernel spreads them). Reported per process count (medians of the repeats): checks/s,
p50, p99, errors, duplicate recall against exact ground truth, and the CPU milliseconds per
check of the server's processes together; then the speed-up of 2 over 1.

    .venv/bin/python benchmarks/processes.py --registrations 1000000 --variant iso
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dedup._proto.dedup.v1 import dedup_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
import scale
from gallery_data import VARIANTS
from harness import CHECK_METHOD, LockStepStream, load_cpu_ms, own_channel, run_threads
from scale import RESULTS, check_requests, ground_truth, recall

_PROCESS_KEY = "x-dedup-process"
_RECONNECTS = 400


class Server(scale.Server):
    """`dedup serve --processes N` on a data directory, on a free loopback port."""

    def __init__(self, data_dir: Path, processes: int) -> None:
        super().__init__(data_dir, options=("--processes", str(processes)))


def _connected_worker(target: str, payloads: list[bytes], quota: int | None,
                      placed: Counter[str], lock: threading.Lock,
                      streams: list[LockStepStream] | None
                      ) -> Callable[[], Callable[[int], bytes]]:
    """Each client on a connection of its own; with `quota`, reconnecting until the process
    it landed on has fewer than `quota` clients. With `streams`, each client then sends its
    checks on one CheckStream on that connection, waiting for each answer (its stream is
    added to `streams`, to be ended after the run)."""
    def worker() -> Callable[[int], bytes]:
        for _ in range(_RECONNECTS):
            channel = own_channel(target)
            call = channel.unary_unary(CHECK_METHOD)
            _, answered = call.with_call(payloads[0], timeout=60)  # connected before the clock
            process = dict(answered.trailing_metadata() or ()).get(_PROCESS_KEY, "primary")
            with lock:
                if quota is None or placed[process] < quota:
                    placed[process] += 1
                    if streams is None:
                        return lambda n: call(payloads[n])
                    stream = LockStepStream(channel)
                    streams.append(stream)
                    return lambda n: stream.check(payloads[n])
            channel.close()
        raise RuntimeError(f"could not spread the clients evenly: {dict(placed)}")
    return worker


def _checks_in_child(target: str, payloads: list[bytes], clients: int, processes: int,
                     balance: bool, stream: bool
                     ) -> tuple[dict[str, float], list[bytes | str | None], dict[str, int]]:
    placed: Counter[str] = Counter()
    quota = math.ceil(clients / processes) if balance else None
    streams: list[LockStepStream] | None = [] if stream else None
    started_cpu = time.process_time()
    try:
        stats, results = run_threads(len(payloads), clients, _connected_worker(
            target, payloads, quota, placed, threading.Lock(), streams))
    finally:
        for opened in streams or []:
            opened.end()
    stats["load_cpu_ms_per_check"] = load_cpu_ms(started_cpu, len(payloads))
    return (stats, [r if isinstance(r, bytes) or r is None else repr(r) for r in results],
            dict(placed))


def measure(server: Server, requests: list[pb.CheckRequest], clients: int, processes: int,
            balance: bool, stream: bool = False
            ) -> tuple[dict[str, float], list[pb.CheckResponse | None], dict[str, int]]:
    payloads = [request.SerializeToString() for request in requests]
    cpu_before = server.cpu_seconds()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        stats, raw, placed = pool.apply(_checks_in_child, (
            f"127.0.0.1:{server.port}", payloads, clients, processes, balance, stream))
    stats["server_cpu_ms_per_check"] = (server.cpu_seconds() - cpu_before) * 1000 / len(
        requests)
    responses = [pb.CheckResponse.FromString(item) if isinstance(item, bytes) else None
                 for item in raw]
    return stats, responses, placed


def serve_and_measure(data_dir: Path, requests: list[pb.CheckRequest], truth: list[dict[str, str]],
                      processes: int, clients: int, repeats: int, balance: bool,
                      calls: list[str]) -> list[dict[str, object]]:
    """One row per kind of call ("check": single Checks, "stream": one CheckStream a
    client), measured on one server, the kinds alternating (every other repeat reversed)."""
    server = Server(data_dir, processes)
    runs: dict[str, list[dict[str, object]]] = {kind: [] for kind in calls}
    try:
        for kind in calls:
            measure(server, requests[:200], clients, processes, balance, kind == "stream")
        for repeat in range(repeats):
            for kind in calls[::-1] if repeat % 2 else calls:
                stats, responses, placed = measure(server, requests, clients, processes,
                                                   balance, kind == "stream")
                stats["recall"] = recall(responses, truth)
                runs[kind].append({**stats, "clients_per_process": placed})
                print(processes, "process(es),", kind, json.dumps(runs[kind][-1]), flush=True)
    finally:
        server.stop()
    return [_row(processes, kind, kind_runs) for kind, kind_runs in runs.items()]


def _row(processes: int, kind: str, runs: list[dict[str, object]]) -> dict[str, object]:
    numbers = [key for key, value in runs[0].items() if isinstance(value, (int, float))]
    return {"processes": processes, "calls": kind, "runs": runs,
            "median": {key: statistics.median(float(run[key]) for run in runs)  # type: ignore[arg-type]
                       for key in numbers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="iso")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--probes", type=int, default=1000,
                        help="as scale.py's (its generated gallery is reused)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each run sends every probe this many times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-balance", action="store_true",
                        help="leave the clients' connections where the kernel puts them")
    parser.add_argument("--calls", nargs="+", choices=("check", "stream"), default=["check"],
                        help="single Checks, and/or each client's checks on one CheckStream "
                             "(waiting for each answer); several: side by side")
    args = parser.parse_args()

    gallery, data_dir, _ = scale.imported_gallery(args.workdir, args.registrations,
                                                  args.variant, args.probes)
    requests = check_requests(gallery.probes, gallery.probe_ids) * args.rounds
    truth = ground_truth(data_dir, gallery.probes) * args.rounds
    rows = [row for processes in args.processes
            for row in serve_and_measure(data_dir, requests, truth, processes, args.clients,
                                         args.repeats, not args.no_balance, args.calls)]
    print(f"\n{args.registrations:,} registrations ({args.variant}), {args.clients} clients, "
          f"{len(requests)} checks a run, medians of {args.repeats}:")
    print(f"{'processes':>9} {'calls':>6} {'checks/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'errors':>6} {'recall':>7} {'cpu ms/check':>12} {'load cpu ms/check':>17}")
    for row in rows:
        median = row["median"]
        assert isinstance(median, dict)
        print(f"{row['processes']:>9} {row['calls']:>6} {median['qps']:>9.0f} "
              f"{median['p50_ms']:>7.1f} {median['p99_ms']:>7.1f} {median['errors']:>6.0f} "
              f"{median['recall']:>7.4f} "
              f"{median['server_cpu_ms_per_check']:>12.2f} "
              f"{median['load_cpu_ms_per_check']:>17.2f}")
    first = rows[0]["median"]
    assert isinstance(first, dict)
    for row in rows[1:]:
        median = row["median"]
        assert isinstance(median, dict)
        print(f"{row['processes']} processes, {row['calls']} / {rows[0]['processes']}, "
              f"{rows[0]['calls']}: {median['qps'] / first['qps']:.2f}x checks/s")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"processes-{args.registrations}-{args.variant}.json"
    out.write_text(json.dumps({"registrations": args.registrations, "variant": args.variant,
                               "clients": args.clients, "balanced": not args.no_balance,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
