"""Validation of request values, whichever way they arrive (gRPC, a CSV import): every error
names the field as the client wrote it (e.g. `registration.msisdn`)."""

from __future__ import annotations

import re
import unicodedata

from dedup.core.errors import InvalidArgument
from dedup.core.records import Registration
from dedup.core.settings import Limits

MSISDN = re.compile(r"\+?[0-9]{3,31}")


# LMDB's longest key: registration_ids, ID numbers and phone numbers are keys of the store.
MAX_KEY_BYTES = 511
# An application settled while not enrolled is named in its settlement's keys by its
# registration_id: b"p", the id and a NUL, then the matched registration's b"k" and 8-byte key
# (gallery/embedded/store_format.party_key). One limit for every backend.
MAX_APPLICATION_ID_BYTES = MAX_KEY_BYTES - 11


def text(value: str, field: str, max_chars: int, required: bool, key: bool = False) -> str:
    """`key`: the value becomes a key of the store (at most MAX_KEY_BYTES in UTF-8)."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters, at most {max_chars} allowed")
    if key and len(value) * 4 > MAX_KEY_BYTES and len(value.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(field, f"is {len(value.encode())} bytes in UTF-8, at most "
                              f"{MAX_KEY_BYTES} allowed")
    if value != value.strip():
        raise InvalidArgument(field, "has leading or trailing white space")
    # isprintable() (C speed) is true for nearly every value; only the rest are inspected.
    if not value.isprintable() and any(unicodedata.category(char) in ("Cc", "Cs")
                                       for char in value):
        raise InvalidArgument(field, "contains control characters")
    return value


def application_id(registration_id: str, field: str) -> str:
    """The registration_id of an application (not enrolled), short enough for a settlement's
    keys."""
    size = len(registration_id.encode())
    if size > MAX_APPLICATION_ID_BYTES:
        raise InvalidArgument(field, f"is {size} bytes in UTF-8, at most "
                              f"{MAX_APPLICATION_ID_BYTES} allowed for an application that is "
                              "not enrolled")
    return registration_id


def msisdn(value: str, field: str, limits: Limits) -> str:
    value = text(value, field, limits.max_msisdn_chars, required=False)
    if value and not MSISDN.fullmatch(value):
        raise InvalidArgument(field, "must be 3 to 31 digits, optionally after one '+' "
                              f"(got {len(value.removeprefix('+'))} characters after any '+')")
    return value


def registration(registration_id: str, id_number: str, msisdn_value: str, carrier: str,
                 region: str, limits: Limits, prefix: str = "registration") -> Registration:
    return Registration(
        registration_id=text(registration_id, f"{prefix}.registration_id",
                             limits.max_registration_id_chars, required=True, key=True),
        id_number=text(id_number, f"{prefix}.id_number", limits.max_id_number_chars,
                       required=True, key=True),
        msisdn=msisdn(msisdn_value, f"{prefix}.msisdn", limits),
        carrier=text(carrier, f"{prefix}.carrier", limits.max_label_chars, False),
        region=text(region, f"{prefix}.region", limits.max_label_chars, False),
    )
