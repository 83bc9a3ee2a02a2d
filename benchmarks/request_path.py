"""Where a Check's server CPU goes, layer by layer, on a gallery of benchmarks/scale.py.

Against `dedup serve` on the gallery, each call from `--clients` threads in a load process of
their own (requests serialised before the clock), the server's CPU milliseconds a call for:
  - grpc.health.v1.Health/Check: grpc.aio's own floor for a unary call (no dedup code);
  - FaceDedup/Stats: dedup's call path (request id, access log, metrics, admission, the
    worker pool) around a small servicer (four LMDB reads and the calibration file);
  - FaceDedup/Check: the whole check;
  - FaceDedup/CheckStream: the same checks, each client sending its checks one after another
    on one stream of its own, waiting for each answer before it sends the next (a desk's
    terminal pool on one call).
Then, the server stopped, in this process over the same data directory, one check after
another from one thread:
  - DedupService.check: the verdict without gRPC (the micro-batcher's thread included);
  - the served index searched alone (as scale.py's raw FAISS).
The server's rounds alternate the four calls, every other round in the reverse order (health
and Stats 5 times as many, so that the 10 ms ticks of /proc's CPU counts stay small against
them); user and system CPU apart; each
figure is the median of --rounds. The clients' connection set-up is inside the window.
Imports the gallery first when scale.py has not (same work directory). Prints a table and
writes benchmarks/results/request_path-<registrations>-<variant>.json.

    .venv/bin/python benchmarks/request_path.py --registrations 1000000 --variant clustered
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import grpc
import numpy as np
from gallery_data import VARIANTS
from harness import CHECK_METHOD, CHECK_STREAM_METHOD, LockStepStream, own_channel, run_threads
from scale import RESULTS, Server, check_requests, imported_gallery, raw_faiss_of_served
from tqdm import tqdm

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core.records import Probe
from dedup.core.settings import ServerConfig, StoreConfig
from dedup.server import create_server

HEALTH = "/grpc.health.v1.Health/Check"
STATS = "/dedup.v1.FaceDedup/Stats"


def _calls_in_child(target: str, method: str, payloads: list[bytes], clients: int
                    ) -> dict[str, float]:
    streams: list[LockStepStream] = []

    def worker():  # type: ignore[no-untyped-def]
        channel = own_channel(target)
        grpc.channel_ready_future(channel).result(timeout=30)
        if method != CHECK_STREAM_METHOD:
            call = channel.unary_unary(method)  # bytes in, bytes out
            return lambda n: call(payloads[n])
        stream = LockStepStream(channel)
        streams.append(stream)
        return lambda n: stream.check(payloads[n])

    try:
        stats, results = run_threads(len(payloads), clients, worker)
    finally:
        for stream in streams:
            stream.end()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{method}: {len(errors)} calls failed, the first: {errors[0]!r}")
    return stats


def user_and_system_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def server_cpu_ms(server: Server, pool: multiprocessing.pool.Pool, method: str,
                  payloads: list[bytes], clients: int) -> dict[str, float]:
    """Calls/s and the server's CPU milliseconds a call (all, user, system), for
    `payloads` sent to `method`."""
    user, system = user_and_system_seconds(server.process.pid)
    stats = pool.apply(_calls_in_child, (f"127.0.0.1:{server.port}", method, payloads,
                                         clients))
    user_after, system_after = user_and_system_seconds(server.process.pid)
    per_call = 1000 / len(payloads)
    return {"calls_per_s": stats["qps"],
            "server_cpu_ms": (user_after - user + system_after - system) * per_call,
            "user_ms": (user_after - user) * per_call,
            "system_ms": (system_after - system) * per_call}


def served(data_dir: Path, requests: list[pb.CheckRequest], clients: int, rounds: int
           ) -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    calls = {"health": (HEALTH, [b""] * (5 * len(requests))),
             "stats": (STATS, [pb.StatsRequest().SerializeToString()] * (5 * len(requests))),
             "check": (CHECK_METHOD, [r.SerializeToString() for r in requests]),
             "check_stream": (CHECK_STREAM_METHOD, [r.SerializeToString() for r in requests])}
    server = Server(data_dir)
    try:
        server.first_answer_seconds(requests[0])
        server.wait_for_type(None)  # not during a rebuild to the type auto wants
        info = server.index_info()
        row: dict[str, object] = {"index": info.index_type, "rerank": info.rerank_candidates,
                                  "search_parameters": info.search_parameters}
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            server_cpu_ms(server, pool, CHECK_METHOD, calls["check"][1][:300], clients)  # warm-up
            for round_number in tqdm(range(rounds), desc="served rounds"):
                # every other round in the reverse order: no call always runs after another
                order = list(calls.items())[::-1 if round_number % 2 else 1]
                for name, (method, payloads) in order:
                    measured[name].append(server_cpu_ms(server, pool, method, payloads,
                                                        clients))
    finally:
        server.stop()
    return {name: _medians(runs) for name, runs in measured.items()}, row


def in_process(data_dir: Path, probes: np.ndarray, claimed: list[str], rounds: int
               ) -> dict[str, float]:
    """DedupService.check one probe after another on this thread: CPU ms a check (the
    whole process's, so the search thread's included)."""
    server, _ = create_server(ServerConfig(store=StoreConfig(data_dir=data_dir)),
                              "127.0.0.1:0")
    try:
        service = server.service
        vectors = [Probe(np.ascontiguousarray(p, np.float32)) for p in probes]
        for i in range(min(200, len(vectors))):  # warm-up
            service.check(vectors[i], claimed[i], 100)
        per_round = []
        for _ in range(rounds):
            started = time.process_time()
            for vector, claim in zip(vectors, claimed, strict=True):
                service.check(vector, claim, 100)
            per_round.append((time.process_time() - started) * 1000 / len(vectors))
        return {"cpu_ms_per_check": statistics.median(per_round)}
    finally:
        server.stop(0)


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(result: dict[str, object]) -> None:
    served_calls: dict[str, dict[str, float]] = result["served"]  # type: ignore[assignment]
    print(f"\n{result['registrations']:,} registrations, {result['variant']}, "
          f"{result['index']} ({result['search_parameters']}), {result['clients']} clients, "
          f"medians of {result['rounds']} rounds")
    print(f"{'what':<44}{'calls/s':>10}{'server CPU ms a call':>24}{'user / system':>18}")
    for name, label in (("health", "gRPC health check (grpc.aio's floor)"),
                        ("stats", "FaceDedup.Stats (call path, small servicer)"),
                        ("check", "FaceDedup.Check (all of it)"),
                        ("check_stream", "FaceDedup.CheckStream (a stream a client)")):
        row = served_calls[name]
        print(f"{label:<44}{row['calls_per_s']:>10.1f}{row['server_cpu_ms']:>24.3f}"
              f"{row['user_ms']:>10.3f} / {row['system_ms']:.3f}")
    print(f"{'DedupService.check in process, 1 caller':<44}{'':>10}"
          f"{result['in_process']['cpu_ms_per_check']:>24.3f}")  # type: ignore[index]
    print(f"{'the index search alone (raw FAISS)':<44}{'':>10}"
          f"{result['raw_faiss']['cpu_ms_per_query']:>24.3f}")  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="clustered")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--probes", type=int, default=1000,
                        help="checks a round (fresh captures of enrolled persons)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    name = f"{args.registrations}-{args.variant}"
    gallery, data_dir, _ = imported_gallery(args.workdir, args.registrations, args.variant,
                                            args.probes)
    requests = check_requests(gallery.probes, gallery.probe_ids)
    calls, row = served(data_dir, requests, args.clients, args.rounds)
    result: dict[str, object] = {"registrations": args.registrations, "variant": args.variant,
                                 "clients": args.clients, "rounds": args.rounds, **row,
                                 "served": calls}
    result["in_process"] = in_process(data_dir, gallery.probes, gallery.probe_ids,
                                      args.rounds)
    result["raw_faiss"] = raw_faiss_of_served(data_dir, gallery.probes, row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"request_path-{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
