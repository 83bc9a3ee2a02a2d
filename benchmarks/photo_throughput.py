"""Check with a photo over gRPC, beside insightface's own FaceAnalysis.get in a plain loop.

The photos are single-face captures cut at run time from the photos that ship in the
installed packages (t1.jpg, players.jpg) plus yaoming.jpg. Measured side by side in one run:
  - gRPC Check with the photo, at 1, 4 and 16 concurrent clients (threads in this process);
  - FaceAnalysis.get (detection + recognition, insightface defaults: one session per model,
    onnxruntime's default threads) on the same decoded photos, one after another.
Prints a table and writes JSON to benchmarks/results/photo_throughput.json.

    .venv/bin/python benchmarks/photo_throughput.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from dedup import ServerConfig, StoreConfig, create_server
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.face.model_pack import default_pack_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from photos import PLAYERS, T1, YAOMING, cut_single_faces

sys.path.insert(0, str(Path(__file__).parent))
from harness import grpc_checks, run_threads

RESULTS = Path(__file__).parent / "results"


def face_analysis():
    from insightface.app import FaceAnalysis

    analyzer = FaceAnalysis(name=str(default_pack_dir()), allowed_modules=["detection",
                                                                           "recognition"])
    analyzer.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    return analyzer


def load_photos(out: Path, analyzer) -> list[bytes]:
    detect = lambda image: analyzer.det_model.detect(image, max_num=0)  # noqa: E731
    crops = cut_single_faces(T1, out, detect) + cut_single_faces(PLAYERS, out, detect)
    photos = [c.path.read_bytes() for c in crops if min(c.box[2] - c.box[0],
                                                         c.box[3] - c.box[1]) >= 32]
    return [*photos, YAOMING.read_bytes()]


def grpc_photos(port: int, photos: list[bytes], clients: int, requests: int) -> dict[str, float]:
    checks = [pb.CheckRequest(face=pb.Face(image=photos[n % len(photos)]))
              for n in range(requests)]
    stats, _ = grpc_checks(port, checks, clients)
    return stats


def plain_loop(analyzer, photos: list[bytes], requests: int) -> dict[str, float]:
    decoded = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in photos]
    stats, _ = run_threads(requests, 1, lambda: lambda n: analyzer.get(decoded[n % len(decoded)]))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    args = parser.parse_args()
    analyzer = face_analysis()
    with tempfile.TemporaryDirectory(prefix="dedup-photo-bench-") as tmp:
        photos = load_photos(Path(tmp), analyzer)
        server, port = create_server(ServerConfig(store=StoreConfig(data_dir=Path(tmp) / "d")))
        server.start()
        try:
            grpc_photos(port, photos, 2, 20)  # warm-up
            rows = {f"grpc_check_photo_{c}_clients": grpc_photos(port, photos, c, args.requests)
                    for c in (1, 4, 16)}
        finally:
            server.stop()
    plain_loop(analyzer, photos, 10)  # warm-up
    rows["insightface_FaceAnalysis.get_loop"] = plain_loop(analyzer, photos, args.requests)

    base = rows["insightface_FaceAnalysis.get_loop"]["qps"]
    print(f"\nCheck with a photo over gRPC vs FaceAnalysis.get, {len(photos)} distinct "
          f"single-face photos, {args.requests} requests per row")
    print(f"{'':36} {'photos/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs loop':>8}")
    for name, row in rows.items():
        print(f"{name:36} {row['qps']:9.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
              f"{row['errors']:7.0f} {row['qps'] / base:8.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "photo_throughput.json"
    out.write_text(json.dumps({"photos": len(photos), "requests": args.requests,
                               "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
