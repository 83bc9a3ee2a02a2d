"""Check over gRPC against the same searches done directly on a FAISS IndexFlatIP.

Builds a gallery of --gallery registrations (face-like synthetic embeddings, two captures
per person), serves it on a loopback port, and measures, side by side in one run:
  - gRPC Check with 1 client and with --clients concurrent clients (threads in this process,
    so the clients share the machine's cores with the server);
  - raw FAISS: IndexFlatIP.search of the same probes, one query at a time, from one thread
    and from two (one per core), as the server runs them.
Prints a table and writes JSON to benchmarks/results/check_throughput.json.

    .venv/bin/python benchmarks/check_throughput.py --gallery 100000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from dedup import FaceGenerator, ServerConfig, StoreConfig, create_server
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core.records import Registration
from dedup.face.model_pack import RECOGNISER, model_id_for, resolve_model_dir
from dedup.gallery.embedded.gallery import EmbeddedGallery

sys.path.insert(0, str(Path(__file__).parent))
from harness import grpc_checks, run_threads

RESULTS = Path(__file__).parent / "results"


def server_model_id() -> str:
    """The default server's model id, so that the synthetic gallery is searched by it."""
    return model_id_for(resolve_model_dir(None) / RECOGNISER)


def build_gallery(data_dir: Path, gallery: int, seed: int) -> np.ndarray:
    """Two captures per person under the person's ID number; returns the person vectors."""
    generator = FaceGenerator(seed)
    persons = generator.persons(gallery // 2)
    store = EmbeddedGallery(StoreConfig(data_dir=data_dir), server_model_id(), background=False)
    batch = 5_000
    with tqdm(total=gallery, desc="building gallery", unit="reg") as progress:
        for start in range(0, len(persons), batch // 2):
            chunk = persons[start:start + batch // 2]
            rows = []
            for capture_no in range(2):
                captures = generator.captures(chunk)
                rows += [(Registration(f"reg-{start + i}-{capture_no}", f"ID{start + i:09d}"),
                          captures[i]) for i in range(len(chunk))]
            store.insert_many(rows)
            progress.update(len(rows))
    store.close(checkpoint=True)
    return persons


def probes(persons: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    generator = FaceGenerator(seed + 1)
    chosen = generator.rng.choice(len(persons), size=count, replace=False)
    return generator.captures(persons[chosen]), [f"ID{i:09d}" for i in chosen]


def grpc_check(port: int, vectors: np.ndarray, claimed: list[str], clients: int
               ) -> dict[str, float]:
    requests = [pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(values=v.tolist())),
                                claimed_id_number=c) for v, c in zip(vectors, claimed, strict=True)]
    stats, responses = grpc_checks(port, requests, clients)
    same = sum(isinstance(r, pb.CheckResponse) and r.verdict == pb.SAME_PERSON for r in responses)
    return {**stats, "same_person_share": same / len(responses)}


def load_flat_index(data_dir: Path) -> faiss.IndexFlatIP:
    gallery = EmbeddedGallery(StoreConfig(data_dir=data_dir), server_model_id(), background=False)
    matrix = np.vstack([m for _, m in gallery.store.iter_vectors()])
    gallery.close(checkpoint=False)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    return index


def raw_faiss(index: faiss.IndexFlatIP, vectors: np.ndarray, threads: int) -> dict[str, float]:
    """Single-query searches from `threads` Python threads, one OpenMP thread each."""
    def worker() -> Callable[[int], object]:
        faiss.omp_set_num_threads(1)
        return lambda n: index.search(vectors[n].reshape(1, -1), 64)

    stats, _ = run_threads(len(vectors), threads, worker)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        persons = build_gallery(data_dir, args.gallery, args.seed)
        vectors, claimed = probes(persons, args.queries, args.seed)
        server, port = create_server(ServerConfig(store=StoreConfig(data_dir=data_dir)))
        server.start()
        try:
            grpc_check(port, vectors[:50], claimed[:50], 1)  # warm-up
            rows = {
                "grpc_check_1_client": grpc_check(port, vectors, claimed, 1),
                f"grpc_check_{args.clients}_clients": grpc_check(port, vectors, claimed,
                                                                  args.clients),
            }
        finally:
            server.stop()
        index = load_flat_index(data_dir)
        rows["raw_faiss_flat_ip_1_thread"] = raw_faiss(index, vectors, 1)
        rows["raw_faiss_flat_ip_2_threads"] = raw_faiss(index, vectors, 2)

    base = rows["raw_faiss_flat_ip_1_thread"]
    print(f"\nCheck over gRPC vs raw FAISS IndexFlatIP, gallery {args.gallery:,}, "
          f"{args.queries:,} queries, batch 1")
    print(f"{'':32} {'q/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'q/s vs FAISS':>13}")
    for name, row in rows.items():
        print(f"{name:32} {row['qps']:8.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
              f"{row['qps'] / base['qps']:13.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "check_throughput.json"
    out.write_text(json.dumps({
        "gallery": args.gallery, "queries": args.queries, "clients": args.clients,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "faiss": faiss.__version__},
        "results": rows,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
