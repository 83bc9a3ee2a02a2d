"""Shorter fast-scan codes at scale: FastScanIVF's 32-byte codes against 16-byte ones (raw
FAISS, no server).

At 10,000,000 registrations a check scans the codes of its nprobe lists (a third of them on
the clustered gallery), one 32-byte code a registration: about 113 MB a query, and that scan
is most of a check's CPU. 16-byte codes (a 4-bit sub-quantizer every 16 dimensions instead
of every 8) halve what is read; their scores are rougher, so the question is how many
candidates they need to hold what the lists hold. This measures both on one set of lists (a
gallery streamed block by block, every row in its exact nearest of 4,096 lists, as
FastScanIVF4096 builds today):

- the nprobe where the probes' lists hold 0.995 / 0.998 / 0.999 of their matches (every
  registration scoring >= 0.40 with the probe, found exactly);
- at each, for 64 to 1,024 candidates: the share of the matches among the candidates
  (the re-rank is exact, so that is what a check finds), and the fast-scan kernel's ms a
  query (one thread, one query a call, the lists chosen beforehand).

Results: benchmarks/results/code-bytes-N-V.json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/code_bytes.py --registrations 10000000 \\
        --variant clustered
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import gallery_data as gd
import numpy as np
from finer_lists import BLOCK, PROBES, flat, kmeans, sample_and_probes, say

MATCH = 0.40
TARGETS = (0.995, 0.998, 0.999)
CANDIDATES = (64, 128, 256, 512, 1024)
CODE_BYTES = (32, 16)
TIMED_PROBES = 400
RESULTS = Path(__file__).parent / "results"


def filling(quantizer: faiss.Index, code_bytes: int, sample: np.ndarray) -> faiss.Index:
    """An IndexIVFPQ of 4-bit codes taking lists chosen outside it (add_core), converted to
    fast-scan lists at the end, as FastScanIVF's build does."""
    index = faiss.IndexIVFPQ(quantizer, sample.shape[1], quantizer.ntotal, 2 * code_bytes, 4,
                             faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    index.train(sample[:100_000])
    return index


def candidates_of(index: faiss.Index, probes: np.ndarray, lists: np.ndarray, nprobe: int,
                  k: int) -> np.ndarray:
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    chosen = np.ascontiguousarray(lists[:, :nprobe])
    distances = np.empty((len(probes), k), np.float32)
    ids = np.empty((len(probes), k), np.int64)
    index.search_preassigned_c(len(probes), faiss.swig_ptr(probes), k, faiss.swig_ptr(chosen),
                               faiss.swig_ptr(np.zeros(chosen.shape, np.float32)),
                               faiss.swig_ptr(distances), faiss.swig_ptr(ids), False, params)
    return ids


def timed_search(index: faiss.Index, probes: np.ndarray, lists: np.ndarray, nprobe: int,
                 k: int) -> float:
    """ms a query of the fast-scan kernel, one query a call, one thread."""
    faiss.omp_set_num_threads(1)
    begun = time.process_time()
    for row in range(TIMED_PROBES):
        candidates_of(index, probes[row:row + 1], lists[row:row + 1], nprobe, k)
    faiss.omp_set_num_threads(2)
    return (time.process_time() - begun) / TIMED_PROBES * 1000


def held(candidates: np.ndarray, matches: np.ndarray) -> float:
    """Share of the (probe, row) matches whose row is among the probe's candidates."""
    found = {(probe, int(row)) for probe, rows in enumerate(candidates) for row in rows}
    return float(np.mean([(int(p), int(r)) in found for p, r in matches]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registrations", type=int, default=10_000_000)
    parser.add_argument("--variant", choices=gd.VARIANTS, default="clustered")
    args = parser.parse_args()
    faiss.omp_set_num_threads(2)
    sample, probes = sample_and_probes(args.registrations, args.variant, 300_000)
    say(f"training sample {len(sample):,}, probes {len(probes):,}")
    quantizer = flat(kmeans(sample[:262_144], 4096))  # as finer_lists.py's 4,096 lists
    say("k-means: 4,096 lists")
    indexes = {size: filling(quantizer, size, sample) for size in CODE_BYTES}
    del sample
    by_probe = faiss.IndexFlatIP(probes.shape[1])
    by_probe.add(probes)
    matches, added = [], 0
    for rows, _ in gd.streamed(args.registrations, args.variant, PROBES, block=BLOCK):
        ids = np.arange(added, added + len(rows), dtype=np.int64)
        lists = quantizer.search(rows, 1)[1][:, 0].copy()
        for index in indexes.values():
            index.add_core(len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(ids),
                           faiss.swig_ptr(lists))
        limits, _, found = by_probe.range_search(rows, MATCH)
        row_of = np.repeat(ids, np.diff(limits.astype(np.int64)))
        matches.append(np.column_stack([found, row_of, lists[row_of - added]]))
        added += len(rows)
        if added // BLOCK % 10 == 0:
            say(f"added {added:,}")
    pairs = np.vstack(matches)  # (probe, row, the row's list)
    say(f"{len(pairs):,} matches >= {MATCH} of {len(probes):,} probes")
    indexes = {size: faiss.IndexIVFPQFastScan(index, 32) for size, index in indexes.items()}
    probe_lists = quantizer.search(probes, 4096)[1]
    rank = np.empty(probe_lists.shape, np.int32)
    rank[np.arange(len(probes))[:, None], probe_lists] = np.arange(4096)[None, :]
    needed = np.sort(rank[pairs[:, 0], pairs[:, 2]])
    rows_out = []
    for target in TARGETS:
        nprobe = int(needed[int(np.ceil(target * len(needed))) - 1]) + 1
        for size, index in indexes.items():
            for k in CANDIDATES:
                row = {"lists_hold": target, "nprobe": nprobe, "code_bytes": size,
                       "candidates": k,
                       "held": held(candidates_of(index, probes, probe_lists, nprobe, k),
                                    pairs[:, :2]),
                       "fast_scan_ms": timed_search(index, probes, probe_lists, nprobe, k)}
                say(f"lists hold {target} (nprobe {nprobe}): {size}-byte codes, {k} "
                    f"candidates hold {row['held']:.4f}, {row['fast_scan_ms']:.2f} ms a query")
                rows_out.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"code-bytes-{args.registrations}-{args.variant}.json"
    out.write_text(json.dumps({"registrations": added, "variant": args.variant,
                               "probes": len(probes), "matches": len(pairs),
                               "rows": rows_out}, indent=1))
    print(f"\n{'lists hold':>10} {'nprobe':>6} {'bytes':>5} {'cands':>5} {'held':>7} "
          f"{'ms/query':>8}")
    for row in rows_out:
        print(f"{row['lists_hold']:>10} {row['nprobe']:>6} {row['code_bytes']:>5} "
              f"{row['candidates']:>5} {row['held']:>7.4f} {row['fast_scan_ms']:>8.2f}")
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
