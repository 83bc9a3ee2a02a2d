"""The service's own records, independent of protobuf and of the storage format."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from dedup.core.vectors import Vector


@dataclass(frozen=True)
class Registration:
    registration_id: str
    id_number: str
    msisdn: str = ""
    carrier: str = ""
    region: str = ""
    # Microseconds since the Unix epoch; set by the store when the registration is written.
    enrolled_at_us: int = 0
    # The model that made the embedding (ModelPack.model_id); set by the service.
    embedding_model: str = ""
    # Who enrolled it: the caller's certificate subject or token name; set by the service.
    enrolled_by: str = ""
    # The unified face image quality (0-100) the server measured on the photo it was
    # enrolled from; None when enrolled from an embedding. Set by the service.
    quality: float | None = None
    # The unified quality the client sent with the embedding it was enrolled from
    # (Embedding.quality): the client's word, kept and reported, never trusted for the gate.
    client_quality: float | None = None


@dataclass(frozen=True)
class StoredFace:
    """A registration as held in the store: its int64 key and, when asked for, its vector."""

    key: int
    registration: Registration
    vector: Vector | None = None


class Verdict(enum.IntEnum):
    """Mirrors dedup.v1.Verdict, in the order the policy applies the rules."""

    UNSPECIFIED = 0
    CLEAR = 1
    SAME_PERSON = 2
    REVIEW = 3
    DUPLICATE_IDENTITY = 4
    SIM_LIMIT_EXCEEDED = 5
    ID_FACE_MISMATCH = 6


@dataclass(frozen=True)
class DetectedFace:
    """The face found in a photo: its box in pixels and the detector's score."""

    box: tuple[float, float, float, float]
    score: float
    faces_in_image: int

    @property
    def size(self) -> float:
        """The shorter side of the box, in pixels."""
        x1, y1, x2, y2 = self.box
        return min(x2 - x1, y2 - y1)


@dataclass(frozen=True)
class CaptureQuality:
    """A photo's face image quality (dedup.face.quality): each component and the unified
    score on 0-100 (100 best)."""

    unified: float
    components: Mapping[str, float]


@dataclass(frozen=True)
class FaceInput:
    """A request's face, validated but not yet embedded: a unit vector or photo bytes."""

    vector: Vector | None = None
    # The model the client says made `vector` ("" = the server's).
    vector_model: str = ""
    image: bytes = b""
    use_largest_face: bool = False
    # The unified quality the client measured for `vector` (Embedding.quality), 0-100;
    # reported only: the quality gate applies to photos, never to a client's word.
    client_quality: float | None = None


@dataclass(frozen=True)
class Probe:
    """A face to search with: a unit vector of the server's model, and where it came from."""

    vector: Vector
    detected: DetectedFace | None = None
    # A photo's quality as the server measured it (None for an embedding).
    quality: CaptureQuality | None = None
    # An embedding's unified quality as the client says it measured it (never gated on).
    client_quality: float | None = None


@dataclass(frozen=True)
class Match:
    registration: Registration
    score: float
    settled_different: bool = False


@dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    matches: list[Match] = field(default_factory=list)
    distinct_other_id_numbers: int = 0
    same_id_registrations: int = 0
    best_score: float = 0.0
    detected: DetectedFace | None = None
    quality: CaptureQuality | None = None


@dataclass(frozen=True)
class EnrollResult:
    registration: Registration
    enrolled: bool
    check: CheckResult | None = None
    detected: DetectedFace | None = None
    quality: CaptureQuality | None = None


class DeleteKey(enum.Enum):
    REGISTRATION_ID = "registration_id"
    ID_NUMBER = "id_number"
    MSISDN = "msisdn"
