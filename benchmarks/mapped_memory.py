"""How much of the vector file a re-rank's scattered reads map into the server's resident
memory, from a cold and from a warm page cache.

The server reads a check's candidates through a read-only map of store/vectors.f32 advised
MADV_RANDOM. A read fault on a page the page cache does not hold reads that one page; on a
page it holds (a rebuild's fill, a compaction, `dedup doctor` or a backup read the whole file
by preadv, and the kernel keeps it in large folios) the kernel maps the pages around it too.
Those pages count in the process's RSS (RssFile) though the page cache, not the process,
holds them. For each state, `--reads` random slots are read one at a time, as re-ranks do,
and the growth of RssFile is reported. Needs root to drop the page cache.

    .venv/bin/python benchmarks/mapped_memory.py --data-dir /tmp/dedup-scale/1000000-clustered/data
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from dedup.gallery.embedded.layout import vector_file
from dedup.gallery.embedded.vector_file import HEADER_BYTES, VectorFile

sys.path.insert(0, str(Path(__file__).parent))
import harness

RESULTS = Path(__file__).parent / "results"


def rss_file_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def drop_page_cache() -> None:
    if not harness.drop_page_cache():
        raise SystemExit("dropping the page cache needs root")


def warm_page_cache(path: Path) -> None:
    """Reads the whole file by preadv-sized reads, as a scan does (nothing mapped)."""
    with path.open("rb", buffering=0) as file:
        while file.read(64 << 20):
            pass


def scattered_reads(path: Path, dimension: int, reads: int, seed: int) -> dict[str, float]:
    slots = (path.stat().st_size - HEADER_BYTES) // (dimension * 4)
    keys = np.random.default_rng(seed).choice(np.arange(1, slots + 1), reads, replace=False)
    vectors = VectorFile.open(path, dimension, slots, writable=False)
    try:
        before, started = rss_file_bytes(), time.perf_counter()
        for key in keys:
            vectors.rows(np.array([key], np.int64))
        grown = rss_file_bytes() - before
        return {"reads": reads, "seconds": round(time.perf_counter() - started, 3),
                "rss_file_growth_mib": round(grown / 2**20, 1),
                "kib_mapped_a_read": round(grown / reads / 1024, 1)}
    finally:
        vectors.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path("/tmp/dedup-scale/1000000-clustered/data"))
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args()
    path = vector_file(args.data_dir)
    result: dict[str, object] = {"file_bytes": path.stat().st_size}
    drop_page_cache()
    result["cold"] = scattered_reads(path, args.dimension, args.reads, seed=1)
    drop_page_cache()
    warm_page_cache(path)
    result["warm"] = scattered_reads(path, args.dimension, args.reads, seed=2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "mapped_memory.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"{path} ({result['file_bytes'] / 1e9:.2f} GB), {args.reads:,} scattered slots "
          "read one at a time through the map:")
    print("| page cache | RssFile growth MiB | KiB mapped a read | s |")
    print("|---|---|---|---|")
    for state in ("cold", "warm"):
        row = result[state]
        print(f"| {state} | {row['rss_file_growth_mib']} | {row['kib_mapped_a_read']} | "  # type: ignore[index]
              f"{row['seconds']} |")  # type: ignore[index]
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
