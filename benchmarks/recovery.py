"""A lost index checkpoint at scale: how soon the server answers, how well meanwhile, and how
soon it serves the index type it wants again.

On a gallery of benchmarks/scale.py's layout (imported by it), the page cache dropped before
each start when run as root (as after the machine restarted):
  1. `dedup serve` with its checkpoint intact: seconds to the first answered Check;
  2. the checkpoint damaged (`--damage truncated`: cut to half its size, as a failing disk or
     a torn copy leaves it; `missing`: deleted): seconds to the first answered Check, and the
     index type served then;
  3. from then until the server serves the type it wants, windows of 200 checks at 8 clients
     (a load process of its own): checks/s, p99, duplicate recall of the window's probes
     against exact search, and the type served; one window more once it serves it.
The server writes a new checkpoint, so the data directory is whole again afterwards.
Prints a table and writes benchmarks/results/recovery-<N>-<variant>-<damage>.json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/recovery.py --registrations 10000000 \\
        --variant clustered
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dedup.gallery.embedded.layout import CHECKPOINT_FILE

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import VARIANTS
from harness import drop_page_cache
from scale import RESULTS, Server, check_requests, checks, ground_truth, imported_gallery, recall

WINDOW = 200


def damage(checkpoint: Path, how: str) -> None:
    if how == "missing":
        checkpoint.unlink()
    else:
        os.truncate(checkpoint, checkpoint.stat().st_size // 2)


def first_answer(server: Server, request: object) -> dict[str, object]:
    seconds = server.first_answer_seconds(request)  # type: ignore[arg-type]
    info = server.index_info()
    return {"first_answer_s": round(seconds, 1), "type_then": info.index_type,
            "wanted_type": info.wanted_index_type} | memory(server)


def memory(server: Server) -> dict[str, float]:
    """The server's resident memory, and of it what it holds itself (anonymous): the rest
    is page cache it maps, mostly the vector file's."""
    return {"rss_gb": round(server.rss_gb(), 2), "anon_gb": round(server.anon_gb(), 2)}


def window(server: Server, requests: list, truth: list, number: int) -> dict[str, object]:
    """One window of checks at 8 clients, its probes taken in turn from the probe set."""
    start = number * WINDOW % len(requests)
    part = slice(start, start + WINDOW)
    served = server.index_info().index_type
    stats, responses = checks(server, requests[part], 8)
    return {"ended_s": round(time.monotonic() - server.started, 1), "type": served,
            "qps": round(stats["qps"], 1), "p99_ms": round(stats["p99_ms"], 1),
            "errors": stats["errors"], "recall": round(recall(responses, truth[part]), 4)
            } | memory(server)


def until_wanted(server: Server, requests: list, truth: list) -> list[dict[str, object]]:
    windows: list[dict[str, object]] = []
    while True:
        windows.append(window(server, requests, truth, len(windows)))
        print(json.dumps(windows[-1]), flush=True)
        info = server.index_info()
        if windows[-1]["type"] == info.wanted_index_type:
            return windows
        if server.process.poll() is not None:
            raise RuntimeError("the server exited")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="clustered")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--damage", choices=("truncated", "missing"), default="truncated")
    args = parser.parse_args()
    gallery, data_dir, _ = imported_gallery(args.workdir, args.registrations, args.variant,
                                            1000)
    requests = check_requests(gallery.probes, gallery.probe_ids)
    truth = ground_truth(data_dir, gallery.probes)
    result: dict[str, object] = {"registrations": args.registrations,
                                 "variant": args.variant, "damage": args.damage}

    result["cache_dropped"] = drop_page_cache()
    server = Server(data_dir)
    try:
        result["intact"] = first_answer(server, requests[0])
    finally:
        server.stop()
    print("intact", json.dumps(result["intact"]), flush=True)

    damage(data_dir / CHECKPOINT_FILE, args.damage)
    drop_page_cache()
    server = Server(data_dir)
    try:
        result["damaged"] = first_answer(server, requests[0])
        print("damaged", json.dumps(result["damaged"]), flush=True)
        windows = until_wanted(server, requests, truth)
        result["wanted_served_s"] = windows[-1]["ended_s"]
        windows.append(window(server, requests, truth, len(windows)))
        result["windows"] = windows
    finally:
        server.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"recovery-{args.registrations}-{args.variant}-{args.damage}.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")


def print_table(result: dict[str, object]) -> None:
    intact, damaged = result["intact"], result["damaged"]
    print(f"\n{result['registrations']:,} {result['variant']}, checkpoint {result['damage']}"
          f" (page cache dropped: {result['cache_dropped']})")
    print(f"first answer: intact {intact['first_answer_s']} s ({intact['type_then']}); "  # type: ignore[index]
          f"damaged {damaged['first_answer_s']} s ({damaged['type_then']}); "  # type: ignore[index]
          f"{damaged['wanted_type']} served from {result['wanted_served_s']} s")  # type: ignore[index]
    print("| ended s | type | checks/s | p99 ms | recall | errors | RSS / anon GB |")
    print("|---|---|---|---|---|---|---|")
    for row in result["windows"]:  # type: ignore[attr-defined]
        print(f"| {row['ended_s']} | {row['type']} | {row['qps']} | {row['p99_ms']} | "
              f"{row['recall']} | {row['errors']} | {row.get('rss_gb')} / {row.get('anon_gb')} |")


if __name__ == "__main__":
    main()
