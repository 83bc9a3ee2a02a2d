"""Load test: N concurrent clients on loopback with a registration desk's mix of calls.

90% Check (a fresh capture of an enrolled person, claiming that person's ID number),
9% Enroll with check_first (a new person), 1% Delete (a registration this client enrolled),
for a bounded time against a `dedup serve` process on a large gallery. Clients run in
several processes (one Python process cannot drive the server to saturation). Prints
throughput, p50/p95/p99/max latency per call type and the error count per status; writes
JSON to benchmarks/results/load-<N>-<variant>.json. Zero errors is the requirement.

    .venv/bin/python benchmarks/load.py --registrations 1000000 --clients 16 --seconds 60

The gallery is generated and imported the first time (as in scale.py) under --workdir;
a run changes it a little (its enrolments and deletes stay).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import VARIANTS, captures_of
from harness import connected_stub
from scale import RESULTS, Server, imported_gallery

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc


def face(vector: np.ndarray) -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=vector.tolist()))


class Client:
    """One simulated registration desk: its own channel, its own enrolments."""

    def __init__(self, port: int, name: str, people: np.ndarray, id_numbers: list[str],
                 seed: int) -> None:
        self.stub = connected_stub(port)
        self.name = name
        self.people, self.id_numbers = people, id_numbers
        self.rng = np.random.default_rng(seed)
        self.choice = random.Random(seed)
        self.enrolled: list[str] = []
        self.serial = 0

    def one_call(self) -> str:
        draw = self.choice.random()
        if draw < 0.01 and self.enrolled:
            registration_id = self.enrolled.pop(self.choice.randrange(len(self.enrolled)))
            self.stub.Delete(pb.DeleteRequest(registration_id=registration_id), timeout=30)
            return "Delete"
        if draw < 0.10:
            self.serial += 1
            registration_id = f"load-{self.name}-{self.serial}"
            person = self.rng.standard_normal(512).astype(np.float32)
            person /= np.linalg.norm(person)
            response = self.stub.Enroll(pb.EnrollRequest(
                registration=pb.Registration(registration_id=registration_id,
                                             id_number=f"LD{self.name}{self.serial:08d}"),
                face=face(person), check_first=True), timeout=30)
            if response.enrolled:
                self.enrolled.append(registration_id)
            return "Enroll"
        row = self.choice.randrange(len(self.people))
        probe = captures_of(self.rng, self.people[row:row + 1])[0]
        self.stub.Check(pb.CheckRequest(face=face(probe), claimed_id_number=self.id_numbers[row]),
                        timeout=30)
        return "Check"


def client_process(port: int, process: int, threads: int, gallery_file: str,
                   id_numbers: list[str], rows: list[int], warmup: float, seconds: float,
                   out: Any) -> None:
    people = np.load(gallery_file, mmap_mode="r")[rows]
    samples: list[tuple[str, float, float]] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    clients = [Client(port, f"{os.getpid()}x{t}", people, id_numbers, 1000 * process + t)
               for t in range(threads)]
    start = time.monotonic() + 0.5
    measure_from, stop_at = start + warmup, start + warmup + seconds

    def run(client: Client) -> None:
        mine: list[tuple[str, float, float]] = []
        failed: Counter[str] = Counter()
        time.sleep(max(0.0, start - time.monotonic()))
        while (began := time.monotonic()) < stop_at:
            try:
                kind = client.one_call()
            except grpc.RpcError as error:
                if began >= measure_from:
                    failed[error.code().name] += 1
                continue
            if began >= measure_from:
                mine.append((kind, began, time.monotonic() - began))
        with lock:
            samples.extend(mine)
            errors.update(failed)

    pool = [threading.Thread(target=run, args=(client,)) for client in clients]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.put((samples, dict(errors)))


def percentiles(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"calls": 0}

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000

    return {"calls": len(ordered), "per_second": len(ordered) / seconds,
            "p50_ms": statistics.median(ordered) * 1000, "p95_ms": at(0.95),
            "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000}


def beside_checkpoints(samples: list[tuple[str, float, float]],
                       checkpoints: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Latencies per call type, split by whether the call overlapped an index checkpoint
    (from the taking of its snapshot to the end of its write, as the server logged it)."""
    windows = [(c["ended"] - c["held_s"] - c["written_s"], c["ended"]) for c in checkpoints]
    split: dict[str, dict[str, float]] = {}
    for kind in ("Check", "Enroll"):
        overlapping, apart = [], []
        for _, began, seconds in (s for s in samples if s[0] == kind):
            hit = any(began < end and began + seconds > start for start, end in windows)
            (overlapping if hit else apart).append(seconds)
        for name, latencies in (("during", overlapping), ("apart", apart)):
            row = percentiles(latencies, 1.0)
            split[f"{kind} {name}"] = {k: v for k, v in row.items() if k != "per_second"}
    return split


def print_beside_checkpoints(split: dict[str, dict[str, float]],
                             checkpoints: list[dict[str, float]]) -> None:
    if not checkpoints:
        print("no index checkpoint during the run")
        return
    held = max(c["held_s"] for c in checkpoints)
    written = max(c["written_s"] for c in checkpoints)
    print(f"{len(checkpoints)} index checkpoints (at most {held:.2f} s holding writes, "
          f"{written:.2f} s writing); calls overlapping one and the rest:")
    for name, row in split.items():
        if row["calls"]:
            print(f"  {name:<16}{row['calls']:>7} calls  p50 {row['p50_ms']:8.1f} ms  "
                  f"p99 {row['p99_ms']:8.1f} ms  max {row['max_ms']:8.1f} ms")


def probe_people(files: list[Path], count: int, seed: int) -> tuple[str, list[int], list[str]]:
    """Rows of the first chunk (enrolled captures) with their ID numbers, to probe with."""
    with open(files[0].with_suffix(".csv"), newline="") as handle:
        id_numbers = [row["id_number"] for row in csv.DictReader(handle)]
    rows = sorted(random.Random(seed).sample(range(len(id_numbers)), count))
    return str(files[0]), rows, [id_numbers[row] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--variant", choices=VARIANTS, default="iso",
                        help="the data variant (see benchmarks/gallery_data.py)")
    parser.add_argument("--index-factory", default="BinarySign512",
                        help="the index type served (another one is rebuilt first); auto: "
                             "what the server's defaults pick, with their search parameters")
    args = parser.parse_args()

    # scale.py's probe count: a gallery it generated is reused, not generated again
    gallery, data_dir, _ = imported_gallery(args.workdir, args.registrations, args.variant,
                                            probes=1000)
    gallery_file, rows, id_numbers = probe_people(gallery.files, 20_000, seed=3)

    server = (Server(data_dir) if args.index_factory == "auto"
              else Server(data_dir, args.index_factory, 64))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            before = pb_grpc.FaceDedupStub(channel).Stats(pb.StatsRequest())
        print(f"server on {before.registrations} registrations, {before.index_type} index; "
              f"{args.clients} clients in {args.processes} processes for {args.seconds:.0f} s "
              f"after {args.warmup:.0f} s of warm-up")
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        per_process = [args.clients // args.processes + (p < args.clients % args.processes)
                       for p in range(args.processes)]
        workers = [context.Process(target=client_process, args=(
            server.port, p, threads, gallery_file, id_numbers, rows, args.warmup,
            args.seconds, out)) for p, threads in enumerate(per_process) if threads]
        for worker in workers:
            worker.start()
        samples: list[tuple[str, float, float]] = []
        errors: Counter[str] = Counter()
        for _ in workers:
            got, failed = out.get()
            samples += got
            errors.update(failed)
        for worker in workers:
            worker.join()
        peak_rss = server.peak_rss_gb()
    finally:
        server.stop()

    table = {kind: percentiles([s for k, _, s in samples if k == kind], args.seconds)
             for kind in ("Check", "Enroll", "Delete")}
    table["all"] = percentiles([s for _, _, s in samples], args.seconds)
    print(f"\n{'call':<8}{'calls':>8}{'per s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}")
    for kind, row in table.items():
        if row["calls"]:
            print(f"{kind:<8}{row['calls']:>8}{row['per_second']:>9.1f}{row['p50_ms']:>9.2f}"
                  f"{row['p95_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['max_ms']:>9.1f}")
    print(f"errors by status: {dict(errors) or 'none'}; server peak RSS {peak_rss:.2f} GB")
    during = beside_checkpoints(samples, server.checkpoints)
    print_beside_checkpoints(during, server.checkpoints)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"load-{args.registrations}-{args.variant}.json"
    path.write_text(json.dumps({
        "registrations": before.registrations, "index_type": before.index_type,
        "clients": args.clients, "processes": args.processes, "seconds": args.seconds,
        "mix": {"Check": 0.90, "Enroll(check_first)": 0.09, "Delete": 0.01},
        "results": table, "errors": dict(errors), "server_peak_rss_gb": peak_rss,
        "checkpoints": server.checkpoints, "beside_checkpoints": during,
    }, indent=2))
    print(f"wrote {path}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
