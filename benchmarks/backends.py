"""The two backends side by side in one run, on the same data, over gRPC.

For each backend (embedded LMDB + FAISS Flat; Milvus, by default Milvus Lite from a local
file with its FLAT index) a server is started on an empty gallery, then:
  - enrol: --registrations face-like registrations through EnrollStream (no check), and
    --checked new persons by Enroll with check_first, one client: registrations/s;
  - check: --probes Check calls (a fresh capture of an enrolled person, claiming its ID),
    with 1 and with --clients clients: q/s, p50, p99;
  - duplicate recall: 5% of persons are registered again under a second ID number; of the
    registrations each duplicate probe truly matches (exact cosine >= the match threshold,
    computed here with numpy), the share its Check lists.
Prints a table and writes benchmarks/results/backends-N.json.

    .venv/bin/python benchmarks/backends.py --registrations 20000
    .venv/bin/python benchmarks/backends.py --milvus-uri http://milvus:19530   # a cluster
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from dedup import FaceGenerator, Policy, ServerConfig, StoreConfig, create_server
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.settings import MilvusConfig

sys.path.insert(0, str(Path(__file__).parent))
from harness import grpc_checks

RESULTS = Path(__file__).parent / "results"
MATCH = Policy().match_threshold


def face(vector: np.ndarray) -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=vector.tolist()))


def population(count: int, seed: int) -> tuple[list[pb.Registration], np.ndarray, np.ndarray]:
    """Registrations, their embeddings, and each one's person (5% of persons twice)."""
    generator = FaceGenerator(seed)
    persons = generator.persons(int(count / 1.05))
    twice = persons[: count - len(persons)]
    vectors = np.vstack([generator.captures(persons), generator.captures(twice)])
    person_of = np.concatenate([np.arange(len(persons)), np.arange(len(twice))])
    registrations = [pb.Registration(registration_id=f"r{i}",
                                     id_number=f"ID{i if i < len(persons) else 'D' + str(i)}")
                     for i in range(len(vectors))]
    return registrations, vectors.astype(np.float32), person_of


def enrol_stream(stub: pb_grpc.FaceDedupStub, registrations: list[pb.Registration],
                 vectors: np.ndarray) -> float:
    def requests() -> Iterator[pb.EnrollRequest]:
        for registration, vector in zip(registrations, vectors, strict=True):
            yield pb.EnrollRequest(registration=registration, face=face(vector))

    started = time.perf_counter()
    failed = [r for r in stub.EnrollStream(requests()) if r.HasField("error")]
    elapsed = time.perf_counter() - started
    if failed:
        raise SystemExit(f"enrolment failed: {failed[0].error}")
    return len(registrations) / elapsed


def enrol_checked(stub: pb_grpc.FaceDedupStub, vectors: np.ndarray) -> float:
    started = time.perf_counter()
    for i, vector in enumerate(vectors):
        stub.Enroll(pb.EnrollRequest(registration=pb.Registration(
            registration_id=f"new{i}", id_number=f"NEW{i}"), face=face(vector),
            check_first=True))
    return len(vectors) / (time.perf_counter() - started)


def measure(config: ServerConfig, data: tuple, probes: np.ndarray, claimed: list[str],
            truth: list[set[str]], duplicate_probes: list[int], args: argparse.Namespace
            ) -> dict[str, float]:
    registrations, vectors, _ = data
    server, port = create_server(config)
    server.start()
    try:
        stub = pb_grpc.FaceDedupStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        row = {"enrol_stream_per_s": enrol_stream(stub, registrations, vectors)}
        server.gallery.checkpoint()  # Milvus Lite: searched flushed, as after its interval
        fresh = FaceGenerator(args.seed + 1).persons(args.checked)
        row["enrol_check_first_per_s"] = enrol_checked(stub, fresh)
        server.gallery.checkpoint()
        requests = [pb.CheckRequest(face=face(probe), claimed_id_number=claim,
                                    max_candidates=20)
                    for probe, claim in zip(probes, claimed, strict=True)]
        for clients in (1, args.clients):
            stats, answers = grpc_checks(port, requests, clients)
            row |= {f"check_{clients}c_{key}": value for key, value in stats.items()}
        row["duplicate_recall"] = recall(answers, truth, duplicate_probes)
        return row
    finally:
        server.stop(grace=1.0)


def recall(answers: list, truth: list[set[str]], which: list[int]) -> float:
    expected = found = 0
    for n in which:
        answer = answers[n]
        listed = {m.registration.registration_id for m in answer.matches
                  if m.score >= MATCH} if isinstance(answer, pb.CheckResponse) else set()
        expected += len(truth[n])
        found += len(truth[n] & listed)
    return found / max(1, expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=20_000)
    parser.add_argument("--checked", type=int, default=300)
    parser.add_argument("--probes", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--milvus-uri", default="", help="default: Milvus Lite in a temp dir")
    args = parser.parse_args()

    data = population(args.registrations, args.seed)
    registrations, vectors, person_of = data
    generator = FaceGenerator(args.seed + 2)
    rng = np.random.default_rng(args.seed)
    duplicated = np.flatnonzero(np.bincount(person_of) > 1)
    chosen = np.concatenate([rng.choice(duplicated, args.probes // 2),
                             rng.choice(len(np.bincount(person_of)), args.probes // 2)])
    first_of = {int(p): i for i, p in reversed(list(enumerate(person_of)))}
    probes = np.vstack([generator.capture(vectors[first_of[int(p)]]) for p in chosen])
    claimed = [registrations[first_of[int(p)]].id_number for p in chosen]
    scores = probes @ vectors.T  # exact ground truth
    truth = [{registrations[j].registration_id for j in np.flatnonzero(row >= MATCH)}
             for row in scores]
    duplicate_probes = list(range(args.probes // 2))

    with tempfile.TemporaryDirectory(prefix="dedup-backends-") as work:
        milvus = MilvusConfig(uri=args.milvus_uri or str(Path(work) / "milvus.db"),
                              flush_interval_s=1.0 if not args.milvus_uri else None)
        backends = {
            "embedded (LMDB + FAISS Flat)": ServerConfig(
                store=StoreConfig(data_dir=Path(work) / "embedded")),
            f"milvus ({'Lite' if milvus.is_lite else milvus.uri}, FLAT)": ServerConfig(
                store=StoreConfig(data_dir=Path(work) / "node"), milvus=milvus),
        }
        results = {name: measure(config, data, probes, claimed, truth, duplicate_probes, args)
                   for name, config in backends.items()}
    print_table(results, args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"backends-{args.registrations}.json"
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "results": results}, indent=2))
    print(f"wrote {out}")


def print_table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    c = args.clients
    print(f"\n{args.registrations:,} registrations, {args.probes:,} Check probes (half of them "
          f"duplicated persons), {c} clients\n")
    print(f"| backend | enrol/s (stream) | enrol/s (check_first) | Check q/s 1c | p50 ms | "
          f"p99 ms | Check q/s {c}c | p50 ms | p99 ms | duplicate recall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['enrol_stream_per_s']:,.0f} | {r['enrol_check_first_per_s']:,.1f} "
              f"| {r['check_1c_qps']:,.1f} | {r['check_1c_p50_ms']:.1f} | "
              f"{r['check_1c_p99_ms']:.1f} | {r[f'check_{c}c_qps']:,.1f} | "
              f"{r[f'check_{c}c_p50_ms']:.1f} | {r[f'check_{c}c_p99_ms']:.1f} | "
              f"{r['duplicate_recall']:.3f} |")


if __name__ == "__main__":
    main()
