"""Protobuf messages to validated domain values and back.

Every error names the proto field as the client wrote it (e.g. `registration.msisdn`); the
value rules shared with the CSV import are in `dedup.core.validation`.
"""

from __future__ import annotations

import dataclasses

from google.protobuf.timestamp_pb2 import Timestamp

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core import validation
from dedup.core.errors import InvalidArgument
from dedup.core.logs import mask
from dedup.core.records import (
    CaptureQuality,
    CheckResult,
    DeleteKey,
    DetectedFace,
    FaceInput,
    Match,
    Registration,
)
from dedup.core.settings import Limits
from dedup.core.validation import text
from dedup.core.vectors import unit_vector

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_SECONDS_MIN = -62_135_596_800
TIMESTAMP_SECONDS_MAX = 253_402_300_799
NANOS_MAX = 999_999_999


def face_input(request_face: pb.Face, has_face: bool, field: str, dimension: int) -> FaceInput:
    if not has_face:
        raise InvalidArgument(field, "is required")
    kind = request_face.WhichOneof("input")
    if kind is None:
        raise InvalidArgument(field, "set either embedding or image")
    if kind == "image":
        return FaceInput(image=request_face.image,
                         use_largest_face=request_face.use_largest_face)
    embedding = request_face.embedding
    model = text(embedding.model, f"{field}.embedding.model", 64, required=False)
    return FaceInput(
        vector=unit_vector(embedding.values, dimension, f"{field}.embedding.values"),
        vector_model=model,
        client_quality=client_quality(embedding, f"{field}.embedding.quality"),
    )


def client_quality(embedding: pb.Embedding, field: str) -> float | None:
    """The unified quality a client measured (checked for range, reported, never gated on)."""
    if not embedding.HasField("quality"):
        return None
    for descriptor, value in embedding.quality.ListFields():
        if not 0.0 <= value <= 100.0:  # NaN fails too
            raise InvalidArgument(f"{field}.{descriptor.name}", f"must be within 0-100, "
                                  f"got {value}")
    return float(embedding.quality.unified)


def quality_to_proto(quality: CaptureQuality) -> pb.Quality:
    message = pb.Quality(unified=quality.unified)
    for name, value in quality.components.items():
        setattr(message, name, value)
    return message


def timestamp_us(message: Timestamp, has: bool, field: str) -> int | None:
    """Microseconds since the epoch, None when unset; a Timestamp outside its documented range
    is the client's error (protobuf's own conversion would raise a bare ValueError)."""
    if not has:
        return None
    if not 0 <= message.nanos <= NANOS_MAX:
        raise InvalidArgument(field, f"nanos must be 0..{NANOS_MAX:,}, got {message.nanos}")
    if not TIMESTAMP_SECONDS_MIN <= message.seconds <= TIMESTAMP_SECONDS_MAX:
        raise InvalidArgument(field, f"seconds must be {TIMESTAMP_SECONDS_MIN:,}.."
                              f"{TIMESTAMP_SECONDS_MAX:,} (0001-01-01 to 9999-12-31), "
                              f"got {message.seconds}")
    return int(message.ToMicroseconds())


def registration_from_proto(message: pb.Registration, has: bool, limits: Limits) -> Registration:
    if not has:
        raise InvalidArgument("registration", "is required")
    # The server sets enrolled_at and ignores the client's, but a malformed one is still refused.
    timestamp_us(message.enrolled_at, message.HasField("enrolled_at"), "registration.enrolled_at")
    return validation.registration(message.registration_id, message.id_number, message.msisdn,
                                   message.carrier, message.region, limits)


def max_candidates(value: int, limits: Limits) -> int:
    if value == 0:
        return limits.default_candidates
    if value > limits.max_candidates:
        raise InvalidArgument("max_candidates", f"is {value}, at most {limits.max_candidates}")
    return value


def delete_key(request: pb.DeleteRequest, limits: Limits) -> tuple[DeleteKey, str]:
    kind = request.WhichOneof("key")
    if kind is None:
        raise InvalidArgument("key", "set one of registration_id, id_number or msisdn")
    key = DeleteKey(kind)
    max_chars = {
        DeleteKey.REGISTRATION_ID: limits.max_registration_id_chars,
        DeleteKey.ID_NUMBER: limits.max_id_number_chars,
        DeleteKey.MSISDN: limits.max_msisdn_chars,
    }[key]
    return key, text(getattr(request, kind), kind, max_chars, required=True, key=True)


def registration_to_proto(registration: Registration) -> pb.Registration:
    message = pb.Registration(
        registration_id=registration.registration_id,
        id_number=registration.id_number,
        msisdn=registration.msisdn,
        carrier=registration.carrier,
        region=registration.region,
        embedding_model=registration.embedding_model,
        enrolled_by=registration.enrolled_by,
    )
    if registration.quality is not None:
        message.quality = registration.quality
    if registration.client_quality is not None:
        message.client_quality = registration.client_quality
    if registration.enrolled_at_us:
        stamp = Timestamp()
        stamp.FromMicroseconds(registration.enrolled_at_us)
        message.enrolled_at.CopyFrom(stamp)
    return message


def detected_to_proto(face: DetectedFace) -> pb.DetectedFace:
    x1, y1, x2, y2 = face.box
    return pb.DetectedFace(x1=x1, y1=y1, x2=x2, y2=y2, detection_score=face.score,
                           faces_in_image=face.faces_in_image)


def desk_view(registration: Registration, claimed_id_number: str) -> Registration:
    """A matched registration as a registration desk sees it: the registration_id, carrier,
    region and enrolment time; under an ID number other than the one claimed, the ID number
    and phone number masked as in the logs (the last four characters); never who enrolled
    it."""
    if registration.id_number == claimed_id_number:
        return dataclasses.replace(registration, enrolled_by="")
    return dataclasses.replace(registration, id_number=mask(registration.id_number),
                               msisdn=mask(registration.msisdn), enrolled_by="")


def _match_to_proto(match: Match, desk_claimed: str | None) -> pb.Match:
    registration = match.registration
    if desk_claimed is not None:
        registration = desk_view(registration, desk_claimed)
    return pb.Match(registration=registration_to_proto(registration), score=match.score,
                    settled_different=match.settled_different)


def check_to_proto(result: CheckResult, desk_claimed: str | None = None) -> pb.CheckResponse:
    """With `desk_claimed` (the claimed ID number), the matches as a registration desk sees
    them (see desk_view); without, whole."""
    response = pb.CheckResponse(
        verdict=pb.Verdict.ValueType(int(result.verdict)),
        matches=[_match_to_proto(match, desk_claimed) for match in result.matches],
        distinct_other_id_numbers=result.distinct_other_id_numbers,
        same_id_registrations=result.same_id_registrations,
        best_score=result.best_score,
    )
    if result.detected is not None:
        response.detected_face.CopyFrom(detected_to_proto(result.detected))
    if result.quality is not None:
        response.quality.CopyFrom(quality_to_proto(result.quality))
    return response
