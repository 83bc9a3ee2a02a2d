"""Finer lists at scale: FastScanIVF's 4,096 lists against 16,384 (raw FAISS, no server).

At 10,000,000 registrations a check scans the codes of its nprobe lists, and that scan is what
keeps two cores under 300 checks/s. Smaller lists hold a duplicate's list among fewer codes;
their price is k-means and every vector's list choice. This measures both sides on a
gallery streamed block by block (the float32 rows are never all in memory):

- 4,096 lists: spherical k-means on 262,144 rows, each row in its exact nearest list (as
  FastScanIVF4096 builds today);
- 16,384 lists: a two-level k-means (128 coarse centroids, 128 under each, on 1,048,576
  rows), each row in the nearest of the children of its --coarse-probes nearest coarse
  centroids (an IndexIVFFlat over the fine centroids, so the choice costs a fraction of the
  exact 16,384-way one; its agreement with the exact choice is printed).

For each, at the nprobe where the probes' lists hold 0.995 / 0.998 / 0.999 / all of their
matches (every registration scoring >= 0.40 with the probe, found exactly): the share of
codes scanned and the fast-scan kernel's ms a query (one thread, one query a call, 64
candidates) plus the centroid search's. Results: benchmarks/results/finer-lists-N-V.json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/finer_lists.py --registrations 10000000 \\
        --variant uneven
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import gallery_data as gd
import numpy as np

BLOCK = 100_000
PROBES = 2_000
MATCH = 0.40
COARSE = 128
TARGETS = (0.995, 0.998, 0.999, 1.0)
TIMED_PROBES = 400
RESULTS = Path(__file__).parent / "results"
started = time.time()


def say(text: str) -> None:
    print(f"[{time.time() - started:6.0f} s] {text}", flush=True)


def sample_and_probes(registrations: int, kind: str, sample_rows: int = 1_100_000
                      ) -> tuple[np.ndarray, np.ndarray]:
    """About `sample_rows` rows drawn from the streamed gallery, and its PROBES probes."""
    rng = np.random.default_rng(0)
    sample, probes = [], []
    for rows, cut in gd.streamed(registrations, kind, PROBES, block=BLOCK):
        sample.append(rows[rng.random(len(rows)) < sample_rows / registrations])
        if cut is not None:
            probes.append(cut)
    return np.ascontiguousarray(np.vstack(sample)), np.ascontiguousarray(np.vstack(probes))


def kmeans(rows: np.ndarray, count: int) -> np.ndarray:
    km = faiss.Kmeans(rows.shape[1], count, niter=10, spherical=True, seed=1)
    km.train(rows)
    return np.asarray(km.centroids, np.float32)


def two_level(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COARSE centroids, and COARSE children under each (rows: COARSE * COARSE)."""
    coarse = kmeans(rows, COARSE)
    parent = faiss.knn(rows, coarse, 1, metric=faiss.METRIC_INNER_PRODUCT)[1][:, 0]
    fine = np.vstack([kmeans(rows[parent == c], COARSE) for c in range(COARSE)])
    return coarse, fine


def flat(centroids: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return index


def hierarchical(coarse: np.ndarray, fine: np.ndarray, probes: int) -> faiss.IndexIVFFlat:
    """An index whose search(x, 1) is the nearest fine centroid among the children of the
    `probes` nearest coarse ones."""
    index = faiss.IndexIVFFlat(flat(coarse), fine.shape[1], COARSE, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    # swig_ptr does not keep its array alive: each is named until the call returns.
    ids = np.arange(len(fine), dtype=np.int64)
    parents = np.repeat(np.arange(COARSE, dtype=np.int64), COARSE)
    index.add_core(len(fine), faiss.swig_ptr(fine), faiss.swig_ptr(ids), faiss.swig_ptr(parents))
    index.nprobe = probes
    return index


def grouped_choice(coarse: np.ndarray, fine: np.ndarray, rows: np.ndarray, probes: int
                   ) -> np.ndarray:
    """The hierarchical choice by one BLAS product per coarse centroid (its children
    against the rows that have it among their `probes` nearest): what a build would use."""
    nearest = faiss.knn(rows, coarse, probes, metric=faiss.METRIC_INNER_PRODUCT)[1]
    best = np.full(len(rows), -1, np.int64)
    best_score = np.full(len(rows), -np.inf, np.float32)
    children = fine.reshape(COARSE, COARSE, -1)
    for parent in np.unique(nearest):
        members = np.nonzero((nearest == parent).any(axis=1))[0]
        scores = rows[members] @ children[parent].T
        child = scores.argmax(axis=1)
        score = scores[np.arange(len(members)), child]
        better = score > best_score[members]
        best[members[better]] = parent * COARSE + child[better]
        best_score[members[better]] = score[better]
    return best


def choice_cost(choose: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> float:
    begun = time.perf_counter()
    choose(rows)
    return (time.perf_counter() - begun) / len(rows) * 1e6


def fast_scan(quantizer: faiss.Index, nlist: int, sample: np.ndarray) -> faiss.Index:
    index = faiss.IndexIVFPQFastScan(quantizer, sample.shape[1], nlist, sample.shape[1] // 8,
                                     4, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False  # as FastScanIVF
    index.train(sample[:100_000])
    return index


def timed_search(index: faiss.Index, probes: np.ndarray, lists: np.ndarray, nprobe: int
                 ) -> float:
    """ms a query of the fast-scan kernel, one query a call, best of two passes."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    distances, ids = np.empty((1, 64), np.float32), np.empty((1, 64), np.int64)
    passes = []
    for _ in range(2):
        begun = time.perf_counter()
        for row in range(TIMED_PROBES):
            query = np.ascontiguousarray(probes[row:row + 1])
            chosen = np.ascontiguousarray(lists[row:row + 1, :nprobe])
            bias = np.zeros(chosen.shape, np.float32)
            index.search_preassigned_c(1, faiss.swig_ptr(query), 64, faiss.swig_ptr(chosen),
                                       faiss.swig_ptr(bias), faiss.swig_ptr(distances),
                                       faiss.swig_ptr(ids), False, params)
        passes.append((time.perf_counter() - begun) / TIMED_PROBES * 1000)
    return min(passes)


def measure(name: str, quantizer: faiss.Index, index: faiss.Index, nlist: int,
            probes: np.ndarray, matches: np.ndarray, total: int) -> list[dict[str, float]]:
    """matches: (probe, list of the matching row) pairs."""
    sizes = np.array([index.invlists.list_size(i) for i in range(nlist)])
    lists = quantizer.search(probes, nlist)[1]
    rank = np.empty((len(probes), nlist), np.int32)
    rank[np.arange(len(probes))[:, None], lists] = np.arange(nlist)[None, :]
    needed = np.sort(rank[matches[:, 0], matches[:, 1]])
    scanned = np.cumsum(sizes[lists], axis=1) / total
    rows = []
    for target in TARGETS:
        nprobe = int(needed[int(np.ceil(target * len(needed))) - 1]) + 1
        begun = time.perf_counter()
        quantizer.search(probes[:TIMED_PROBES], nprobe)
        centroid_ms = (time.perf_counter() - begun) / TIMED_PROBES * 1000
        row = {"lists": nlist, "recall": target, "nprobe": nprobe,
               "codes_scanned": float(np.mean(scanned[:, nprobe - 1])),
               "fast_scan_ms": timed_search(index, probes, lists, nprobe),
               "centroid_ms": centroid_ms}
        say(f"{name}: recall {target}: nprobe {nprobe}, {row['codes_scanned']:.4f} of the "
            f"codes, fast-scan {row['fast_scan_ms']:.2f} ms + centroids "
            f"{centroid_ms:.2f} ms a query")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registrations", type=int, default=10_000_000)
    parser.add_argument("--variant", choices=gd.VARIANTS, default="uneven")
    parser.add_argument("--coarse-probes", type=int, default=16,
                        help="coarse centroids whose children a row's list is chosen among")
    args = parser.parse_args()
    faiss.omp_set_num_threads(2)
    sample, probes = sample_and_probes(args.registrations, args.variant)
    say(f"training sample {len(sample):,}, probes {len(probes):,}")
    begun = time.time()
    centroids4 = kmeans(sample[:262_144], 4096)
    train4 = time.time() - begun
    begun = time.time()
    coarse, fine = two_level(sample[:1_048_576])
    train16 = time.time() - begun
    say(f"k-means: 4,096 lists {train4:.0f} s, 16,384 lists (two levels) {train16:.0f} s")
    exact4, exact16 = flat(centroids4), flat(fine)
    chooser = hierarchical(coarse, fine, args.coarse_probes)
    checked = sample[-20_000:]
    choice_us = {name: choice_cost(choose, checked) for name, choose in (
        ("exact 4,096", lambda rows: exact4.search(rows, 1)[1][:, 0]),
        ("exact 16,384", lambda rows: exact16.search(rows, 1)[1][:, 0]),
        ("children of the nearest coarse, IndexIVFFlat",
         lambda rows: chooser.search(rows, 1)[1][:, 0]),
        ("children of the nearest coarse, grouped products",
         lambda rows: grouped_choice(coarse, fine, rows, args.coarse_probes)))}
    say(f"list choice, us a row on 2 threads: {choice_us}")
    chosen = chooser.search(checked, 1)[1][:, 0]
    agreement = float(np.mean(chosen == exact16.search(checked, 1)[1][:, 0]))
    same = float(np.mean(chosen == grouped_choice(coarse, fine, checked, args.coarse_probes)))
    say(f"16,384 lists: the chosen list is the nearest for {agreement:.4f} of 20,000 rows "
        f"(the grouped products choose the same for {same:.4f})")
    index4, index16 = fast_scan(exact4, 4096, sample), fast_scan(exact16, 16384, sample)
    del sample
    by_probe = flat(probes)
    matches4, matches16 = [], []
    added = 0
    for rows, _ in gd.streamed(args.registrations, args.variant, PROBES, block=BLOCK):
        ids = np.arange(added, added + len(rows), dtype=np.int64)
        index4.add_with_ids(rows, ids)
        index16.quantizer = chooser  # add_with_ids chooses lists with the quantizer
        index16.add_with_ids(rows, ids)
        index16.quantizer = exact16
        limits, _, found = by_probe.range_search(rows, MATCH)
        matched = rows[np.repeat(np.arange(len(rows)), np.diff(limits.astype(np.int64)))]
        matches4.append(np.column_stack([found, exact4.search(matched, 1)[1][:, 0]]))
        matches16.append(np.column_stack([found, chooser.search(matched, 1)[1][:, 0]]))
        added += len(rows)
        if added // BLOCK % 10 == 0:
            say(f"added {added:,}")
    pairs4, pairs16 = np.vstack(matches4), np.vstack(matches16)
    say(f"{len(pairs4):,} matches >= {MATCH} of {len(probes):,} probes")
    faiss.omp_set_num_threads(1)
    rows4 = measure("4,096 lists", exact4, index4, 4096, probes, pairs4, added)
    rows16 = measure("16,384 lists", exact16, index16, 16384, probes, pairs16, added)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"finer-lists-{args.registrations}-{args.variant}.json"
    out.write_text(json.dumps({
        "registrations": added, "variant": args.variant, "matches": len(pairs4),
        "coarse_probes": args.coarse_probes, "agreement": agreement,
        "train_s": {"4096": train4, "16384": train16},
        "list_choice_us_a_row": choice_us, "rows": rows4 + rows16}, indent=1))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
