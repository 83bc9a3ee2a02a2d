"""FindClusters on an approximate index finds the weak links too: planted pairs of one
person under two ID numbers, scoring just above the job's score, among isotropic strangers
(the worst case for a partition of the gallery: the job-local IVF that proposed the
candidates before missed some)."""

from __future__ import annotations

import numpy as np
import pytest

from dedup.core.errors import StoreDamaged
from dedup.core.records import DeleteKey, Registration
from dedup.core.settings import IndexConfig, StoreConfig
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.store import Store
from dedup.gallery.embedded.sweep import SignCodeCandidates
from dedup.gallery.embedded.vector_file import HEADER_BYTES
from dedup.service.clusters import PAIRS_CAP, Caps, Cluster, find_clusters

STRANGERS = 40_000
PAIRS = 200
MIN_SCORE = 0.40


def planted_gallery(rng: np.random.Generator) -> tuple[list[str], np.ndarray, list[str]]:
    """Registration ids, unit vectors and ID numbers: strangers and, at random places, two
    captures of each planted person (cosine about 0.41-0.50) under two ID numbers."""
    strangers = normalize_rows(rng.standard_normal((STRANGERS, 512)))
    persons = normalize_rows(rng.standard_normal((PAIRS, 512)))
    noise = rng.uniform(1.15, 1.3, size=(2 * PAIRS, 1))
    jitter = normalize_rows(rng.standard_normal((2 * PAIRS, 512)))
    captures = normalize_rows(np.repeat(persons, 2, axis=0) + noise * jitter)
    ids = [f"s{i}" for i in range(STRANGERS)] + [f"p{i // 2}-{i % 2}" for i in range(2 * PAIRS)]
    numbers = [f"S{i}" for i in range(STRANGERS)] + [f"P{i}" for i in range(2 * PAIRS)]
    order = rng.permutation(len(ids))
    vectors = np.vstack([strangers, captures])[order].astype(np.float32)
    return [ids[i] for i in order], vectors, [numbers[i] for i in order]


def planted_pairs(ids: list[str], vectors: np.ndarray) -> set[frozenset[str]]:
    """The planted pairs scoring >= MIN_SCORE (strangers score 0 +- 0.044: never)."""
    row_of = {registration_id: row for row, registration_id in enumerate(ids)}
    pairs = [(f"p{i}-0", f"p{i}-1") for i in range(PAIRS)]
    return {frozenset(pair) for pair in pairs
            if vectors[row_of[pair[0]]] @ vectors[row_of[pair[1]]] >= MIN_SCORE}


def test_every_weak_link_across_id_numbers_is_found(tmp_path):
    rng = np.random.default_rng(2019)
    ids, vectors, numbers = planted_gallery(rng)
    truth = planted_pairs(ids, vectors)
    assert len(truth) > PAIRS // 3
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model",
                              IndexConfig(index_factory="BinarySign512"), background=False)
    try:
        gallery.insert_many([
            (Registration(registration_id=i, id_number=n, embedding_model="model"), v)
            for i, v, n in zip(ids, vectors, numbers, strict=True)])
        clusters = [item for item in find_clusters(gallery, MIN_SCORE, 2)
                    if isinstance(item, Cluster)]
    finally:
        gallery.close(checkpoint=False)
    found = {frozenset(r.registration_id for r in cluster.registrations)
             for cluster in clusters}
    assert found == truth, (f"missed {len(truth - found)} of {len(truth)} planted pairs, "
                            f"invented {len(found - truth)}")


def test_a_link_the_pairs_cap_drops_marks_both_groups_truncated(tmp_path):
    """A has five close captures and B (0.45) beyond a cap of 3; C links only to B. The sign
    code search sees A-B from A's side only: B's group lacks A and must say it was cut."""
    rng = np.random.default_rng(3)

    def near(base: np.ndarray, cosine: float) -> np.ndarray:
        other = rng.standard_normal(512)
        other -= (other @ base) * base
        return cosine * base + np.sqrt(1 - cosine ** 2) * other / np.linalg.norm(other)

    a = normalize_rows(rng.standard_normal((1, 512)))[0]
    b = near(a, 0.45)
    named = [("A", a), *((f"A{i}", near(a, 0.7)) for i in range(5)), ("B", b),
             ("C", near(b, 0.6))]
    named += [(f"s{i}", v) for i, v in enumerate(normalize_rows(rng.standard_normal((300, 512))))]
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model",
                              IndexConfig(index_factory="BinarySign512"), background=False)
    try:
        gallery.insert_many([
            (Registration(registration_id=name, id_number=f"N{name}", embedding_model="model"),
             vector.astype(np.float32)) for name, vector in named])
        clusters = [item for item in find_clusters(gallery, MIN_SCORE, 2, Caps(3, 400))
                    if isinstance(item, Cluster)]
    finally:
        gallery.close(checkpoint=False)
    with_b = [c for c in clusters if "B" in {r.registration_id for r in c.registrations}]
    assert with_b and all(PAIRS_CAP in cluster.truncated_by for cluster in with_b)


def test_candidates_erased_during_a_job_drop_out_and_damaged_ones_stop_it(tmp_path):
    """The job takes its codes at its start: a candidate erased since is left out (its slot
    is zeros), one whose slot is damaged since stops the job naming the vector file."""
    rng = np.random.default_rng(7)
    strangers = normalize_rows(rng.standard_normal((2_000, 512)))
    persons = normalize_rows(rng.standard_normal((3, 512)))
    captures = normalize_rows(np.repeat(persons, 2, axis=0)
                              + 0.5 * normalize_rows(rng.standard_normal((6, 512))))
    ids = [f"p{i // 2}-{i % 2}" for i in range(6)] + [f"s{i}" for i in range(2_000)]
    vectors = np.vstack([captures, strangers]).astype(np.float32)
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        store.insert_many([(Registration(i, f"N-{i}", embedding_model="m"), v)
                           for i, v in zip(ids, vectors, strict=True)])
        keys = np.array([store.keys_of(i)[0] for i in ids], np.int64)
        candidates = SignCodeCandidates(store, None, MIN_SCORE, threads=1)

        def partners() -> dict[str, set[str]]:
            rows = candidates.neighbours(keys[:6].tolist(), vectors[:6])
            name = dict(zip(keys.tolist(), ids, strict=True))
            return {ids[i]: {name[key] for key, _ in row} - {ids[i]}
                    for i, row in enumerate(rows) if ids[i].endswith("-0")}  # the lower keys

        assert partners() == {"p0-0": {"p0-1"}, "p1-0": {"p1-1"}, "p2-0": {"p2-1"}}
        store.insert_many([(Registration("late", "N-late", embedding_model="m"), vectors[0])])
        late = store.keys_of("late")[0]  # enrolled after the job started: encoded afresh
        rows = candidates.neighbours([int(keys[0]), late], np.vstack([vectors[0], vectors[0]]))
        assert {key for key, _ in rows[0]} - {int(keys[0])} == {int(keys[1])}
        store.delete(DeleteKey.REGISTRATION_ID, "p1-1")
        assert partners()["p1-0"] == set() and partners()["p0-0"] == {"p0-1"}
        with (tmp_path / "data" / "store" / "vectors.f32").open("r+b") as handle:
            handle.seek(HEADER_BYTES + (int(keys[5]) - 1) * 2048)
            handle.write(b"\x7f" * 2048)
        with pytest.raises(StoreDamaged, match=r"vectors\.f32: the store is damaged"):
            partners()
    finally:
        store.close()
