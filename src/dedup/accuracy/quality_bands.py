"""Genuine score and FNIR by face image quality band, for `dedup evaluate` on photos.

Each mated probe photo's unified quality is measured as the server measures it
(dedup.face.quality; the gate is off in an evaluation, so every capture the capture rules
accept is counted). The bands are cut at 40 and 60, at the quality gate's default minimum
for the unified score (QualityGate.unified, 75: under it the server refuses the photo) and at
the default review_quality of rule 6 (Policy.review_quality, 85: under it a photo that passed
the gate is marginal, and a best score >= review_quality_floor gets REVIEW, not CLEAR):

  < 40, 40-60, 60-75 (these three refused by the gate), 75-85 (marginal: rule 6), >= 85

A band holds the qualities from its lower edge (included) to its upper edge (excluded). Mated
probes that could not be embedded (no face, a capture rule broken) have no quality: they are
a row of their own, so that the rows add up to the mated searches. Per band: the mated probes,
the median genuine score (the probe's score against its own person's best gallery sample,
over the probes whose mate was returned) and FNIR at the review and match thresholds (the
server's defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dedup.accuracy.rates import Floats, fnir
from dedup.core.settings import Policy, QualityGate

NOT_EMBEDDED = "not embedded (no quality)"


@dataclass(frozen=True)
class Band:
    label: str
    low: float  # included
    high: float  # excluded (math.inf for the top band)
    note: str = ""

    def holds(self, qualities: Floats) -> np.ndarray:
        return np.asarray((qualities >= self.low) & (qualities < self.high), dtype=bool)


def default_bands(gate: QualityGate | None = None, policy: Policy | None = None
                  ) -> list[Band]:
    """The bands of the module docstring, cut at the gate's and rule 6's defaults."""
    gate, policy = gate or QualityGate(), policy or Policy()
    edges = sorted({0.0, 40.0, 60.0, gate.unified, policy.review_quality} - {100.0})
    bands = []
    for low, high in zip(edges, [*edges[1:], math.inf], strict=True):
        label = f">= {low:g}" if high == math.inf else \
            f"< {high:g}" if low == 0.0 else f"{low:g}-{high:g}"
        note = "refused by the gate" if high <= gate.unified else \
            "marginal: rule 6" if high <= policy.review_quality else ""
        bands.append(Band(label, low, high, note))
    return bands


def band_table(mate_scores: Floats, qualities: Floats, policy: Policy | None = None,
               bands: list[Band] | None = None) -> dict[str, object]:
    """The figures per band; `qualities` hold each mated probe's unified quality, in the
    order of `mate_scores`, NaN for a probe that could not be embedded."""
    policy, bands = policy or Policy(), bands or default_bands(policy=policy)
    rows = [_row(band.label, band.note, mate_scores[band.holds(qualities)], policy)
            for band in bands]
    rows.append(_row(NOT_EMBEDDED, "", mate_scores[np.isnan(qualities)], policy))
    return {"quality": "unified (dedup.face.quality), 0-100",
            "review_threshold": policy.review_threshold,
            "match_threshold": policy.match_threshold, "rows": rows}


def _row(label: str, note: str, scores: Floats, policy: Policy) -> dict[str, object]:
    found = scores[np.isfinite(scores)]
    return {"band": label, "note": note, "mated": len(scores),
            "median_genuine": float(np.median(found)) if len(found) else None,
            "fnir_at_review": fnir(scores, policy.review_threshold),
            "fnir_at_match": fnir(scores, policy.match_threshold)}


def format_table(table: dict[str, object]) -> list[str]:
    """The table as text lines, for the command's output."""
    lines = [f"  {'quality band':28s}{'mated':>6s}{'median':>8s}"
             f"{'FNIR@' + format(table['review_threshold'], 'g'):>10s}"
             f"{'FNIR@' + format(table['match_threshold'], 'g'):>10s}"]
    for row in table["rows"]:  # type: ignore[attr-defined]
        median = "-" if row["median_genuine"] is None else f"{row['median_genuine']:.3f}"
        label = f"{row['band']} ({row['note']})" if row["note"] else row["band"]
        rates = [("-" if math.isnan(row[k]) else f"{row[k]:.3f}")
                 for k in ("fnir_at_review", "fnir_at_match")]
        lines.append(f"  {label:28s}{row['mated']:6d}{median:>8s}{rates[0]:>10s}"
                     f"{rates[1]:>10s}")
    return lines


def draw(mate_scores: Floats, qualities: Floats, path: str,
         policy: Policy | None = None, bands: list[Band] | None = None) -> None:
    """The genuine score against the unified quality, one point per embedded mated probe,
    with the thresholds as horizontal lines and the band edges as vertical ones."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    policy, bands = policy or Policy(), bands or default_bands(policy=policy)
    shown = np.isfinite(qualities) & np.isfinite(mate_scores)
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(qualities[shown], mate_scores[shown], s=14, alpha=0.7,
                 label=f"mated probes ({int(shown.sum())})")
    axes.axhline(policy.match_threshold, color="tab:red", linestyle="-",
                 label=f"match threshold {policy.match_threshold:g}")
    axes.axhline(policy.review_threshold, color="tab:orange", linestyle="--",
                 label=f"review threshold {policy.review_threshold:g}")
    for band in bands[1:]:
        axes.axvline(band.low, color="grey", linewidth=0.8, alpha=0.6)
    axes.set_xlim(0, 100)
    lowest = float(mate_scores[shown].min()) if shown.any() else 0.0
    axes.set_ylim(min(0.0, lowest - 0.05), 1.0)
    axes.set_xlabel("unified face image quality (0-100)")
    axes.set_ylabel("genuine score (cosine, best own gallery sample)")
    axes.set_title("Genuine score by capture quality")
    axes.legend(loc="best", fontsize="small")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
