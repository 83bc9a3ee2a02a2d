"""Turning client-supplied embedding values into unit vectors, or a clear error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from dedup.core.errors import InvalidArgument

Vector = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]

# Below this norm a vector has no usable direction (an all-zero or denormal embedding).
MIN_NORM = 1e-6


def unit_vector(values: Sequence[float] | npt.NDArray[np.floating], dimension: int,
                field: str) -> Vector:
    """Validates `values` and returns them L2-normalised as float32."""
    if len(values) != dimension:
        raise InvalidArgument(field, f"expected {dimension} values, got {len(values)}")
    vector = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vector).all():
        bad = int(np.flatnonzero(~np.isfinite(vector))[0])
        raise InvalidArgument(field, f"value {bad} is {vector[bad]}: NaN and Inf are not allowed")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm < MIN_NORM:
        raise InvalidArgument(field, "the vector is all zeros (norm below 1e-6)")
    # In float64: finite float32 values can have a norm beyond float32's range (3.4e38), which
    # as a float32 divisor is inf and turned the vector into zeros.
    unit: Vector = (vector.astype(np.float64) / norm).astype(np.float32)
    return unit


def normalize_rows(matrix: npt.ArrayLike) -> Matrix:
    """L2-normalises each row (for trusted, already validated data such as generators)."""
    rows = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: Matrix = (rows / np.maximum(norms, MIN_NORM)).astype(np.float32)
    return unit
