"""What a 512-bit sign code costs to scan: FAISS's flat scan against its binary IVF's.

At 10,000,000 registrations a SignIVF check is its list scan (clustered: 1,448 of 4,096
lists, 3.5 million codes a check). This measures the nanoseconds a scanned code costs, one
thread, on the same codes: IndexBinaryFlat one query at a time and in batches of 8 and 64,
and IndexBinaryIVF (the container SignIVF searches with search_preassigned) one query at a
time over every list and over nprobe of them. Lists are a float k-means partition, as
SignIVF's; the probes are scale.py's.

    .venv/bin/python benchmarks/binary_scan.py --registrations 1000000 --variant clustered
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import VARIANTS, generate
from scale import RESULTS

from dedup.gallery.embedded.index import SIGN_BITS, _projection

NLIST = 4096
K = 64
SECONDS = 6.0


def per_query_seconds(search: Callable[[int], int], seconds: float = SECONDS) -> float:
    """Seconds a query, over repeated calls of search(i) -> queries done."""
    started, queries, i = time.perf_counter(), 0, 0
    while time.perf_counter() - started < seconds:
        queries += search(i)
        i += 1
    return (time.perf_counter() - started) / queries


def float_lists(vectors: np.ndarray, seed: int = 1) -> tuple[faiss.IndexFlatIP, np.ndarray]:
    sample = vectors[np.random.default_rng(seed).choice(len(vectors), 40 * NLIST,
                                                        replace=False)]
    kmeans = faiss.Kmeans(vectors.shape[1], NLIST, niter=4, spherical=True, seed=seed)
    kmeans.train(sample)
    centroids = faiss.IndexFlatIP(vectors.shape[1])
    centroids.add(kmeans.centroids)
    lists = np.vstack([centroids.search(vectors[i:i + 100_000], 1)[1]
                       for i in range(0, len(vectors), 100_000)])
    return centroids, np.ascontiguousarray(lists[:, 0], np.int64)


def binary_ivf(codes: np.ndarray, lists: np.ndarray) -> faiss.IndexBinaryIVF:
    ivf = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(SIGN_BITS), SIGN_BITS, NLIST)
    ivf.is_trained = True
    ids = np.arange(len(codes), dtype=np.int64)
    ivf.add_core(len(codes), faiss.swig_ptr(codes), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    return ivf


def ivf_search(ivf: faiss.IndexBinaryIVF, probes: np.ndarray, probe_lists: np.ndarray,
               nprobe: int) -> Callable[[int], int]:
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe

    def search(i: int) -> int:
        row = i % len(probes)
        lists = np.ascontiguousarray(probe_lists[row:row + 1, :nprobe])
        distances, labels = np.empty((1, K), np.int32), np.empty((1, K), np.int64)
        coarse = np.zeros(lists.shape, np.int32)
        ivf.search_preassigned_c(1, faiss.swig_ptr(probes[row:row + 1]), K,
                                 faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                                 faiss.swig_ptr(distances), faiss.swig_ptr(labels), False,
                                 params)
        return 1
    return search


def flat_search(flat: faiss.IndexBinaryFlat, probes: np.ndarray, batch: int
                ) -> Callable[[int], int]:
    def search(i: int) -> int:
        start = (i * batch) % (len(probes) - batch + 1)
        flat.search(probes[start:start + batch], K)
        return batch
    return search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="clustered")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--nprobe", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()

    gallery = generate(args.workdir / f"{args.registrations}-{args.variant}" / "input",
                       args.registrations, args.variant)
    vectors = np.vstack([np.load(f) for f in gallery.files]).astype(np.float32)
    print(f"{len(vectors):,} vectors: k-means of {NLIST} lists", flush=True)
    centroids, lists = float_lists(vectors)
    projection = _projection(vectors.shape[1], SIGN_BITS)
    codes = np.vstack([np.packbits(vectors[i:i + 100_000] @ projection > 0, axis=1)
                       for i in range(0, len(vectors), 100_000)])
    del vectors
    probes = np.packbits(gallery.probes.astype(np.float32) @ projection > 0, axis=1)
    probe_lists = centroids.search(gallery.probes.astype(np.float32), NLIST)[1]
    faiss.omp_set_num_threads(1)
    flat = faiss.IndexBinaryFlat(SIGN_BITS)
    flat.add(codes)
    ivf = binary_ivf(codes, lists)
    sizes = np.bincount(lists, minlength=NLIST)
    rows = []
    for batch in (1, 8, 64):
        seconds = per_query_seconds(flat_search(flat, probes, batch))
        rows.append({"scan": f"IndexBinaryFlat, batch {batch}", "codes_per_query": len(codes),
                     "ms_per_query": seconds * 1e3, "ns_per_code": seconds / len(codes) * 1e9})
    for nprobe in [*args.nprobe, NLIST]:
        scanned = float(np.mean(sizes[probe_lists[:, :nprobe]].sum(axis=1)))
        seconds = per_query_seconds(ivf_search(ivf, probes, probe_lists, nprobe))
        rows.append({"scan": f"IndexBinaryIVF, nprobe {nprobe}", "codes_per_query": scanned,
                     "ms_per_query": seconds * 1e3, "ns_per_code": seconds / scanned * 1e9})
    print(f"\n{args.registrations:,} registrations ({args.variant}), {SIGN_BITS}-bit codes, "
          f"k {K}, one thread, faiss {faiss.__version__}:")
    print(f"{'scan':32} {'codes/query':>12} {'ms/query':>9} {'ns/code':>8}")
    for row in rows:
        print(f"{row['scan']:32} {row['codes_per_query']:>12,.0f} {row['ms_per_query']:>9.3f} "
              f"{row['ns_per_code']:>8.2f}")
    out = RESULTS / f"binary-scan-{args.registrations}-{args.variant}.json"
    out.write_text(json.dumps({"registrations": args.registrations, "variant": args.variant,
                               "faiss": faiss.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
