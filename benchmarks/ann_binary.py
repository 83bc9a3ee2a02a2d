"""Candidate search over 512-bit sign codes: the flat scan (BinarySign512) against binary IVF
(BinaryIVF<nlist>) and multi-index hashing (its recall on the first 500 probes), each with an
exact re-rank from float32.

For each data variant of benchmarks/gallery_data.py ("iso", "uneven", "clustered"), generated
in memory: N registrations, P probes (fresh captures of enrolled persons) and the exact
ground truth (per probe, every registration scoring >= 0.40). Then per index and search
parameter:
  - duplicate recall: the share of probes (with at least one ground-truth match) whose
    ground-truth matches ALL come back after the top `depth` candidates are re-ranked
    exactly (re-ranking only re-orders: a match is lost only when it is not a candidate);
  - queries/s on one thread, one query at a time, through dedup's index classes: encode,
    search, gather the candidates' float32 vectors and re-score them (the store's fetch of
    those vectors is not included);
  - build seconds (training and adding) and index bytes per vector.
Then the scan cost at --scan-at (default 10,000,000) random codes, timing only (no floats,
no recall): the flat scan one query at a time and in batches of 128, on 1 and 2 threads,
and with --scan-nlist N also binary IVF with N lists (its build takes minutes at 10M).

    .venv/bin/python benchmarks/ann_binary.py --registrations 1000000

Prints a table and writes benchmarks/results/ann-binary-<N>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.gallery.embedded.index import (
    BinaryIVFIndex,
    BinarySignIndex,
    SearchOptions,
    VectorIndex,
)

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import DIMENSION, VARIANTS, in_memory

RESULTS = Path(__file__).parent / "results"
MATCH = 0.40
DEPTHS = (16, 32, 64, 128, 256)
TIMED_DEPTHS = (16, 64, 256)
TIMED_QUERIES = 300
# Training vectors per list: FAISS's minimum (a rebuild samples 64; binary k-means costs
# sample x nlist x 512 per iteration, and measured recall hardly depends on it).
TRAIN_PER_LIST = 39
MULTIHASH = ((32, 16), (64, 8))  # (tables, bits per table)
MULTIHASH_PROBES = 500
BUILD_THREADS = 2


def exact_truth(gallery: np.ndarray, probes: np.ndarray) -> list[np.ndarray]:
    """Per probe, the rows scoring >= MATCH, by exact inner products block by block."""
    hits: list[list[np.ndarray]] = [[] for _ in probes]
    for start in range(0, len(gallery), 100_000):
        rows, columns = np.nonzero(probes @ gallery[start:start + 100_000].T >= MATCH)
        for row in np.unique(rows):
            hits[row].append(columns[rows == row] + start)
    return [np.concatenate(found) if found else np.empty(0, np.int64) for found in hits]


def recall(candidates: np.ndarray, truth: list[np.ndarray], depth: int) -> float:
    """Share of probes with matches whose matches are all among their first `depth`."""
    judged = [np.isin(wanted, row[:depth]).all()
              for row, wanted in zip(candidates, truth, strict=True) if len(wanted)]
    return float(np.mean(judged))


def candidates_of(index: VectorIndex, probes: np.ndarray, options: SearchOptions
                  ) -> np.ndarray:
    """The first max(DEPTHS) candidates per probe, -1 where fewer were found."""
    rows = np.full((len(probes), max(DEPTHS)), -1, np.int64)
    for start in range(0, len(probes), 500):
        found = index.search(probes[start:start + 500], max(DEPTHS), options)
        for offset, (ids, _) in enumerate(found):
            rows[start + offset, :len(ids)] = ids
    return rows


def queries_per_second(index: VectorIndex, gallery: np.ndarray, probes: np.ndarray,
                       depth: int, options: SearchOptions) -> float:
    """One thread, one query at a time: search, then the exact re-rank of `depth`."""
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    for probe in probes[:TIMED_QUERIES]:
        ((ids, _),) = index.search(probe.reshape(1, -1), depth, options)
        exact = gallery[ids] @ probe
        np.argsort(-exact, kind="stable")
    return min(len(probes), TIMED_QUERIES) / (time.perf_counter() - started)


def built(index: VectorIndex, gallery: np.ndarray, train: bool, rng: np.random.Generator
          ) -> float:
    """Trains (when asked) and fills `index` on BUILD_THREADS threads; returns seconds."""
    faiss.omp_set_num_threads(BUILD_THREADS)
    started = time.perf_counter()
    if train and isinstance(index, BinaryIVFIndex):
        size = min(len(gallery), TRAIN_PER_LIST * index.nlist)
        index.train(gallery[np.sort(rng.choice(len(gallery), size, replace=False))])
    for start in range(0, len(gallery), 100_000):
        block = gallery[start:start + 100_000]
        index.add(np.arange(start, start + len(block), dtype=np.int64), block)
    return time.perf_counter() - started


def sweep(name: str, index: VectorIndex, build_seconds: float, nprobes: list[int | None],
          gallery: np.ndarray, probes: np.ndarray, truth: list[np.ndarray]
          ) -> list[dict[str, Any]]:
    rows = []
    nlist = getattr(index, "nlist", 0)
    for nprobe in nprobes:
        options = SearchOptions(nprobe=nprobe or 1)
        faiss.omp_set_num_threads(BUILD_THREADS)
        candidates = candidates_of(index, probes, options)
        for depth in DEPTHS:
            row: dict[str, Any] = {
                "index": name, "nprobe": nprobe, "depth": depth,
                "scanned_share": nprobe / nlist if nprobe and nlist else 1.0,
                "recall": recall(candidates, truth, depth),
                "build_seconds": round(build_seconds, 1),
                "bytes_per_vector": index.bytes_per_vector}
            if depth in TIMED_DEPTHS:
                row["qps"] = queries_per_second(index, gallery, probes, depth, options)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def multihash(gallery: np.ndarray, probes: np.ndarray, truth: list[np.ndarray]
              ) -> list[dict[str, Any]]:
    """Multi-index hashing over the same codes: a candidate must match one table exactly."""
    encoder = BinarySignIndex(DIMENSION, 512)
    codes = np.vstack([encoder.encode(gallery[s:s + 100_000])
                       for s in range(0, len(gallery), 100_000)])
    probes, truth = probes[:MULTIHASH_PROBES], truth[:MULTIHASH_PROBES]
    probe_codes = encoder.encode(probes)
    rows = []
    for tables, bits in MULTIHASH:
        started = time.perf_counter()
        index = faiss.IndexBinaryMultiHash(512, tables, bits)
        index.add(codes)
        build_seconds = time.perf_counter() - started
        faiss.omp_set_num_threads(BUILD_THREADS)
        _, candidates = index.search(probe_codes, max(DEPTHS))
        faiss.omp_set_num_threads(1)
        started = time.perf_counter()
        for code in probe_codes[:100]:
            index.search(code.reshape(1, -1), 64)
        qps = 100 / (time.perf_counter() - started)
        for depth in (64, 256):
            row = {"index": f"MultiHash{tables}x{bits}", "nprobe": None, "depth": depth,
                   "recall": recall(candidates, truth, depth), "qps": qps,
                   "build_seconds": round(build_seconds, 1), "bytes_per_vector": 64 + 8 * tables}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def nlists_for(registrations: int) -> list[int]:
    """Powers of two near sqrt(n) and 2 sqrt(n)."""
    root = math.sqrt(registrations)
    return [2 ** round(math.log2(root)), 2 ** round(math.log2(2 * root))]


def nprobes_for(nlist: int) -> list[int | None]:
    return sorted({n for n in (16, 64, 256) if n < nlist // 2} | {nlist // 4, nlist // 2})


def measure_variant(variant: str, registrations: int, probe_count: int
                    ) -> dict[str, Any]:
    started = time.perf_counter()
    gallery, probes = in_memory(registrations, variant, probe_count)
    faiss.omp_set_num_threads(BUILD_THREADS)
    truth = exact_truth(gallery, probes)
    prepared = time.perf_counter() - started
    print(f"{variant}: data and exact ground truth in {prepared:.0f} s", flush=True)
    rng = np.random.default_rng(3)
    flat = BinarySignIndex(DIMENSION, 512)
    rows = sweep("BinarySign512", flat, built(flat, gallery, False, rng), [None], gallery,
                 probes, truth)
    del flat
    for nlist in nlists_for(registrations):
        ivf = BinaryIVFIndex(DIMENSION, nlist)
        rows += sweep(ivf.kind, ivf, built(ivf, gallery, True, rng), nprobes_for(nlist),
                      gallery, probes, truth)
    rows += multihash(gallery, probes, truth)
    matches = [len(t) for t in truth]
    return {"probes_with_matches": sum(1 for m in matches if m),
            "mean_matches_per_probe": float(np.mean(matches)),
            "data_seconds": prepared, "rows": rows}


def scan_cost(size: int, nlist: int) -> dict[str, Any]:
    """Per-query cost of the flat scan and binary IVF over `size` random 512-bit codes."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(size, 64), dtype=np.uint8)
    probes = rng.integers(0, 256, size=(128, 64), dtype=np.uint8)
    flat = faiss.IndexBinaryFlat(512)
    flat.add(codes)
    result: dict[str, Any] = {"codes": size}
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        started = time.perf_counter()
        for code in probes[:16]:
            flat.search(code.reshape(1, -1), 64)
        result[f"flat_qps_batch1_{threads}_threads"] = 16 / (time.perf_counter() - started)
        started = time.perf_counter()
        flat.search(probes, 64)
        result[f"flat_qps_batch128_{threads}_threads"] = 128 / (time.perf_counter() - started)
    del flat
    if nlist:
        result.update(ivf_scan_cost(codes, probes, nlist))
    print(json.dumps(result), flush=True)
    return result


def ivf_scan_cost(codes: np.ndarray, probes: np.ndarray, nlist: int) -> dict[str, float]:
    result = {}
    faiss.omp_set_num_threads(BUILD_THREADS)
    started = time.perf_counter()
    ivf = faiss.index_binary_factory(512, f"BIVF{nlist}")
    ivf.cp.niter = 2  # random codes: the lists' balance is what matters for timing
    ivf.train(codes[:nlist * 39])
    ivf.add(codes)
    result[f"BinaryIVF{nlist}_build_seconds"] = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    for nprobe in sorted({n for n in (64, 256, nlist // 4, nlist // 2) if n <= nlist}):
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        started = time.perf_counter()
        for code in probes:
            ivf.search(code.reshape(1, -1), 64, params=params)
        result[f"BinaryIVF{nlist}_nprobe{nprobe}_qps"] = len(probes) / (
            time.perf_counter() - started)
    return result


def print_table(result: dict[str, Any]) -> None:
    for variant, measured in result["variants"].items():
        print(f"\n{result['registrations']:,} registrations, {variant}: "
              f"{measured['probes_with_matches']} probes with matches")
        print(f"{'index':18} {'nprobe':>6} {'scan':>6} {'depth':>5} {'recall':>7} {'q/s':>8}"
              f" {'build s':>8} {'B/vec':>6}")
        for row in measured["rows"]:
            qps = f"{row['qps']:8.0f}" if "qps" in row else f"{'':8}"
            print(f"{row['index']:18} {row['nprobe'] or '':>6} "
                  f"{row.get('scanned_share', 1.0):6.3f} {row['depth']:5} {row['recall']:7.4f}"
                  f" {qps} {row['build_seconds']:8.1f} {row['bytes_per_vector']:6.0f}")
    if "scan" in result:
        print(f"\nscan cost at {result['scan']['codes']:,} random codes (q/s):")
        for key, value in result["scan"].items():
            if key != "codes":
                print(f"  {key:40} {value:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--scan-at", type=int, default=10_000_000,
                        help="random codes for the scan-cost timing (0: skip it)")
    parser.add_argument("--scan-nlist", type=int, default=0,
                        help="also time binary IVF with this many lists at --scan-at")
    args = parser.parse_args()
    result: dict[str, Any] = {"registrations": args.registrations, "probes": args.probes,
                              "match": MATCH, "variants": {}}
    for variant in args.variants:
        result["variants"][variant] = measure_variant(variant, args.registrations, args.probes)
    if args.scan_at:
        result["scan"] = scan_cost(args.scan_at, args.scan_nlist)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ann-binary-{args.registrations}.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
