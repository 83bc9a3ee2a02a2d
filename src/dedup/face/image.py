"""Image bytes to pixels, refusing what is not a JPEG or PNG of acceptable size.

Dimensions are read from the header before decoding, so an image bomb (a small file
that decodes to gigapixels) is refused without allocating its pixels.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
import numpy.typing as npt

from dedup.core.errors import InvalidArgument

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers carry the dimensions (all SOFn except DHT, JPG, DAC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}

Pixels = npt.NDArray[np.uint8]


def image_format(data: bytes) -> str:
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(PNG_MAGIC):
        return "PNG"
    return ""


def image_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the header is damaged."""
    if kind == "PNG":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return _jpeg_size(data)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in _SOF:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return int(width), int(height)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def decode_image(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Pixels:
    """Validated BGR pixels of a JPEG or PNG, or InvalidArgument saying why not."""
    return decode_checked(data, field, check_image(data, field, max_bytes, max_pixels))


def decode_checked(data: bytes, field: str, kind: str) -> Pixels:
    """The BGR pixels of an image `check_image` found to be a `kind` within the limits."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        raise InvalidArgument(field, f"undecodable {kind}: the image data is damaged")
    return np.asarray(pixels, dtype=np.uint8)


def check_image(data: bytes, field: str, max_bytes: int, max_pixels: int) -> str:
    """The format of a JPEG or PNG whose size, format and header are within the limits (no
    pixel decoded), or InvalidArgument saying why not."""
    if not data:
        raise InvalidArgument(field, "is empty")
    if len(data) > max_bytes:
        raise InvalidArgument(field, f"is {len(data):,} bytes, the limit is {max_bytes:,}")
    kind = image_format(data)
    if not kind:
        raise InvalidArgument(field, "unsupported format: send a JPEG or PNG image")
    size = image_size(data, kind)
    if size is None:
        raise InvalidArgument(field, f"undecodable {kind}: damaged header")
    width, height = size
    if width == 0 or height == 0:
        raise InvalidArgument(field, f"undecodable {kind}: {width}x{height} pixels")
    if width * height > max_pixels:
        raise InvalidArgument(
            field, f"is {width}x{height} = {width * height:,} pixels, the limit is {max_pixels:,}"
        )
    return kind
