"""`dedup evaluate`: 1:N error rates of the face model and the thresholds on a labelled set.

A labelled set is a CSV manifest, one row per sample: `role` (gallery or probe), `person`,
and either `file` (a photo, relative to the manifest) or `row` (a row of --embeddings). Probes
whose person has a gallery sample are mated, the others non-mated. Every probe is searched
against the whole gallery exactly as the server's Flat index does (inner products of unit
vectors), keeping the 100 best candidates. For a set of photos, the mated searches are also
broken down by the probe's face image quality (dedup.accuracy.quality_bands).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from dedup.accuracy import quality_bands
from dedup.accuracy.rates import NOT_FOUND_RANK, NOT_FOUND_SCORE, SearchOutcomes, draw, report
from dedup.core.vectors import Matrix, normalize_rows

CANDIDATES = 100
IMPOSTOR_SAMPLE = 2_000_000  # single comparisons kept for the 1:1 impostor distribution
NO_PHOTOS = "an embedding set: no photos, so no face image quality was measured"

# A sample's vector and the unified quality of its photo (NaN: not a photo).
Sample = tuple[np.ndarray, float]


@dataclass
class LabelledSet:
    gallery: Matrix
    gallery_persons: list[str]
    probes: Matrix
    probe_persons: list[str]
    # Each probe's unified face image quality, NaN where none was measured (an embedding,
    # or a photo that could not be embedded).
    probe_qualities: np.ndarray
    # Samples that could not be embedded (photos breaking the capture rules), by role.
    failures: dict[str, list[str]] = field(default_factory=dict)
    photos: bool = False

    def mated_qualities(self) -> np.ndarray:
        """The probe qualities of the mated searches, in the order of SearchOutcomes."""
        enrolled = set(self.gallery_persons)
        return np.asarray([quality for quality, person
                           in zip(self.probe_qualities, self.probe_persons, strict=True)
                           if person in enrolled], dtype=np.float64)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows, start=2):
        if row.get("role") not in ("gallery", "probe") or not row.get("person"):
            raise ValueError(f"{path}:{number}: role must be gallery or probe, person non-empty")
    return rows


def embeddings_set(manifest: Path, embeddings: Path) -> LabelledSet:
    matrix = np.load(embeddings, mmap_mode="r", allow_pickle=False)
    rows = read_manifest(manifest)
    return _split(rows, lambda row: (np.asarray(matrix[int(row["row"])], np.float32),
                                     math.nan))


def photo_set(manifest: Path, model_dir: Path | None, largest_face: bool = False
              ) -> LabelledSet:
    """Embeds each photo of the manifest; `largest_face`: a photo with several faces uses the
    largest (as Face.use_largest_face) instead of counting as a failure. The quality gate is
    off: the evaluation measures the matcher on every capture the capture rules accept, and
    each photo's unified quality is kept (as the server measures it)."""
    from dedup.core.errors import DedupError
    from dedup.core.settings import CaptureRules
    from dedup.face.embedder import FaceEmbedder
    from dedup.face.model_pack import resolve_model_dir

    embedder = FaceEmbedder(resolve_model_dir(model_dir), CaptureRules(quality_gate=None))
    failures: dict[str, list[str]] = {}
    try:
        def embed(row: dict[str, str]) -> Sample | None:
            try:
                data = (manifest.parent / row["file"]).read_bytes()
                embedded = embedder.embed(data, use_largest=largest_face, field=row["file"])
                return embedded.vector, embedded.quality.unified
            except (DedupError, OSError) as error:
                failures.setdefault(row["role"], []).append(f"{row['file']}: {error}")
                return None

        labelled = _split(read_manifest(manifest), embed)
    finally:
        embedder.close()
    labelled.failures = failures
    labelled.photos = True
    return labelled


def _split(rows: list[dict[str, str]],
           sample_of: Callable[[dict[str, str]], Sample | None]) -> LabelledSet:
    gallery: list[np.ndarray] = []
    probes: list[np.ndarray | None] = []
    gallery_persons: list[str] = []
    probe_persons: list[str] = []
    probe_qualities: list[float] = []
    for row in rows:
        sample = sample_of(row)
        if row["role"] == "probe":  # a probe that cannot be searched still counts
            probes.append(None if sample is None else sample[0])
            probe_persons.append(row["person"])
            probe_qualities.append(math.nan if sample is None else sample[1])
        elif sample is not None:
            gallery.append(sample[0])
            gallery_persons.append(row["person"])
    if not gallery:
        raise ValueError("the manifest has no usable gallery sample")
    dimension = len(gallery[0])
    probe_matrix = np.vstack([np.full(dimension, np.nan, np.float32) if p is None else p
                              for p in probes]) if probes else np.empty((0, dimension))
    return LabelledSet(normalize_rows(np.vstack(gallery)), gallery_persons,
                       probe_matrix.astype(np.float32), probe_persons,
                       np.asarray(probe_qualities, dtype=np.float64))


def search(labelled: LabelledSet, seed: int = 0) -> SearchOutcomes:
    gallery = np.ascontiguousarray(labelled.gallery, np.float32)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    persons = np.asarray(labelled.gallery_persons)
    enrolled = set(labelled.gallery_persons)
    usable = np.asarray(~np.isnan(labelled.probes).any(axis=1), dtype=bool)
    probes = normalize_rows(np.nan_to_num(labelled.probes))
    scores, ids = index.search(probes, min(CANDIDATES, len(gallery)))
    mate_scores, mate_ranks, nonmated_top = [], [], []
    for i, person in enumerate(labelled.probe_persons):
        returned = persons[ids[i][ids[i] >= 0]] if usable[i] else np.empty(0)
        if person in enrolled:
            hits = np.flatnonzero(returned == person)
            mate_scores.append(float(scores[i][hits[0]]) if len(hits) else NOT_FOUND_SCORE)
            mate_ranks.append(float(hits[0] + 1) if len(hits) else NOT_FOUND_RANK)
        else:
            nonmated_top.append(float(scores[i][0]) if len(returned) else NOT_FOUND_SCORE)
    return SearchOutcomes(np.asarray(mate_scores), np.asarray(mate_ranks),
                          np.asarray(nonmated_top),
                          _impostor_comparisons(probes[usable],
                                                np.asarray(labelled.probe_persons)[usable],
                                                gallery, persons, seed))


def _impostor_comparisons(probes: Matrix, probe_persons: np.ndarray, gallery: Matrix,
                          persons: np.ndarray, seed: int) -> np.ndarray:
    """Single probe-vs-registration scores of different persons (a random sample of columns
    when probes x gallery exceeds IMPOSTOR_SAMPLE)."""
    if not len(probes):
        return np.empty(0)
    columns = np.arange(len(gallery))
    if len(probes) * len(gallery) > IMPOSTOR_SAMPLE:
        keep = max(1, IMPOSTOR_SAMPLE // len(probes))
        columns = np.random.default_rng(seed).choice(len(gallery), keep, replace=False)
    found = []
    for start in range(0, len(probes), 1024):
        block = probes[start:start + 1024] @ gallery[columns].T
        different = probe_persons[start:start + 1024, None] != persons[columns][None, :]
        found.append(block[different].astype(np.float64))
    return np.concatenate(found)


def evaluate(labelled: LabelledSet, out: Path) -> dict[str, object]:
    """Writes evaluation.json, det.png and scores.png to `out`, and quality.png for a set
    of photos; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes = search(labelled)
    result = report(outcomes)
    result["gallery_size"] = len(labelled.gallery)
    result["failures"] = labelled.failures
    if labelled.photos:
        qualities = labelled.mated_qualities()
        result["quality_bands"] = quality_bands.band_table(outcomes.mate_scores, qualities)
        quality_bands.draw(outcomes.mate_scores, qualities, str(out / "quality.png"))
    else:
        result["quality_bands"] = {"skipped": NO_PHOTOS}
    (out / "evaluation.json").write_text(json.dumps(_finite(result), indent=2))
    np.save(out / "impostor_scores.npy", outcomes.impostor_scores)
    draw(outcomes, str(out / "det.png"), str(out / "scores.png"))
    return result


def _finite(value: object) -> object:
    """JSON has no infinities: -inf / inf / nan become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
