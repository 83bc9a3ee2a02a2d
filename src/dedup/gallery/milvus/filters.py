"""Milvus filter expressions, with string values as escaped literals."""

from __future__ import annotations

import json

from dedup.core.records import DeleteKey, Registration
from dedup.gallery.milvus.schema import ACTIVE, now_us

# The field each erasure key filters on.
DELETE_FIELDS = {DeleteKey.REGISTRATION_ID: "registration_id",
                 DeleteKey.ID_NUMBER: "id_number", DeleteKey.MSISDN: "msisdn"}


def literal(value: str) -> str:
    """A string as a Milvus filter literal: quoted, with quotes and backslashes escaped."""
    return json.dumps(value, ensure_ascii=False)


def equals(field: str, value: str) -> str:
    return f"{field} == {literal(value)}"


def live(pending: bool, claim_timeout_s: float, exclude: int | None = None) -> str:
    """Rows a read counts: ACTIVE ones, and with `pending` the claims made less than
    `claim_timeout_s` ago too; never the row `exclude`."""
    if not pending:
        return f"state == {ACTIVE}"
    cutoff = now_us() - int(claim_timeout_s * 1e6)
    text = f"(state == {ACTIVE} or claimed_at_us >= {cutoff})"
    return text if exclude is None else f"{text} and key != {exclude}"


def same_model(model_id: str) -> str:
    """Rows whose embedding the model `model_id` made (the only ones comparable to its)."""
    return equals("embedding_model", model_id)


def key_holders(registration: Registration) -> str:
    """Rows holding the registration's registration_id or (when it has one) its msisdn."""
    keys = equals("registration_id", registration.registration_id)
    if registration.msisdn:
        keys = f"({keys} or {equals('msisdn', registration.msisdn)})"
    return keys


def any_key_holders(registrations: list[Registration]) -> str:
    """Rows holding any of the registrations' registration_ids or msisdns."""
    ids = sorted({registration.registration_id for registration in registrations})
    msisdns = sorted({registration.msisdn for registration in registrations
                      if registration.msisdn})
    keys = f"registration_id in [{', '.join(map(literal, ids))}]"
    if msisdns:
        keys = f"({keys} or msisdn in [{', '.join(map(literal, msisdns))}])"
    return keys
