"""Reading what a form sent: the search form's photo (bounded like Face.image, kept in memory
and never spooled to a file) and the numbers, dates and texts of the fields, each refused
with a message naming the field."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

FORM_OVERHEAD = 64 * 1024  # the other fields and the multipart framing


@dataclass
class Form:
    """What a form posted: its text fields, and for the search form the photo."""

    fields: dict[str, str]
    photo: bytes = b""
    photo_type: str = ""

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


class UploadRefused(Exception):
    """A form refused before it reached its page: the title and text of the message shown."""

    def __init__(self, title: str, text: str, status_code: int) -> None:
        super().__init__(text)
        self.title, self.text, self.status_code = title, text, status_code


class FieldError(ValueError):
    """A form field that cannot be used: its label and why."""

    def __init__(self, label: str, why: str) -> None:
        super().__init__(f"{label}: {why}")


def _too_large(size: int, limit: int) -> UploadRefused:
    return UploadRefused("Photo too large", f"The upload is {size:,} bytes; a photo may be at "
                         f"most {limit:,} bytes (as Face.image): nothing was sent.", 413)


async def read_multipart(request: Request, limit: int) -> Form:
    """The fields and the one photo of a multipart form; UploadRefused when the body says it
    is too large (before it is read) or turns out to be."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise _too_large(int(declared), limit)
    parser = MultiPartParser(request.headers, _bounded(request, limit + FORM_OVERHEAD),
                             max_files=1, max_fields=50, max_part_size=8192)
    parser.spool_max_size = limit + FORM_OVERHEAD  # memory only: the bounded body fits
    try:
        data = await parser.parse()
    except MultiPartException as error:
        raise UploadRefused("Form refused", str(error), 400) from None
    fields = {name: value for name, value in data.items() if isinstance(value, str)}
    upload = data.get("photo")
    if not isinstance(upload, UploadFile) or not upload.filename:
        return Form(fields)
    photo = await upload.read(limit + 1)
    await upload.close()
    if len(photo) > limit:
        raise _too_large(len(photo), limit)
    return Form(fields, photo, upload.content_type or "application/octet-stream")


async def _bounded(request: Request, most: int) -> AsyncGenerator[bytes, None]:
    """The body, refused once it is larger than `most` (a body without a length)."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > most:
            raise _too_large(seen, most - FORM_OVERHEAD)
        yield chunk


def whole(form: Form, name: str, label: str, low: int, high: int, default: int) -> int:
    text = form.get(name).strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise FieldError(label, f"{text!r} is not a whole number") from None
    if not low <= value <= high:
        raise FieldError(label, f"must be {low} to {high}, got {value}")
    return value


def score(form: Form, name: str, label: str) -> float | None:
    text = form.get(name).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise FieldError(label, f"{text!r} is not a number") from None
    if not -1.0 <= value <= 1.0:
        raise FieldError(label, f"a cosine score is within -1 to 1, got {value}")
    return value


def moment(form: Form, name: str, label: str) -> datetime | None:
    """A date or date-time (`datetime-local`), taken as UTC."""
    text = form.get(name).strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise FieldError(label, f"{text!r} is not a date and time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
