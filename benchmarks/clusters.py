"""FindClusters over whole galleries: time, rate, and how many planted fraud clusters it finds.

The scale galleries (benchmarks/gallery_data.py) register 5% of persons a second time under
another ID number ("FX..."): each such person is one planted cluster, all of its
registrations. For each gallery size, a `dedup serve` process on that gallery answers one
Investigate.FindClusters stream; the table shows the wall time, registrations searched per
second, clusters returned, planted clusters found exactly, and clusters matching none.

    .venv/bin/python benchmarks/clusters.py --sizes 100000 1000000

Galleries are generated and imported the first time (as in scale.py); writes
benchmarks/results/clusters.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import generate
from scale import RESULTS, Server, import_gallery

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc


def planted(files: list[Path]) -> list[frozenset[str]]:
    """Per person registered under a second ID number: all of that person's registrations."""
    persons: dict[str, set[str]] = {}
    frauds: set[str] = set()
    for npy in files:
        with open(npy.with_suffix(".csv"), newline="") as handle:
            for row in csv.DictReader(handle):
                person, _, capture = row["registration_id"].rpartition("-")
                persons.setdefault(person, set()).add(row["registration_id"])
                if capture == "x":
                    frauds.add(person)
    return [frozenset(persons[person]) for person in frauds]


def run(size: int, workdir: Path, kind: str) -> dict[str, float | int | str]:
    work = workdir / f"{size}-iso"
    gallery = generate(work / "input", size, "iso", probes=10)
    if not (work / "imported").exists():
        print(f"importing {gallery.registrations} registrations into {work / 'data'}")
        import_gallery(work / "data", gallery.files)
        (work / "imported").touch()
    expected = set(planted(gallery.files))
    server = Server(work / "data", kind, 64)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stats = pb_grpc.FaceDedupStub(channel).Stats(pb.StatsRequest())
            if stats.index_type != kind:  # the checkpoint held another type: rebuild first
                for _ in pb_grpc.IndexAdminStub(channel).Rebuild(
                        pb.RebuildRequest(index_factory=kind)):
                    pass
                stats = pb_grpc.FaceDedupStub(channel).Stats(pb.StatsRequest())
            started = time.monotonic()
            found: list[frozenset[str]] = []
            first_cluster_s = None
            for update in pb_grpc.InvestigateStub(channel).FindClusters(pb.FindClustersRequest(
                    case_id="BENCH", purpose="benchmark")):
                if update.HasField("cluster"):
                    first_cluster_s = first_cluster_s or time.monotonic() - started
                    found.append(frozenset(r.registration_id
                                           for r in update.cluster.registrations))
                else:
                    progress = update.progress
                    print(f"\r  {progress.searched:,}/{progress.total:,} searched, "
                          f"{progress.clusters:,} clusters", end="", flush=True)
            seconds = time.monotonic() - started
        print()
        peak_rss = server.peak_rss_gb()
    finally:
        server.stop()
    exact = sum(cluster in expected for cluster in found)
    return {"registrations": stats.registrations, "index_type": stats.index_type,
            "seconds": seconds, "per_second": stats.registrations / seconds,
            "first_cluster_s": first_cluster_s or 0.0, "clusters_returned": len(found),
            "planted": len(expected), "planted_found_exactly": exact,
            "recall": exact / max(1, len(expected)),
            "invented": sum(1 for cluster in found if cluster not in expected and
                            not any(cluster < planted_cluster for planted_cluster in expected)),
            "server_peak_rss_gb": peak_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--index-factory", default="auto",
                        help="auto: Flat (exact neighbours) below 200,000, BinarySign512 "
                        "(candidates from a job-local IVF, exact confirmation) from there")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        kind = args.index_factory if args.index_factory != "auto" else (
            "Flat" if size < 200_000 else "BinarySign512")
        print(f"FindClusters on {size:,} registrations ({kind})")
        rows.append(run(size, args.workdir, kind))
    print(f"\n{'registrations':>13} {'index':>14} {'seconds':>8} {'reg/s':>8} {'clusters':>9}"
          f" {'planted':>8} {'found':>7} {'recall':>7} {'invented':>8}")
    for row in rows:
        print(f"{row['registrations']:>13,} {row['index_type']:>14} {row['seconds']:>8.1f} "
              f"{row['per_second']:>8.0f} {row['clusters_returned']:>9,} {row['planted']:>8,} "
              f"{row['planted_found_exactly']:>7,} {row['recall']:>7.4f} {row['invented']:>8}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "clusters.json"
    path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
