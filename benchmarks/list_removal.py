"""What a removal costs a served list index: FastScanIVF, which `auto` serves from 1,000,000
registrations on, or SignIVF.

Each removal holds the index's write lock, so every check waits for it. Loads a checkpoint a
server wrote (benchmarks/scale.py's galleries) and, one process, one thread:

- `at once`: each removal's code taken out of its list at once (dedup before 2026-12-06 for
  FastScanIVF, 2026-12-06 for SignIVF): FAISS reads every list's ids to find it;
- `marked`: the id marked and skipped by searches, the codes removed together once
  MARKED_LIST_REMOVALS_MOST are marked or before a snapshot (dedup since).

Reports the median and worst milliseconds of --removals single removals, and a search of k=64
with none and with about MARKED_LIST_REMOVALS_MOST - 1 marked (the most a search meets).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/list_removal.py \\
        /tmp/dedup-scale/1000000-clustered/data/index.ckpt

Writes benchmarks/results/list-removal.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from dedup.gallery.embedded import index as index_module
from dedup.gallery.embedded.checkpoint import checkpoint_model_id
from dedup.gallery.embedded.index import PartitionedIndex, SearchOptions, load_index

sys.path.insert(0, str(Path(__file__).parent))
from harness import timed_ms

RESULTS = Path(__file__).parent / "results"
DIMENSION = 512


def loaded(path: Path) -> PartitionedIndex:
    index, _ = load_index(path, DIMENSION, checkpoint_model_id(path))
    if not isinstance(index, PartitionedIndex):
        raise SystemExit(f"{path} holds a {index.kind} index, not FastScanIVF or SignIVF")
    return index


def search_ms(index: PartitionedIndex, queries: np.ndarray) -> float:
    return statistics.median(timed_ms(lambda row=row: index.search(row[None, :], 64,
                                                                    SearchOptions()))
                             for row in queries)


def removals_ms(index: PartitionedIndex, keys: list[int], at_once: bool) -> list[float]:
    def remove(key: int) -> None:
        index.remove(np.array([key], np.int64))
        if at_once:
            with index._lock.writing():
                index._remove_marked()

    return [timed_ms(lambda key=key: remove(key)) for key in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a FastScanIVF or SignIVF index.ckpt")
    parser.add_argument("--removals", type=int, default=100)
    args = parser.parse_args()
    index = loaded(args.checkpoint)
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((100, DIMENSION), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    held = np.flatnonzero(index._held)  # keys start at 1; erased ones are gaps
    keys = rng.choice(held, 2 * args.removals, replace=False).astype(int).tolist()
    most = index_module.MARKED_LIST_REMOVALS_MOST
    row: dict[str, float | int | str] = {"checkpoint": str(args.checkpoint),
                                         "index": index.kind, "registrations": len(index)}
    row["search_ms_none_marked"] = search_ms(index, queries)
    for way, part in (("at_once", keys[:args.removals]), ("marked", keys[args.removals:])):
        times = removals_ms(index, part, way == "at_once")
        row[f"{way}_median_ms"], row[f"{way}_worst_ms"] = statistics.median(times), max(times)
    with index._lock.writing():
        index._remove_marked()
    index.remove(np.array(rng.choice(np.flatnonzero(index._held), most - 1, replace=False),
                          np.int64))
    row["marked_for_search"] = len(index._marked)
    row["search_ms_marked"] = search_ms(index, queries)
    for name, value in row.items():
        print(f"{name:>28}: {value if isinstance(value, str | int) else f'{value:.3f}'}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "list-removal.json").write_text(json.dumps(row, indent=1) + "\n")
    print(f"wrote {RESULTS / 'list-removal.json'}")


if __name__ == "__main__":
    main()
