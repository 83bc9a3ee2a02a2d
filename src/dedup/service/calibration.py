"""Thresholds for a target false-positive identification rate at a gallery size.

One search compares the probe with all N registrations, so a non-mated search raises a false
alarm if any of N impostor comparisons reaches T:
    FPIR(N, T) = 1 - (1 - FMR(T))^N   (about N * FMR(T) while that is small),
where FMR(T) is the single-comparison false-match rate. For a target FPIR f at size N the
per-comparison rate must be FMR* = 1 - (1 - f)^(1/N). Measuring FMR* directly needs far more
impostor comparisons than any labelled set holds (about 1e-9 for f = 0.001 at N = 1e6), so
the impostor score distribution is modelled as a normal distribution fitted to the labelled
set's impostor comparisons (cosines of unrelated faces in 512 dimensions are close to
normal), and T = mean + sd * z(1 - FMR*). The empirical FMR at T is reported beside it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from dedup.core.files import open_private, private_dir

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class ImpostorModel:
    mean: float
    sd: float
    comparisons: int
    source: str = ""
    made_at: str = ""

    @classmethod
    def fit(cls, scores: npt.NDArray[np.float64], source: str) -> ImpostorModel:
        finite = np.asarray(scores, np.float64)
        finite = finite[np.isfinite(finite)]
        if len(finite) < 2:
            raise ValueError("at least 2 impostor comparisons are needed to calibrate")
        return cls(float(finite.mean()), float(finite.std(ddof=1)), len(finite), source,
                   datetime.now(UTC).isoformat(timespec="seconds"))

    def fmr(self, threshold: float) -> float:
        """Single-comparison false-match rate at `threshold` under the model."""
        return 0.5 * math.erfc((threshold - self.mean) / (self.sd * math.sqrt(2.0)))

    def fpir(self, threshold: float, gallery_size: int) -> float:
        # 1 - (1 - p)^N, computed without losing a tiny p to rounding.
        return -math.expm1(gallery_size * math.log1p(-min(self.fmr(threshold), 1 - 1e-16)))

    def threshold(self, target_fpir: float, gallery_size: int) -> float:
        per_comparison = per_comparison_fmr(target_fpir, gallery_size)
        return self.mean + self.sd * NormalDist().inv_cdf(1.0 - per_comparison)


def per_comparison_fmr(target_fpir: float, gallery_size: int) -> float:
    if not 0.0 < target_fpir < 1.0:
        raise ValueError(f"the target FPIR must be in (0, 1), got {target_fpir}")
    if gallery_size < 1:
        raise ValueError(f"the gallery size must be at least 1, got {gallery_size}")
    return -math.expm1(math.log1p(-target_fpir) / gallery_size)


@dataclass(frozen=True)
class Recommendation:
    match_threshold: float
    review_threshold: float
    explanation: list[str]


def recommend(model: ImpostorModel, target_fpir: float, gallery_size: int,
              review_fpir: float | None = None,
              empirical: npt.NDArray[np.float64] | None = None) -> Recommendation:
    """match_threshold for `target_fpir`; review_threshold for `review_fpir` (default ten
    times the target: that share of honest applicants is looked at by a person)."""
    review_fpir = min(0.5, 10 * target_fpir) if review_fpir is None else review_fpir
    match = model.threshold(target_fpir, gallery_size)
    review = model.threshold(review_fpir, gallery_size)
    fmr_match = per_comparison_fmr(target_fpir, gallery_size)
    lines = [
        f"gallery size N = {gallery_size:,}; target FPIR f = {target_fpir:g}",
        f"per-comparison FMR needed: 1 - (1 - f)^(1/N) = {fmr_match:.3g} (about f / N)",
        f"impostor scores: {model.comparisons:,} comparisons, mean {model.mean:.4f}, "
        f"sd {model.sd:.4f} (normal model)",
        f"match_threshold = mean + sd * z(1 - {fmr_match:.3g}) = {model.mean:.4f} + "
        f"{model.sd:.4f} * {NormalDist().inv_cdf(1 - fmr_match):.3f} = {match:.4f}",
        f"review_threshold: the same for FPIR {review_fpir:g} = {review:.4f}",
    ]
    if empirical is not None and len(empirical):
        seen = float(np.mean(empirical >= match))
        lines.append(f"empirical FMR at {match:.4f} in the labelled set: {seen:.3g} "
                     f"({int(np.sum(empirical >= match))} of {len(empirical):,}); the set "
                     f"resolves FMR down to {1 / len(empirical):.3g} only")
    return Recommendation(match, review, lines)


def save(model: ImpostorModel, data_dir: Path) -> Path:
    """Records the model beside the store (temp file of mode 0600, fsync, rename): Stats then
    shows the FPIR the server's thresholds imply at its gallery size."""
    path = private_dir(data_dir) / CALIBRATION_FILE
    partial = path.with_name(path.name + ".tmp")
    with open_private(partial, "w") as handle:
        json.dump(asdict(model), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def load(data_dir: Path) -> ImpostorModel | None:
    path = data_dir / CALIBRATION_FILE
    try:
        return ImpostorModel(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a calibration record ({error})") from error
