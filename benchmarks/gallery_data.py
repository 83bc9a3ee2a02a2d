"""Face-like synthetic galleries for the scale benchmarks.

Persons are random directions; each person has 1-4 captures, normalize(person + noise * u),
with noise drawn per capture so that same-person cosines spread over about 0.5-0.8; a share
of persons is also registered under a second ID number (the fraud dedup exists to find).
Different persons score 0 +- 0.044 in 512-d ("iso"). The "uneven" variant gives identity
vectors an uneven spectrum (a few strong directions, as real embeddings have): the easy case
for IVF partitioning, where "iso" is its worst case.

Writes chunks of FILE.npy + FILE.csv that `dedup import` reads, plus probes: fresh captures
of enrolled persons with the ID number each presents.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedup.core.vectors import normalize_rows

DIMENSION = 512
CHUNK = 250_000
FRAUD_SHARE = 0.05


@dataclass(frozen=True)
class EmbeddedGallery:
    files: list[Path]
    probes: np.ndarray
    probe_ids: list[str]
    registrations: int


def spectrum(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "iso":
        return np.ones(DIMENSION, np.float32)
    # A decaying spectrum under a random rotation: variance ~ 1 / (1 + i / 16).
    return (1.0 / np.sqrt(1.0 + np.arange(DIMENSION) / 16.0)).astype(np.float32)


def persons_of(rng: np.random.Generator, count: int, scale: np.ndarray,
               rotation: np.ndarray | None) -> np.ndarray:
    raw = rng.standard_normal((count, DIMENSION), dtype=np.float32) * scale
    return normalize_rows(raw if rotation is None else raw @ rotation)


def captures_of(rng: np.random.Generator, persons: np.ndarray) -> np.ndarray:
    noise = rng.uniform(0.5, 1.0, size=(len(persons), 1)).astype(np.float32)
    jitter = normalize_rows(rng.standard_normal(persons.shape, dtype=np.float32))
    return normalize_rows(persons + noise * jitter)


def generate(out: Path, registrations: int, kind: str = "iso", probes: int = 1000,
             seed: int = 7) -> EmbeddedGallery:
    """Writes the gallery in chunks (skipped when already there) and returns it."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = spectrum(kind, rng)
    rotation = None if kind == "iso" else np.linalg.qr(
        rng.standard_normal((DIMENSION, DIMENSION)))[0].astype(np.float32)
    files: list[Path] = []
    written = 0
    person = 0
    probe_rows: list[np.ndarray] = []
    probe_ids: list[str] = []
    while written < registrations:
        path = out / f"{kind}-{len(files):03d}.npy"
        count = min(CHUNK, registrations - written)
        people = persons_of(rng, count, scale, rotation)  # more persons than needed
        captures_per = rng.integers(1, 5, size=count)
        frauds = rng.random(count) < FRAUD_SHARE
        rows, vectors = [], []
        for i in range(count):
            if len(rows) >= count:
                break
            for c in range(int(captures_per[i])):
                rows.append((f"p{person + i}-{c}", f"ID{person + i:010d}"))
            if frauds[i]:
                rows.append((f"p{person + i}-x", f"FX{person + i:010d}"))
            vectors.append(captures_of(rng, np.repeat(people[i:i + 1],
                                                      int(captures_per[i]) + int(frauds[i]), 0)))
            if len(probe_rows) < probes and rng.random() < probes * 4 / registrations:
                probe_rows.append(captures_of(rng, people[i:i + 1])[0])
                probe_ids.append(f"ID{person + i:010d}")
        person += count
        rows, matrix = rows[:count], np.vstack(vectors)[:count]
        if not path.exists():
            np.save(path, matrix)
            with open(path.with_suffix(".csv"), "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["registration_id", "id_number"])
                writer.writerows(rows)
        files.append(path)
        written += len(rows)
    return EmbeddedGallery(files, np.vstack(probe_rows), probe_ids, written)
