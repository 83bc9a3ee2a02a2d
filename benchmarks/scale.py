"""Large galleries: import rate, index types, Check over gRPC, duplicate recall, rebuilds.

For one gallery (default 1,000,000 face-like registrations) measured in one run:
  1. `dedup import` offline: registrations/s;
  2. exact ground truth: for each probe, every registration scoring >= the match threshold;
  3. per index type and search parameter: build time, index bytes per vector, Check over
     gRPC against a `dedup serve` process at 1, 8 and 32 clients (q/s, p50, p99), duplicate
     recall (share of the ground-truth pairs the Check returns), and the same index searched
     by raw FAISS in this process, one query at a time (our overhead as a ratio);
  4. a live rebuild to BinarySign512 through IndexAdmin.Rebuild while 8 clients keep
     checking: its time, and Check p99 during it against before it.
Prints a table and writes JSON to benchmarks/results/scale-<N>-<spectrum>.json.

    .venv/bin/python benchmarks/scale.py --registrations 1000000 --workdir /tmp/dedup-scale
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import grpc
import numpy as np

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.settings import IndexConfig, Limits, StoreConfig
from dedup.face.model_pack import RECOGNISER, model_id_for, resolve_model_dir
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index import SearchOptions, load_index

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import generate
from harness import grpc_checks

RESULTS = Path(__file__).parent / "results"
MATCH = 0.40
# After "@": the sweep of the search parameter, nprobe for IVF types and the number of
# candidates re-ranked for BinarySign types.
DEFAULT_KINDS = ["Flat", "BinarySign512@64,256", "BinarySign256@256", "IVF4096,SQ8@16,64,256",
                 "IVF4096,PQ64@64,256"]


def model_id() -> str:
    return model_id_for(resolve_model_dir(None) / RECOGNISER)


def open_gallery(data_dir: Path) -> EmbeddedGallery:
    """The benchmark's own access to a data directory no server holds.

    Its in-memory index is a BinarySign512 (64 bytes a vector): an exact one would need
    20 GB at 10,000,000 registrations.
    """
    return EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id(), IndexConfig("BinarySign512"),
                   background=False)


def import_gallery(data_dir: Path, files: list[Path]) -> dict[str, float]:
    from dedup.ops.bulk_import import import_offline

    gallery = open_gallery(data_dir)
    started = time.monotonic()
    try:
        report = import_offline(gallery, files, Limits())
    finally:
        gallery.close(checkpoint=True)
    elapsed = time.monotonic() - started
    return {"imported": report.imported, "seconds": elapsed,
            "per_second": report.imported / elapsed}


def ground_truth(data_dir: Path, probes: np.ndarray) -> list[set[str]]:
    """Per probe, the registration_ids at or above the match threshold under exact search."""
    gallery = open_gallery(data_dir)
    try:
        hits: list[list[int]] = [[] for _ in probes]
        for keys, matrix in gallery.store.iter_vectors(200_000):  # exact, block by block
            keys_array = np.asarray(keys)
            rows, columns = np.nonzero(probes @ matrix.T >= MATCH)
            for row, column in zip(rows, columns, strict=True):
                hits[row].append(int(keys_array[column]))
        return [{face.registration.registration_id
                 for face in gallery.store.faces(found, with_vectors=False)} for found in hits]
    finally:
        gallery.close(checkpoint=False)


def build(data_dir: Path, kind: str) -> dict[str, float]:
    gallery = open_gallery(data_dir)
    started = time.monotonic()
    try:
        built = gallery.build_offline(kind, lambda *_: None)
    finally:
        gallery.close(checkpoint=False)
    size = (data_dir / "index.ckpt").stat().st_size
    return {"build_seconds": time.monotonic() - started,
            "bytes_per_vector": size / max(1, len(built.index))}


class Server:
    def __init__(self, data_dir: Path, kind: str, parameter: int) -> None:
        flag = "--rerank-candidates" if kind.startswith("Binary") else "--nprobe"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dedup", "serve", "--data-dir", str(data_dir),
             "--address", "127.0.0.1:0", "--index-factory", kind, flag, str(parameter)],
            stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if match := re.search(r"serving on 127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError("the server did not start")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def peak_rss_gb(self) -> float:
        """The server process's peak resident memory (VmHWM), file-backed LMDB pages included."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20  # type: ignore[union-attr]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=600)


def recall(responses: list[pb.CheckResponse | BaseException | None], truth: list[set[str]]
           ) -> float:
    expected = found = 0
    for response, wanted in zip(responses, truth, strict=True):
        if not isinstance(response, pb.CheckResponse) or not wanted:
            continue
        returned = {m.registration.registration_id for m in response.matches}
        expected += len(wanted)
        found += len(wanted & returned)
    return found / max(1, expected)


def raw_faiss(data_dir: Path, probes: np.ndarray, nprobe: int, k: int) -> float:
    index, _ = load_index(data_dir / "index.ckpt", probes.shape[1], model_id())
    faiss.omp_set_num_threads(1)
    count = min(len(probes), 300)
    started = time.perf_counter()
    for vector in probes[:count]:
        index.search(vector.reshape(1, -1), k, SearchOptions(nprobe=nprobe))
    return count / (time.perf_counter() - started)


def measure_kind(data_dir: Path, kind: str, nprobes: list[int], requests: list[pb.CheckRequest],
                 truth: list[set[str]], probes: np.ndarray, client_counts: list[int]
                 ) -> list[dict[str, object]]:
    built = build(data_dir, kind)
    rows = []
    for nprobe in nprobes:
        server = Server(data_dir, kind, nprobe)
        try:
            grpc_checks(server.port, requests[:50], 2)  # warm-up
            row: dict[str, object] = {"index": kind, "parameter": nprobe if kind != "Flat"
                                      else None, **built}
            for clients in client_counts:
                # Exact search over a large gallery is slow: fewer single-client queries.
                count = len(requests) if clients > 1 or kind != "Flat" else 200
                stats, responses = grpc_checks(server.port, requests[:count], clients)
                row[f"{clients}_clients"] = stats
                if count == len(requests):
                    row["duplicate_recall"] = recall(responses, truth)
            row["server_peak_rss_gb"] = server.peak_rss_gb()
        finally:
            server.stop()
        k = 64 if kind == "Flat" else nprobe if kind.startswith("Binary") \
            else IndexConfig().rerank_candidates
        row["raw_faiss_qps_1_thread"] = raw_faiss(data_dir, probes, nprobe, k)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def live_rebuild(data_dir: Path, requests: list[pb.CheckRequest]) -> dict[str, float]:
    """Check p99 at 8 clients before and during a live rebuild of a BinarySign512 index."""
    build(data_dir, "BinarySign512")
    server = Server(data_dir, "BinarySign512", 64)
    try:
        before, _ = grpc_checks(server.port, requests[:400], 8)
        done = threading.Event()
        timing: dict[str, float] = {}

        def rebuild() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                started = time.monotonic()
                for _ in pb_grpc.IndexAdminStub(channel).Rebuild(
                        pb.RebuildRequest(index_factory="BinarySign512")):
                    pass
                timing["seconds"] = time.monotonic() - started
            done.set()

        worker = threading.Thread(target=rebuild)
        worker.start()
        during = []
        while not done.is_set():
            stats, _ = grpc_checks(server.port, requests[:200], 8)
            during.append(stats)
        worker.join()
    finally:
        server.stop()
    return {"rebuild_seconds": timing["seconds"], "p99_before_ms": before["p99_ms"],
            "p99_during_ms": max(d["p99_ms"] for d in during),
            "qps_before": before["qps"], "qps_during": statistics.median(d["qps"] for d in during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--spectrum", choices=["iso", "uneven"], default="iso")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS,
                        help="index types, each optionally @nprobe,nprobe,...")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--skip-rebuild", action="store_true")
    args = parser.parse_args()

    name = f"{args.registrations}-{args.spectrum}"
    work = args.workdir / name
    gallery = generate(work / "input", args.registrations, args.spectrum, args.probes)
    data_dir = work / "data"
    result: dict[str, object] = {"registrations": gallery.registrations,
                                 "spectrum": args.spectrum}
    done_marker = work / "imported"
    if not done_marker.exists():  # an interrupted import resumes, skipping what is stored
        result["import"] = import_gallery(data_dir, gallery.files)
        print("import", json.dumps(result["import"]), flush=True)
        done_marker.touch()
    truth = ground_truth(data_dir, gallery.probes)
    requests = [pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(values=v.tolist())),
                                claimed_id_number=c, max_candidates=100)
                for v, c in zip(gallery.probes, gallery.probe_ids, strict=True)]
    rows = []
    for spec in args.kinds:
        kind, _, sweep = spec.partition("@")
        nprobes = [int(n) for n in sweep.split(",")] if sweep else [64]
        rows += measure_kind(data_dir, kind, nprobes, requests, truth, gallery.probes,
                             args.clients)
    result["indexes"] = rows
    if not args.skip_rebuild:
        result["live_rebuild"] = live_rebuild(data_dir, requests)
        print("rebuild", json.dumps(result["live_rebuild"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scale-{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")


def print_table(result: dict[str, object]) -> None:
    print(f"\n{result['registrations']:,} registrations ({result['spectrum']})")
    header = (f"{'index':28} {'param':>6} {'build s':>8} {'B/vec':>6} {'recall':>7}"
              f" {'q/s@1':>7} {'q/s@8':>7} {'q/s@32':>7} {'p50@8':>7} {'p99@8':>7} {'raw q/s':>8}")
    print(header)
    for row in result["indexes"]:  # type: ignore[attr-defined]
        def get(clients: str, field: str, row: dict = row) -> float:
            return float(row.get(clients, {}).get(field, float("nan")))

        print(f"{row['index']:28} {row['parameter'] or '':>6} {row['build_seconds']:8.1f} "
              f"{row['bytes_per_vector']:6.0f} {row['duplicate_recall']:7.4f} "
              f"{get('1_clients', 'qps'):7.1f} {get('8_clients', 'qps'):7.1f} "
              f"{get('32_clients', 'qps'):7.1f} {get('8_clients', 'p50_ms'):7.1f} "
              f"{get('8_clients', 'p99_ms'):7.1f} {row['raw_faiss_qps_1_thread']:8.1f}")


if __name__ == "__main__":
    main()
