"""1:N identification error rates, as NIST's face recognition evaluations define them.

A *mated* search probes with a person who is enrolled; a *non-mated* one with a person who
is not. At threshold T:
- FPIR(T): the share of non-mated searches returning any candidate scoring >= T;
- FNIR(T): the share of mated searches whose mate does not score >= T (or is not returned);
- rank-r hit rate: the share of mated searches with a mate among the r best candidates,
  whatever its score (investigation mode).
The threshold for a target FPIR f is the lowest T with FPIR(T) <= f; with n non-mated
searches it is resolved only down to f = 1/n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FPIR_TARGETS = (0.1, 0.01, 0.003, 0.001)
NOT_FOUND_SCORE = -math.inf
NOT_FOUND_RANK = math.inf

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SearchOutcomes:
    """Per mated search: its best mate's score and rank (1 = first; NOT_FOUND_* if no mate
    was returned). Per non-mated search: the best candidate's score."""

    mate_scores: Floats
    mate_ranks: Floats
    nonmated_top_scores: Floats
    # Every score between a probe and an enrolled registration of another person, for the
    # single-comparison (1:1) impostor distribution that calibration fits.
    impostor_scores: Floats = field(default_factory=lambda: np.empty(0))


def fpir(nonmated_top_scores: Floats, threshold: float) -> float:
    if not len(nonmated_top_scores):
        return math.nan
    return float(np.mean(nonmated_top_scores >= threshold))


def fnir(mate_scores: Floats, threshold: float) -> float:
    if not len(mate_scores):
        return math.nan
    return float(np.mean(mate_scores < threshold))


def threshold_for_fpir(nonmated_top_scores: Floats, target: float) -> tuple[float, bool]:
    """The lowest threshold with FPIR <= target, and whether n searches resolve the target
    (at least one non-mated search allowed above it: n * target >= 1)."""
    ordered = np.sort(np.asarray(nonmated_top_scores, np.float64))[::-1]
    allowed = math.floor(target * len(ordered) + 1e-9)
    if allowed >= len(ordered):
        return -math.inf, True
    # Just above the (allowed+1)-th highest score: exactly `allowed` searches reach it.
    return float(np.nextafter(ordered[allowed], math.inf)), allowed >= 1


def rank_hit_rate(mate_ranks: Floats, rank: int) -> float:
    if not len(mate_ranks):
        return math.nan
    return float(np.mean(mate_ranks <= rank))


def det_curve(outcomes: SearchOutcomes) -> tuple[Floats, Floats]:
    """FPIR and FNIR at every threshold where either changes, FPIR descending."""
    finite = np.concatenate([outcomes.mate_scores, outcomes.nonmated_top_scores])
    thresholds = np.unique(finite[np.isfinite(finite)])
    fpirs = np.array([fpir(outcomes.nonmated_top_scores, t) for t in thresholds])
    fnirs = np.array([fnir(outcomes.mate_scores, t) for t in thresholds])
    return fpirs, fnirs


def report(outcomes: SearchOutcomes, targets: tuple[float, ...] = FPIR_TARGETS
           ) -> dict[str, object]:
    """The figures `dedup evaluate` writes to JSON."""
    at_targets = []
    for target in targets:
        threshold, resolved = threshold_for_fpir(outcomes.nonmated_top_scores, target)
        at_targets.append({
            "target_fpir": target, "threshold": threshold, "resolved": resolved,
            "fpir": fpir(outcomes.nonmated_top_scores, threshold),
            "fnir": fnir(outcomes.mate_scores, threshold)})
    return {
        "mated_searches": len(outcomes.mate_scores),
        "nonmated_searches": len(outcomes.nonmated_top_scores),
        "impostor_comparisons": len(outcomes.impostor_scores),
        "at_fpir": at_targets,
        "rank1_hit_rate": rank_hit_rate(outcomes.mate_ranks, 1),
        "rank10_hit_rate": rank_hit_rate(outcomes.mate_ranks, 10),
        "genuine_scores": _summary(outcomes.mate_scores),
        "impostor_top_scores": _summary(outcomes.nonmated_top_scores),
        "impostor_comparison_scores": _summary(outcomes.impostor_scores),
    }


def _summary(scores: Floats) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return {"count": 0}
    return {"count": len(finite), "mean": float(finite.mean()),
            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
            "min": float(finite.min()), "p50": float(np.median(finite)),
            "max": float(finite.max())}


def draw(outcomes: SearchOutcomes, det_png: str, histogram_png: str) -> None:
    """A DET plot (FNIR against FPIR, log scales) and the two score histograms."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fpirs, fnirs = det_curve(outcomes)
    floor_fpir = 0.5 / max(1, len(outcomes.nonmated_top_scores))
    floor_fnir = 0.5 / max(1, len(outcomes.mate_scores))
    figure, axes = plt.subplots(figsize=(6, 5))
    axes.step(np.maximum(fpirs, floor_fpir), np.maximum(fnirs, floor_fnir), where="post")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("FPIR (non-mated searches with a candidate >= T)")
    axes.set_ylabel("FNIR (mated searches whose mate scores < T)")
    axes.set_title("DET, 1:N identification")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(det_png, dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4))
    bins = [float(b) for b in np.linspace(-0.3, 1.0, 66)]
    for scores, label in ((outcomes.mate_scores, "genuine (mate)"),
                          (outcomes.nonmated_top_scores, "impostor (best non-mated)")):
        finite = scores[np.isfinite(scores)]
        if len(finite):
            axes.hist(finite, bins=bins, alpha=0.6, density=True, label=label)
    axes.set_xlabel("cosine similarity")
    axes.set_ylabel("density")
    axes.legend()
    figure.tight_layout()
    figure.savefig(histogram_png, dpi=100)
    plt.close(figure)
