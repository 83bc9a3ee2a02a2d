"""The peer a user would otherwise pick: Milvus Lite on the gallery of benchmarks/scale.py.

Loads the same registrations (from the scale benchmark's data directory) into Milvus Lite
(PyPI milvus-lite through pymilvus, its own index, inner product), searches the same probes
and reports insert rate, q/s with 1 and 8 client threads, p50/p99 and duplicate recall
against the same exact ground truth. Needs `pip install -e '.[bench]'`.

    .venv/bin/python benchmarks/milvus_peer.py --registrations 1000000 --index IVF_FLAT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import generate
from harness import run_threads
from scale import MATCH, ground_truth, open_gallery

RESULTS = Path(__file__).parent / "results"
COLLECTION = "gallery"


def load(client: MilvusClient, data_dir: Path, index_type: str, nlist: int) -> dict[str, float]:
    schema = client.create_schema(auto_id=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("registration_id", DataType.VARCHAR, max_length=128)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=512)
    params = client.prepare_index_params()
    extra = {"nlist": nlist} if index_type.startswith("IVF") else {}
    params.add_index("vector", index_type=index_type, metric_type="IP", params=extra)
    if client.has_collection(COLLECTION):
        client.drop_collection(COLLECTION)
    client.create_collection(COLLECTION, schema=schema, index_params=params)
    gallery = open_gallery(data_dir)
    started = time.monotonic()
    rows = 0
    try:
        for keys, matrix in gallery.store.iter_vectors(5_000):
            faces = gallery.store.faces(keys, with_vectors=False)
            client.insert(COLLECTION, [
                {"key": face.key, "registration_id": face.registration.registration_id,
                 "vector": vector.tolist()} for face, vector in zip(faces, matrix, strict=True)])
            rows += len(keys)
    finally:
        gallery.close(checkpoint=False)
    inserted = time.monotonic() - started
    # Without a flush Milvus Lite searches its growing segments, about 0.7 s a query even
    # at 20,000 rows (measured here); flushed and indexed it answers in milliseconds.
    client.flush(COLLECTION)
    client.load_collection(COLLECTION)
    return {"rows": rows, "insert_seconds": inserted, "insert_per_second": rows / inserted,
            "load_seconds": time.monotonic() - started - inserted}


def search(client: MilvusClient, probes: np.ndarray, threads: int, nprobe: int
           ) -> tuple[dict[str, float], list[set[str]]]:
    def worker() -> Callable[[int], set[str]]:
        def call(n: int) -> set[str]:
            hits = client.search(COLLECTION, data=[probes[n].tolist()], limit=100,
                                 output_fields=["registration_id"],
                                 search_params={"metric_type": "IP",
                                                "params": {"nprobe": nprobe}})[0]
            return {hit["entity"]["registration_id"] for hit in hits if hit["distance"] >= MATCH}
        return call

    stats, results = run_threads(len(probes), threads, worker)
    return stats, [r if isinstance(r, set) else set() for r in results]


def recall(found: list[set[str]], truth: list[set[str]]) -> float:
    expected = sum(len(t) for t in truth)
    return sum(len(f & t) for f, t in zip(found, truth, strict=True)) / max(1, expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--spectrum", default="iso")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--index", default="IVF_FLAT", help="Milvus index type")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--probes", type=int, default=1000)
    args = parser.parse_args()
    work = args.workdir / f"{args.registrations}-{args.spectrum}"
    gallery = generate(work / "input", args.registrations, args.spectrum, args.probes)
    truth = ground_truth(work / "data", gallery.probes)
    client = MilvusClient(str(work / "milvus.db"))
    result: dict[str, object] = {"registrations": args.registrations, "index": args.index,
                                 "load": load(client, work / "data", args.index, args.nlist)}
    print("load", json.dumps(result["load"]), flush=True)
    rows = []
    for nprobe in args.nprobe:
        row: dict[str, object] = {"nprobe": nprobe}
        for threads in (1, 8):
            count = len(gallery.probes) if threads > 1 else min(200, len(gallery.probes))
            stats, found = search(client, gallery.probes[:count], threads, nprobe)
            row[f"{threads}_clients"] = stats
            if count == len(gallery.probes):
                row["duplicate_recall"] = recall(found, truth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["searches"] = rows
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"milvus-{args.registrations}-{args.spectrum}-{args.index}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
