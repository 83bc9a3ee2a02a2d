"""Face-like synthetic embeddings for the demo, the tests and the benchmarks.

Each person is a random direction in 512-d space; a capture is
normalize(person + noise * random_unit). Two captures of one person then score about
1 / (1 + noise**2) (0.64 at the default noise 0.75), different people 0 +- 0.044,
which is the shape of ArcFace scores on real photos.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from dedup.core.settings import DIMENSION
from dedup.core.vectors import Matrix, Vector, normalize_rows


def noise_for_similarity(similarity: float) -> float:
    """The capture noise at which two captures of one person score `similarity` on average."""
    if not 0.0 < similarity <= 1.0:
        raise ValueError(f"similarity must be in (0, 1], got {similarity}")
    return math.sqrt(1.0 / similarity - 1.0)


class FaceGenerator:
    def __init__(self, seed: int, dimension: int = DIMENSION) -> None:
        self.rng = np.random.default_rng(seed)
        self.dimension = dimension

    def persons(self, count: int) -> Matrix:
        return normalize_rows(self.rng.standard_normal((count, self.dimension), dtype=np.float32))

    def captures(self, persons: Matrix, noise: float = 0.75) -> Matrix:
        """One capture per row of `persons`."""
        jitter = normalize_rows(self.rng.standard_normal(persons.shape, dtype=np.float32))
        return normalize_rows(persons + np.float32(noise) * jitter)

    def capture(self, person: Vector, noise: float = 0.75) -> Vector:
        capture: Vector = self.captures(person.reshape(1, -1), noise)[0]
        return capture

    def at_similarity(self, vector: Vector, similarity: float) -> Vector:
        """A unit vector whose cosine with the unit `vector` is exactly `similarity`."""
        if not -1.0 <= similarity <= 1.0:
            raise ValueError(f"similarity must be in [-1, 1], got {similarity}")
        direction: npt.NDArray[np.float64] = self.rng.standard_normal((vector.shape[0],))
        base = vector.astype(np.float64)
        direction = direction - float(direction.dot(base)) * base
        direction /= np.linalg.norm(direction)
        result = similarity * base + math.sqrt(1.0 - similarity**2) * direction
        unit: Vector = (result / np.linalg.norm(result)).astype(np.float32)
        return unit
