"""How the false-positive identification rate of a fixed threshold grows with the gallery.

Synthetic face-like galleries (benchmarks/gallery_data.py persons; "uneven": a decaying
spectrum under a random rotation, as real embeddings have; "iso": isotropic) of 1,000 up to
1,000,000 registrations; non-mated probes are persons not in the gallery. For each size and
threshold: the measured FPIR (share of probes whose best score reaches the threshold) beside
the prediction 1 - (1 - FMR(T))^N of the normal model fitted to single impostor comparisons
(what `dedup calibrate` uses), and the threshold `dedup calibrate` would recommend for
FPIR 0.01 at that size.

    .venv/bin/python benchmarks/fpir_growth.py [--spectrum uneven] [--probes 2000]

Prints a table and writes benchmarks/results/fpir-growth-<spectrum>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import DIMENSION, persons_of, spectrum

from dedup.service.calibration import ImpostorModel, recommend

RESULTS = Path(__file__).parent / "results"
SIZES = [1_000, 10_000, 100_000, 1_000_000]
THRESHOLDS = [0.20, 0.25, 0.30, 0.40]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spectrum", choices=["iso", "uneven"], default="uneven")
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    args = parser.parse_args()
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(11)
    scale = spectrum(args.spectrum, rng)
    rotation = None if args.spectrum == "iso" else np.linalg.qr(
        rng.standard_normal((DIMENSION, DIMENSION)))[0].astype(np.float32)
    gallery = persons_of(rng, max(args.sizes), scale, rotation)
    probes = persons_of(rng, args.probes, scale, rotation)
    # The calibration sample: single comparisons of the probes with the first 1,000.
    impostors = (probes @ gallery[:1000].T).ravel().astype(np.float64)
    model = ImpostorModel.fit(impostors, f"{args.spectrum} synthetic")
    rows = []
    for size in sorted(args.sizes):
        index = faiss.IndexFlatIP(DIMENSION)
        index.add(gallery[:size])
        best = index.search(probes, 1)[0][:, 0]
        row = {"gallery": size,
               "threshold_for_fpir_0.01": recommend(model, 0.01, size).match_threshold}
        for threshold in THRESHOLDS:
            row[f"measured_{threshold}"] = float(np.mean(best >= threshold))
            row[f"model_{threshold}"] = model.fpir(threshold, size)
        rows.append(row)
    print(f"{args.spectrum} spectrum: {args.probes} non-mated probes; impostor comparisons "
          f"mean {model.mean:.4f}, sd {model.sd:.4f} over {model.comparisons:,}")
    header = "".join(f"  FPIR@{t:.2f} meas/model" for t in THRESHOLDS)
    print(f"{'gallery':>10}{header}  T for FPIR 0.01")
    for row in rows:
        cells = "".join(f"  {row[f'measured_{t}']:>9.4f}/{row[f'model_{t}']:<9.4f}"
                        for t in THRESHOLDS)
        print(f"{row['gallery']:>10,}{cells}  {row['threshold_for_fpir_0.01']:.4f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fpir-growth-{args.spectrum}.json"
    path.write_text(json.dumps({"spectrum": args.spectrum, "probes": args.probes,
                                "impostor_mean": model.mean, "impostor_sd": model.sd,
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
