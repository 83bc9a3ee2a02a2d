"""Face-like synthetic galleries for the scale benchmarks.

Persons are random directions; each person has 1-4 captures, normalize(person + noise * u),
with noise drawn per capture so that same-person cosines spread over about 0.5-0.8; a share
of persons is also registered under a second ID number (the fraud dedup exists to find).
Different persons score 0 +- 0.044 in 512-d ("iso"). The "uneven" variant gives identity
vectors an uneven spectrum (a few strong directions, as real embeddings have): the easy case
for IVF partitioning, where "iso" is its worst case. The "clustered" variant gathers persons
in 3,000 groups of lognormal sizes (as populations gather by age, sex and ancestry): person =
normalize(sqrt(0.3) * group centre + sqrt(0.7) * individual direction), so two persons of one
group have identity cosine 0.3 and their captures score about 0.1-0.3, persons of different
groups about 0; same-person captures stay at about 0.5-0.8.

Writes chunks of FILE.npy + FILE.csv that `dedup import` reads, plus probes: fresh captures
of enrolled persons with the ID number each presents.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedup.core.vectors import normalize_rows

DIMENSION = 512
CHUNK = 250_000
FRAUD_SHARE = 0.05
VARIANTS = ("iso", "uneven", "clustered")
GROUPS = 3_000
GROUP_SHARE = 0.3  # of a clustered person's identity: the cosine of two persons of one group


@dataclass(frozen=True)
class EmbeddedGallery:
    files: list[Path]
    probes: np.ndarray
    probe_ids: list[str]
    registrations: int


@dataclass(frozen=True)
class Groups:
    """The clustered variant's groups: unit centres and each group's share of persons."""

    centres: np.ndarray
    weights: np.ndarray


def spectrum(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind != "uneven":
        return np.ones(DIMENSION, np.float32)
    # A decaying spectrum under a random rotation: variance ~ 1 / (1 + i / 16).
    return (1.0 / np.sqrt(1.0 + np.arange(DIMENSION) / 16.0)).astype(np.float32)


def groups_of(kind: str, seed: int) -> Groups | None:
    """The groups of the "clustered" variant (None for the others), from their own seed so
    that the other variants' data stay what they were."""
    if kind != "clustered":
        return None
    rng = np.random.default_rng(seed + 1_000_003)
    sizes = rng.lognormal(0.0, 1.0, GROUPS)
    centres = normalize_rows(rng.standard_normal((GROUPS, DIMENSION), dtype=np.float32))
    return Groups(centres, sizes / sizes.sum())


def persons_of(rng: np.random.Generator, count: int, scale: np.ndarray,
               rotation: np.ndarray | None, groups: Groups | None = None) -> np.ndarray:
    raw = rng.standard_normal((count, DIMENSION), dtype=np.float32) * scale
    persons = normalize_rows(raw if rotation is None else raw @ rotation)
    if groups is None:
        return persons
    members = rng.choice(len(groups.centres), size=count, p=groups.weights)
    return normalize_rows(np.sqrt(GROUP_SHARE) * groups.centres[members]
                          + np.sqrt(1.0 - GROUP_SHARE) * persons)


def captures_of(rng: np.random.Generator, persons: np.ndarray) -> np.ndarray:
    noise = rng.uniform(0.5, 1.0, size=(len(persons), 1)).astype(np.float32)
    jitter = normalize_rows(rng.standard_normal(persons.shape, dtype=np.float32))
    return normalize_rows(persons + noise * jitter)


def generate(out: Path, registrations: int, kind: str = "iso", probes: int = 1000,
             seed: int = 7) -> EmbeddedGallery:
    """Writes the gallery in chunks (skipped when already there) and returns it."""
    out.mkdir(parents=True, exist_ok=True)
    summary = out / f"{kind}-{registrations}-{probes}-{seed}.npz"
    if summary.exists():  # written before: regenerating 10M rows takes minutes
        saved = np.load(summary)
        return EmbeddedGallery(sorted(out.glob(f"{kind}-*.npy")), saved["probes"],
                               saved["probe_ids"].tolist(), int(saved["registrations"]))
    gallery = _generate(out, registrations, kind, probes, seed)
    np.savez(summary, probes=gallery.probes, probe_ids=np.array(gallery.probe_ids),
             registrations=gallery.registrations)
    return gallery


def _generate(out: Path, registrations: int, kind: str, probes: int, seed: int
              ) -> EmbeddedGallery:
    rng = np.random.default_rng(seed)
    scale = spectrum(kind, rng)
    rotation = None if kind != "uneven" else np.linalg.qr(
        rng.standard_normal((DIMENSION, DIMENSION)))[0].astype(np.float32)
    groups = groups_of(kind, seed)
    files: list[Path] = []
    written = 0
    person = 0
    probe_rows: list[np.ndarray] = []
    probe_ids: list[str] = []
    while written < registrations:
        path = out / f"{kind}-{len(files):03d}.npy"
        count = min(CHUNK, registrations - written)
        people = persons_of(rng, count, scale, rotation, groups)  # more than needed
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


def in_memory(registrations: int, kind: str = "iso", probes: int = 1000, seed: int = 7,
              block: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """The same kind of gallery as `generate`, at numpy speed and without files: the
    registrations' embeddings (unit float32 rows; persons with 1-4 captures plus a fraud
    share) and `probes` fresh captures of enrolled persons."""
    gallery = np.empty((registrations, DIMENSION), np.float32)
    probe_rows: list[np.ndarray] = []
    written = 0
    for rows, cut in streamed(registrations, kind, probes, seed, block):
        gallery[written:written + len(rows)] = rows
        written += len(rows)
        if cut is not None:
            probe_rows.append(cut)
    return gallery, np.vstack(probe_rows)[:probes]


def streamed(registrations: int, kind: str = "iso", probes: int = 1000, seed: int = 7,
             block: int = 100_000) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """in_memory's gallery a block at a time, for galleries larger than memory: each block's
    rows, and the probes cut from its persons (None when the block gives none)."""
    rng = np.random.default_rng(seed)
    scale = spectrum(kind, rng)
    rotation = None if kind != "uneven" else np.linalg.qr(
        rng.standard_normal((DIMENSION, DIMENSION)))[0].astype(np.float32)
    groups = groups_of(kind, seed)
    written = probes_made = 0
    while written < registrations:
        people = persons_of(rng, block, scale, rotation, groups)
        copies = rng.integers(1, 5, size=block) + (rng.random(block) < FRAUD_SHARE)
        rows = np.repeat(np.arange(block), copies)[:registrations - written]
        captures = captures_of(rng, people[rows])
        written += len(rows)
        wanted = probes - probes_made
        cut = None
        if wanted > 0:  # probes spread over the whole gallery
            share = wanted if written >= registrations else min(
                wanted, probes * len(rows) // registrations + 1)
            cut = captures_of(rng, people[rng.choice(rows, share, replace=False)])
            probes_made += share
        yield captures, cut
