"""Float IVF with an exact re-rank at the scale of benchmarks/scale.py: can a partition of
the gallery find the duplicates without scanning most of it?

Reads the gallery that `benchmarks/scale.py --registrations N --variant V` generated (its
chunks FILE.npy + FILE.csv and its probes, under --workdir/N-V/input), computes the exact
ground truth (every registration scoring >= 0.40 with a probe; cached beside the input),
builds a FAISS index of each --kind in turn (raw FAISS, or dedup's own SignIVF<n>: float
k-means lists of 512-bit sign codes, or FastScanIVF<n>: 4-bit PQ codes in those lists;
trained on --train registrations, filled on 2 threads as a rebuild fills them) and sweeps
nprobe. Per nprobe it reports the share of ground-truth pairs the top --depth candidates
hold after an exact re-rank from the float32 rows, separately for registrations under the
probe's own ID number and under another one (the fraud dedup exists to find; `Check` finds
the former by ID-number lookup whatever the index), and queries/s on one thread, one query
at a time (search only, and with the re-rank); with --batches, also the search's queries/s
in batches of B queries on 1 and 2 threads (the server searches a batch of concurrent
checks in one call).
With --in-memory the gallery is generated in memory instead (gallery_data.in_memory, no ID
numbers: the recall is of every match).

    .venv/bin/python benchmarks/ivf_at_scale.py --registrations 10000000 --variant iso
    .venv/bin/python benchmarks/ivf_at_scale.py --registrations 1000000 --variant uneven \
        --in-memory --nprobes 16 64 256
    .venv/bin/python benchmarks/ivf_at_scale.py --registrations 1000000 --variant clustered \
        --in-memory --kind SignIVF4096 --nprobes 256 512 1024
    .venv/bin/python benchmarks/ivf_at_scale.py --registrations 10000000 --variant clustered \
        --kind SignIVF4096 FastScanIVF4096 --nprobes 1024 1448 2048 --batches 8 16

Prints JSON lines and a table; writes benchmarks/results/ivf-<N>-<V>-<kind>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import VARIANTS, in_memory

from dedup.core.blas import limit_numpy_blas
from dedup.gallery.embedded.index import SearchOptions, new_index

RESULTS = Path(__file__).parent / "results"
MATCH = 0.40
BUILD_THREADS = 2


class Chunks:
    """The generated chunks as one read-only row space (memory-mapped), or one array."""

    def __init__(self, folder: Path, variant: str, array: np.ndarray | None = None) -> None:
        self.files = sorted(folder.glob(f"{variant}-[0-9][0-9][0-9].npy"))
        self.arrays = [array] if array is not None else [
            np.load(path, mmap_mode="r") for path in self.files]
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        chunk_of = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), self.arrays[0].shape[1]), np.float32)
        for position, (row, chunk) in enumerate(zip(ids, chunk_of, strict=True)):
            out[position] = self.arrays[chunk][row - self.starts[chunk]]
        return out

    def id_numbers(self, wanted: set[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for chunk, path in enumerate(self.files):
            start, end = int(self.starts[chunk]), int(self.starts[chunk + 1])
            rows = {row - start for row in wanted if start <= row < end}
            if not rows:
                continue
            with open(path.with_suffix(".csv"), newline="") as handle:
                for number, line in enumerate(list(csv.reader(handle))[1:]):
                    if number in rows:
                        found[start + number] = line[1]
        return found


def ground_truth(chunks: Chunks, probes: np.ndarray, cache: Path | None) -> list[list[int]]:
    if cache is not None and cache.exists():
        return [list(found) for found in json.loads(cache.read_text())]
    started = time.perf_counter()
    truth: list[list[int]] = [[] for _ in probes]
    for chunk, array in enumerate(chunks.arrays):
        rows, columns = np.nonzero(probes @ np.asarray(array).T >= MATCH)
        for row, column in zip(rows, columns, strict=True):
            truth[row].append(int(chunks.starts[chunk] + column))
    if cache is not None:
        cache.write_text(json.dumps(truth))
    print(f"exact ground truth in {time.perf_counter() - started:.0f} s", flush=True)
    return truth


class ServedIndex:
    """One of dedup's own index types (e.g. SignIVF4096) behind FAISS's search signature."""

    def __init__(self, kind: str, dimension: int) -> None:
        self.index = new_index(kind, dimension)

    def train(self, sample: np.ndarray) -> None:
        self.index.train(sample)  # type: ignore[attr-defined]

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.fill(ids, vectors)  # type: ignore[attr-defined]  # as a rebuild fills

    def search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[Any, Any]:
        options = SearchOptions(nprobe=params.nprobe if params is not None else 64)
        found = self.index.search(queries, k, options)
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.zeros((len(queries), k), np.float32)
        for row, (row_ids, row_scores) in enumerate(found):
            ids[row, :len(row_ids)], scores[row, :len(row_ids)] = row_ids, row_scores
        return scores, ids


def dedup_kind(kind: str) -> bool:
    return kind.startswith(("SignIVF", "FastScanIVF"))


def build(chunks: Chunks, kind: str, train: int) -> tuple[Any, dict[str, float]]:
    faiss.omp_set_num_threads(BUILD_THREADS)
    dimension = chunks.arrays[0].shape[1]
    index = (ServedIndex(kind, dimension) if dedup_kind(kind) else
             faiss.index_factory(dimension, kind, faiss.METRIC_INNER_PRODUCT))
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    index.train(chunks.rows(np.sort(rng.choice(len(chunks), train, replace=False))))
    trained = time.perf_counter()
    for chunk, array in enumerate(chunks.arrays):
        index.add_with_ids(np.ascontiguousarray(array), np.arange(
            chunks.starts[chunk], chunks.starts[chunk + 1], dtype=np.int64))
    added = time.perf_counter()
    timing = {"train_seconds": trained - started, "add_seconds": added - trained}
    print(json.dumps(timing), flush=True)
    return index, timing


def sweep(index: Any, chunks: Chunks, probes: np.ndarray, truth: list[list[int]],
          own: list[set[int]], nprobe: int, depth: int) -> dict[str, Any]:
    """One thread, one query at a time; pairs found after the exact re-rank."""
    faiss.omp_set_num_threads(1)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    found = {"own": 0, "other": 0}
    searching = reranking = 0.0
    for probe, wanted, mine in zip(probes, truth, own, strict=True):
        started = time.perf_counter()
        _, ids = index.search(probe.reshape(1, -1), depth, params=params)
        searched = time.perf_counter()
        candidates = ids[0][ids[0] >= 0]
        hits = set(candidates[chunks.rows(candidates) @ probe >= MATCH].tolist())
        reranking += time.perf_counter() - searched
        searching += searched - started
        for row in hits & set(wanted):
            found["own" if row in mine else "other"] += 1
    expected_own = sum(len(mine) for mine in own)
    expected_other = sum(len(wanted) for wanted in truth) - expected_own
    return {"nprobe": nprobe, "depth": depth,
            "recall_own_id": found["own"] / expected_own if expected_own else float("nan"),
            "recall_other_id": found["other"] / max(1, expected_other),
            "pairs_own_id": expected_own, "pairs_other_id": expected_other,
            "qps_search": len(probes) / searching,
            "qps_with_rerank": len(probes) / (searching + reranking)}


def batched_qps(index: Any, probes: np.ndarray, nprobe: int, depth: int, batch: int,
                threads: int, seconds: float = 8.0) -> float:
    """Queries a second of the search alone, `batch` queries a call on `threads`."""
    faiss.omp_set_num_threads(threads)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    started, done, start = time.perf_counter(), 0, 0
    while time.perf_counter() - started < seconds:
        rows = np.arange(start, start + batch) % len(probes)
        index.search(np.ascontiguousarray(probes[rows]), depth, params=params)
        done, start = done + batch, start + batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registrations", type=int, default=10_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="iso")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--kind", nargs="+", default=["IVF4096,PQ64"],
                        help="FAISS index_factory strings or dedup's SignIVF<n> / "
                             "FastScanIVF<n>, built and measured one after the other")
    parser.add_argument("--batches", type=int, nargs="*", default=[],
                        help="also measure the search in batches of these sizes")
    parser.add_argument("--train", type=int, default=200_000, help="training registrations")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--depth", type=int, default=64, help="candidates re-ranked")
    parser.add_argument("--in-memory", action="store_true",
                        help="generate the gallery in memory (recall of every match)")
    args = parser.parse_args()
    # The re-rank's numpy products would leave BLAS threads spinning against FAISS's (a
    # SignIVF256 batch on two threads then ran 20x slower than on one); the server limits
    # them too (numpy_blas_threads).
    limit_numpy_blas(1)
    folder = args.workdir / f"{args.registrations}-{args.variant}" / "input"
    if args.in_memory:
        gallery, probes = in_memory(args.registrations, args.variant)
        chunks = Chunks(folder, args.variant, gallery)
        truth = ground_truth(chunks, probes, None)
        own: list[set[int]] = [set() for _ in truth]  # no ID numbers: all count as "other"
        # (so recall_other_id is the recall of every match)
    else:
        chunks = Chunks(folder, args.variant)
        summary = np.load(next(folder.glob(f"{args.variant}-{args.registrations}-*-7.npz")))
        probes, probe_ids = summary["probes"].astype(np.float32), summary["probe_ids"].tolist()
        truth = ground_truth(chunks, probes, folder / "ground-truth-0.40.json")
        numbers = chunks.id_numbers({row for found in truth for row in found})
        own = [{row for row in found if numbers[row] == id_number}
               for found, id_number in zip(truth, probe_ids, strict=True)]
    for kind in args.kind:
        report(kind, args, chunks, probes, truth, own)


def report(kind: str, args: argparse.Namespace, chunks: Chunks, probes: np.ndarray,
           truth: list[list[int]], own: list[set[int]]) -> None:
    index, timing = build(chunks, kind, args.train)
    rows = []
    for nprobe in args.nprobes:
        rows.append(sweep(index, chunks, probes, truth, own, nprobe, args.depth))
        for batch in args.batches:
            for threads in (1, 2):
                rows[-1][f"qps_batch_{batch}_threads_{threads}"] = batched_qps(
                    index, probes, nprobe, args.depth, batch, threads)
        print(json.dumps(rows[-1]), flush=True)
    result = {"registrations": len(chunks), "variant": args.variant, "kind": kind,
              "in_memory": args.in_memory,
              "match": MATCH, **timing, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (f"ivf-{args.registrations}-{args.variant}-{kind.replace(',', '_')}"
                     f"{'-in-memory' if args.in_memory else ''}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{len(chunks):,} registrations ({args.variant}), {kind}: train "
          f"{timing['train_seconds']:.0f} s, add {timing['add_seconds']:.0f} s")
    other = "recall, all" if args.in_memory else "recall other ID"
    batched = "".join(f" {f'q/s b{b} t{t}':>11}" for b in args.batches for t in (1, 2))
    print(f"{'nprobe':>6} {'recall own ID':>14} {other:>16} {'q/s search':>11}"
          f" {'q/s +rerank':>12}{batched}")
    for row in rows:
        values = "".join(f" {row[f'qps_batch_{b}_threads_{t}']:11.1f}"
                         for b in args.batches for t in (1, 2))
        print(f"{row['nprobe']:6} {row['recall_own_id']:14.4f} {row['recall_other_id']:16.4f}"
              f" {row['qps_search']:11.1f} {row['qps_with_rerank']:12.1f}{values}")
    print(f"\nwrote {out}", flush=True)


if __name__ == "__main__":
    main()
