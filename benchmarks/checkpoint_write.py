"""What an index checkpoint's write does to the store's durable commits beside it.

A gallery of 10,000,000 on SignIVF checkpoints a 720 MB index within seconds of every
erasure. Meanwhile enrolments commit to LMDB with fsync. This writes a checkpoint of
--megabytes (random bytes, through dedup's own write_checkpoint) while a thread commits
small LMDB transactions (sync on, a 2 KB value each, as an enrolment's record) as fast as it
can, and reports the commit latencies during the write: median, p99 and worst, and the
write's own seconds. Each way of writing runs --rounds times, alternating:

- `one-fsync`: the whole file written, then one fsync (dedup before 2026-12-02);
- `flushed every N MB`: fdatasync after every N MB, the written pages dropped from the page
  cache (dedup since, every FLUSH_EVERY bytes).

    .venv/bin/python benchmarks/checkpoint_write.py --megabytes 720 --rounds 3

Writes benchmarks/results/checkpoint-write.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import lmdb
import numpy as np

from dedup.gallery.embedded.checkpoint import FLUSH_EVERY, Checkpoint, write_checkpoint

RESULTS = Path(__file__).parent / "results"


def commits_during(write: threading.Thread, env: lmdb.Environment) -> list[float]:
    """Seconds of each small durable commit made while `write` runs."""
    latencies, value, key = [], os.urandom(2048), 0
    while write.is_alive():
        started = time.perf_counter()
        with env.begin(write=True) as txn:
            txn.put(key.to_bytes(8, "big"), value)
        latencies.append(time.perf_counter() - started)
        key += 1
    return latencies


def one_round(directory: Path, payload: memoryview, flush_every: int | None
              ) -> dict[str, float]:
    env = lmdb.open(str(directory / "store"), map_size=1 << 30, sync=True, metasync=True)
    checkpoint = Checkpoint(1, 1, "bench", (payload,), kind="bench")
    elapsed: list[float] = []

    def write() -> None:
        started = time.perf_counter()
        write_checkpoint(directory / "index.ckpt", checkpoint, flush_every=flush_every)
        elapsed.append(time.perf_counter() - started)

    try:
        writer = threading.Thread(target=write)
        writer.start()
        latencies = commits_during(writer, env)
        writer.join()
    finally:
        env.close()
    ms = sorted(1e3 * s for s in latencies)
    return {"write_s": elapsed[0], "commits": len(ms), "commit_p50_ms": statistics.median(ms),
            "commit_p99_ms": ms[int(0.99 * (len(ms) - 1))], "commit_max_ms": ms[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=720,
                        help="size of the checkpoint written (720: SignIVF at 10,000,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each way, alternating")
    parser.add_argument("--flush-mb", type=int, nargs="+", default=[FLUSH_EVERY >> 20],
                        help="the flushed ways to measure, by megabytes between flushes")
    args = parser.parse_args()
    ways = {"one-fsync": None, **{f"flushed every {mb} MB": mb << 20 for mb in args.flush_mb}}
    payload = memoryview(np.random.default_rng(0).integers(
        0, 256, args.megabytes << 20, dtype=np.uint8).data)
    rows: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="dedup-ckpt-") as scratch:
        for round_ in range(args.rounds):
            for number, (way, flush_every) in enumerate(ways.items()):
                directory = Path(scratch) / f"{number}-{round_}"
                directory.mkdir()
                row = one_round(directory, payload, flush_every)
                rows[way].append(row)
                print(way, round_, json.dumps({k: round(v, 2) for k, v in row.items()}),
                      flush=True)
    print(f"\n{args.megabytes} MB checkpoint, medians of {args.rounds} rounds")
    print("| write | seconds | commits | commit p50 ms | commit p99 ms | worst commit ms |")
    print("|---|---|---|---|---|---|")
    for way, runs in rows.items():
        med = {field: statistics.median(r[field] for r in runs) for field in runs[0]}
        print(f"| {way} | {med['write_s']:.1f} | {med['commits']:.0f} | "
              f"{med['commit_p50_ms']:.1f} | {med['commit_p99_ms']:.1f} | "
              f"{med['commit_max_ms']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "checkpoint-write.json"
    out.write_text(json.dumps({"megabytes": args.megabytes, "rounds": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
