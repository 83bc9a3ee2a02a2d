"""Face image quality of one capture, from what the pipeline already has; and its gate.

`assess` takes the decoded photo (BGR uint8), the SCRFD box and score of the face used, its
five landmarks (eye, eye, nose tip, mouth corner, mouth corner, in the photo's pixels), the
aligned 112x112 ArcFace crop and the norm of the ArcFace feature before normalisation, and
returns a `Quality`: each native measure, each component on a 0-100 scale (100 best) and a
unified score. Nothing is downloaded and no model runs: it costs 2-3 ms, 4-5% of a photo.

In the spirit of ISO/IEC 29794-5 (and of BSI's OFIQ, its reference implementation), each
native measure is mapped to 0-100, mostly by a logistic L(x; m, w) = 100 / (1 + e^-(x-m)/w),
which is 50 at the native value m; a negative w means lower native values are better.

component       native measure (unit)                                    mapping
face_size       shorter side of the detector's box (px in the photo)     L(x; 32, 4)
inter_eye       distance between the two eye landmarks (px)              L(x; 12, 2.5)
exposure        share of face pixels clipped dark (luma <= 15) or        L(x; 0.7, -0.07) of
                burnt out (luma >= 247), 0-1 each                        the larger share
contrast        dynamic range: 5th to 95th percentile of face luma        L(x; 12, 3)
                (grey levels)
uniformity      |left - right| / max(left, right) of the mean luma of    L(x; 0.5, -0.08)
                the two halves of the aligned face, 0-1
sharpness       share of the aligned face's gradient energy (Sobel) lost  L(x; 0.15, 0.03)
                when it is blurred again by a 1-px Gaussian, 0-1 (a sharp
                face loses about 0.35, a blurred one little: it has no
                fine detail left to lose)
compression     8x8 blockiness: mean |step| across the 8-px grid lines   L(x; 2.0, -0.3)
                (each axis at its strongest phase: a crop moves the
                grid) / mean |step| elsewhere, on the face, of the
                weaker axis: blocks raise both, stripes behind a face
                one; 1.0 unless the face itself (the box without a
                tenth a side) shows the grid at 1.4 or more, as a
                JPEG's does and a tiled wall's behind it does not
                (Yao Ming as a JPEG at quality 30 or better: 1.0; 20:
                1.7, 10: 2.3, 5: 3.9); or,
                if higher, the same on the grid of the period both
                axes' steps repeat at, 4.8-16 px (at most a fifth of the
                window), where the face shows it too: a JPEG
                resized after its compression has its blocks 8 x the
                factor apart (quality 5 enlarged 1.1-2x: 2.6-3.4; shrunk
                0.8-0.9x, which averages part of each edge away:
                2.0-2.2) over the whole photo, while tiles behind a face
                stop at it
roll, yaw,      head pose from the five landmarks (degrees; roll: eye     100 cos^2(angle),
pitch           line; yaw: nose off the eye-mouth midline; pitch: nose    0 from 90 degrees
                between eye and mouth lines), rough: +-15 degrees
detection       SCRFD's score of the face (0-1)                          L(x; 0.62, 0.04)
embedding_norm  L2 norm of the ArcFace feature before normalisation      L(x; 19, 1.5)

The face region is the aligned crop's rows 30-105, columns 22-89 (eyes to chin, cheek to
cheek, little background), so sharpness, exposure, contrast and uniformity do not depend on
the face's size in the photo; blockiness is measured on the photo itself (the JPEG grid
lives there), in a window of at most 256x256 px on the face. Noise and clipping raise the
sharpness measure (they add steps), so it reads true only beside exposure and contrast.

The unified score is the weighted geometric mean of the components that predict whether
the capture can be matched, measured on degraded real captures (benchmarks/quality.py):
embedding_norm x3, detection x2, and sharpness, exposure, contrast, compression, inter_eye
x1 each (each floored at 1, so that its logarithm stays finite). Pose, uniformity and face
size are reported and gated on their own, not in the unified score: the alignment undoes
roll, and undegraded real captures that match well reach 75 degrees of measured yaw.

The embedding norm, known as a weak quality signal for ArcFace, was the strongest single
predictor of the genuine score on those degraded captures (Spearman 0.74; detection 0.66;
sharpness 0.75-0.89 within blurs but -0.15 overall); it also depends on the person (20.5-30 on
undegraded captures), so its own minimum is loose and the unified score carries it.

The gate's minimums, per component and for the unified score, are
`dedup.core.settings.QualityGate` (configurable: `dedup serve --min-quality`, `--quality-min
COMPONENT=VALUE`, `--no-quality-gate`); `failure`/`refusal` apply them, and `Gate` is a
QualityGate with those two as methods. The defaults come from
benchmarks/quality.py: every degraded capture whose genuine score fell below the review
threshold is refused, no undegraded capture is, and each component refuses its own
degradation from about where the median genuine score falls to 0.6-0.7, so the desk hears
the cause. `Gate.failure` names the first failing component in the order of `Scores`,
causes first and the catch-alls (detection, embedding norm, unified) last, with a hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import cv2
import numpy as np
import numpy.typing as npt

from dedup.core.settings import QualityGate

Pixels = npt.NDArray[np.uint8]
_Floats = npt.NDArray[np.float64]

_FACE = (slice(30, 106), slice(22, 90))  # in the 112x112 aligned crop
_HALF = 34  # columns of the face region's left half
_UNDER, _OVER = 15, 247
_BLOCK_WINDOW = 256
_FACE_INSET = 0.1  # of the box on each side: the face itself, without background
# A grid's ratio on the face itself: uncompressed faces, and faces before tiles or shelves,
# read 0.85-1.2 there; JPEGs at quality 10 in place about 1.9, at quality 5 in place or
# resized by 0.8-2x 1.7-3.3.
_ON_FACE_MINIMUM = 1.4
_RESIZED_PERIODS = (4.8, 16.0)  # px: an 8-px grid resized by 0.6-2x
_SPECTRUM = 4096  # points of the steps' spectrum: a period's bin 0.006-0.06 px wide
# Depth of the nose tip in front of the eyes, in half inter-eye distances (a mean face);
# frontal nose height between the eye and mouth lines, and that height over the nose depth.
_NOSE_DEPTH, _NOSE_HEIGHT, _PITCH_GAIN = 0.7, 0.5, 3.3
_UNIFIED_WEIGHTS = {"embedding_norm": 3.0, "detection": 2.0, "sharpness": 1.0,
                    "exposure": 1.0, "contrast": 1.0, "compression": 1.0, "inter_eye": 1.0}


@dataclass(frozen=True)
class Measures:
    """Native measures, in the units of the module's table."""

    face_size: float
    inter_eye: float
    underexposed: float
    overexposed: float
    mean_luminance: float
    dynamic_range: float
    uniformity: float
    sharpness: float
    blockiness: float
    roll: float
    yaw: float
    pitch: float
    detection: float
    embedding_norm: float


@dataclass(frozen=True)
class Scores:
    """Each component on 0-100 (100 best), in the order the gate checks them."""

    face_size: float
    inter_eye: float
    exposure: float
    contrast: float
    uniformity: float
    sharpness: float
    compression: float
    roll: float
    yaw: float
    pitch: float
    detection: float
    embedding_norm: float


@dataclass(frozen=True)
class Quality:
    """One capture's quality: native measures, 0-100 components, unified score (0-100)."""

    measures: Measures
    scores: Scores
    unified: float


def _logistic(value: float, middle: float, width: float) -> float:
    exponent = max(-60.0, min(60.0, -(value - middle) / width))
    return 100.0 / (1.0 + math.exp(exponent))


def _frontal(degrees: float) -> float:
    return 100.0 * math.cos(math.radians(min(abs(degrees), 90.0))) ** 2


def _gray(image: Pixels) -> _Floats:
    luma = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return np.asarray(luma, dtype=np.float64)


def _gradient_energy(image: _Floats) -> float:
    dx = cv2.Sobel(image, cv2.CV_64F, 1, 0, ksize=3)
    dy = cv2.Sobel(image, cv2.CV_64F, 0, 1, ksize=3)
    return float(np.mean(dx * dx + dy * dy))


def _sharpness(face: _Floats) -> float:
    energy = _gradient_energy(face)
    if energy < 1e-6:
        return 0.0
    blurred = np.asarray(cv2.GaussianBlur(face, (0, 0), 1.0), dtype=np.float64)
    return max(0.0, 1.0 - _gradient_energy(blurred) / energy)


def _pose(landmarks: _Floats) -> tuple[float, float, float, float]:
    """(roll, yaw, pitch) in degrees and the inter-eye distance in px, from 5 landmarks.

    Roll is the eye line's angle. With the landmarks turned upright, a nose tip standing
    _NOSE_DEPTH half eye distances in front of the eyes moves sideways by depth * tan(yaw)
    from the midline between the eyes' and the mouth's midpoints, and up or down between
    the eye and mouth lines with pitch. Positive yaw: nose toward the photo's right;
    positive pitch: nose toward the mouth (head bowed).
    """
    left, right = landmarks[0], landmarks[1]
    dx, dy = right - left
    roll = math.atan2(dy, dx)
    cos, sin = math.cos(roll), math.sin(roll)
    upright = (landmarks - (left + right) / 2) @ np.array([[cos, -sin], [sin, cos]])
    half = max(float(upright[1, 0] - upright[0, 0]) / 2, 1e-6)
    nose, mouth = upright[2], (upright[3] + upright[4]) / 2
    yaw = math.atan((nose[0] - mouth[0] / 2) / half / _NOSE_DEPTH)
    height = max(float(mouth[1]), 1e-6)
    pitch = math.atan((nose[1] / height - _NOSE_HEIGHT) * _PITCH_GAIN)
    inter_eye = float(math.hypot(dx, dy))
    return math.degrees(roll), math.degrees(yaw), math.degrees(pitch), inter_eye


def _grid_phase(lines: _Floats) -> float:
    """Where an 8-px grid of the steps across lines lies: its phase is found, not assumed.

    A JPEG cropped by a few pixels before it is re-encoded keeps its blocks off the photo's
    own grid (a 1-px crop read as uncompressed). It is the phase whose lines' median step is
    the highest: blocks raise every line of their grid, a straight edge (a collar, a mask's
    rim) only its own."""
    return float(np.argmax([np.median(lines[p::8]) for p in range(8)]))


def _resized_grid(lines: _Floats) -> tuple[float, float] | None:
    """(period, phase) in px of the grid at which the steps across lines repeat most
    strongly, or None for lines too few to hold five lines of its grid.

    A JPEG resized after its compression keeps its blocks at the resized period, rarely a
    whole number of pixels. Its grid lines are a train of spikes, whose spectrum peaks at
    the period's harmonics (those past the sampling's half folded back): the period is the
    one whose first three harmonics hold the most power once the face's slow changes are
    taken out. That favours half the true period (its harmonics are the true one's even
    ones, which the taking out keeps more of), so twice the period is tried as well, and
    the one whose grid reads the higher ratio is kept."""
    longest = min(_RESIZED_PERIODS[1], lines.size / 5)
    bins = np.arange(math.ceil(_SPECTRUM / longest),
                     math.floor(_SPECTRUM / _RESIZED_PERIODS[0]) + 1)
    if not bins.size:
        return None
    spikes = _spikes(lines)
    power = np.abs(np.fft.rfft(spikes, _SPECTRUM)) ** 2
    harmonics = sum(power[_folded(k * bins)] for k in (1, 2, 3))
    period = _SPECTRUM / float(bins[int(np.argmax(harmonics))])
    grids = [(p, _phase(spikes, p)) for p in (period, 2 * period) if p <= longest]
    return max(grids, key=lambda grid: _axis_ratio(_steps_on(lines, *grid)))


def _folded(bins: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Spectrum bins past the sampling's half, where a sampled spike train shows them."""
    return np.where(bins > _SPECTRUM // 2, _SPECTRUM - bins, bins)


def _phase(spikes: _Floats, period: float) -> float:
    """Where the grid of `period` px lies, by the angle of its first harmonic."""
    harmonic = np.sum(spikes * np.exp(-2j * np.pi * np.arange(spikes.size) / period))
    return (-float(np.angle(harmonic)) / (2 * math.pi) * period) % period


def _steps_on(lines: _Floats, period: float, phase: float) -> tuple[float, float]:
    """The mean step on the grid's lines (each one's nearest column), and elsewhere."""
    offset = (np.arange(lines.size) - phase) % period
    on_grid = np.minimum(offset, period - offset) <= 0.5
    if on_grid.all() or not on_grid.any():  # too few lines to tell
        return 1.0, 1.0
    return float(lines[on_grid].mean()), float(lines[~on_grid].mean())


def _resized_step_ratio(across: _Floats, down: _Floats, face: tuple[slice, slice],
                        lines: tuple[_Floats, _Floats] | None = None) -> float:
    """_grid_ratio on the grid of a JPEG resized after its compression; 1.0 when the two axes
    do not repeat at one period (within 3%: a resize scales both alike). `lines`: each
    axis's mean steps, when the caller has them."""
    lines = lines or (across.mean(axis=0), down.mean(axis=0))
    grid_across, grid_down = (_resized_grid(axis) for axis in lines)
    if grid_across is None or grid_down is None:
        return 1.0
    longer = max(grid_across[0], grid_down[0])
    if abs(grid_across[0] - grid_down[0]) > 0.03 * longer:
        return 1.0
    return _grid_ratio(across, down, face, lines, (grid_across, grid_down))


def _grid_ratio(across: _Floats, down: _Floats, face: tuple[slice, slice],
                lines: tuple[_Floats, _Floats],
                grids: tuple[tuple[float, float], tuple[float, float]]) -> float:
    """_step_ratio on these grids (period, phase) of the two axes, whose mean steps are
    `lines`; 1.0 when the face itself does not show them. A JPEG's grid covers the whole
    photo; tiles or shelves behind the face, which repeat along both axes too, stop at it."""
    grid_across, grid_down = grids
    rows, columns = face
    face_across, face_down = across[rows, columns], down[columns, rows]
    if not face_across.size or not face_down.size:  # a box mostly outside the photo
        return 1.0
    on_face = (_steps_on(face_across.mean(axis=0), *_shifted(grid_across, columns)),
               _steps_on(face_down.mean(axis=0), *_shifted(grid_down, rows)))
    if not _step_ratio(*on_face) >= _ON_FACE_MINIMUM:
        return 1.0
    return _step_ratio(_steps_on(lines[0], *grid_across), _steps_on(lines[1], *grid_down))


def _shifted(grid: tuple[float, float], part: slice) -> tuple[float, float]:
    """The grid as seen from the start of a part of the lines."""
    period, phase = grid
    return period, (phase - (part.start or 0)) % period


def _spikes(lines: _Floats) -> _Floats:
    return lines - cv2.GaussianBlur(lines.reshape(1, -1), (0, 0), 2.0).ravel()


def _step_ratio(*axes: tuple[float, float]) -> float:
    """The weaker axis's steps on the grid over steps elsewhere: a JPEG's blocks raise the
    grid's lines across and down alike, stripes behind a face only those along one."""
    return min(_axis_ratio(steps) for steps in axes)


def _axis_ratio(steps: tuple[float, float]) -> float:
    at, inside = steps
    return (at + 0.25) / (inside + 0.25)


def _blockiness(pixels: Pixels, box: tuple[float, float, float, float]) -> float:
    """Steps on a JPEG's block grid over steps elsewhere, on the face in the photo, of the
    weaker axis: the 8-px grid, or the grid of a JPEG resized after its compression if that
    reads higher. NaN for a box that is not finite."""
    if not all(math.isfinite(v) for v in box):
        return math.nan  # fails the gate
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w = min((x2 - x1) * 0.6, _BLOCK_WINDOW / 2)
    half_h = min((y2 - y1) * 0.6, _BLOCK_WINDOW / 2)
    top, left = max(0, int(cy - half_h)), max(0, int(cx - half_w))
    window = pixels[top:max(top, int(cy + half_h)), left:max(left, int(cx + half_w))]
    if min(window.shape[:2]) < 25:  # under 3 lines a phase, one straight edge would pick it
        return 1.0
    region = _gray(window)
    face = (_inset(y1, y2, top), _inset(x1, x2, left))
    across, down = np.abs(np.diff(region, axis=1)), np.abs(np.diff(region, axis=0)).T
    lines = across.mean(axis=0), down.mean(axis=0)
    eight_px = tuple((8.0, _grid_phase(axis)) for axis in lines)
    in_place = _grid_ratio(across, down, face, lines, (eight_px[0], eight_px[1]))
    resized = _resized_step_ratio(across, down, face, lines)
    return max(in_place, resized)


def _inset(start: float, end: float, origin: int) -> slice:
    """The box's side without _FACE_INSET at each end, from `origin` of the region."""
    inset = _FACE_INSET * (end - start)
    return slice(max(0, int(start + inset) - origin), max(0, int(end - inset) - origin))


def measure(pixels: Pixels, box: npt.ArrayLike, detection_score: float,
            landmarks: npt.ArrayLike, aligned: Pixels, embedding_norm: float) -> Measures:
    """The native measures of one capture (see the module's table)."""
    marks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)[:5]
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).ravel()[:4])
    face = _gray(aligned)[_FACE]
    low, high = np.percentile(face, [5, 95])
    left, right = float(face[:, :_HALF].mean()), float(face[:, _HALF:].mean())
    roll, yaw, pitch, inter_eye = _pose(marks)
    return Measures(
        face_size=min(x2 - x1, y2 - y1), inter_eye=inter_eye,
        underexposed=float(np.mean(face <= _UNDER)), overexposed=float(np.mean(face >= _OVER)),
        mean_luminance=float(face.mean()), dynamic_range=float(high - low),
        uniformity=abs(left - right) / max(left, right, 1.0), sharpness=_sharpness(face),
        blockiness=_blockiness(pixels, (x1, y1, x2, y2)), roll=roll, yaw=yaw, pitch=pitch,
        detection=float(detection_score), embedding_norm=float(embedding_norm))


def score(m: Measures) -> Scores:
    """Maps each native measure to 0-100 (see the module's table)."""
    return Scores(
        face_size=_logistic(m.face_size, 32.0, 4.0),
        inter_eye=_logistic(m.inter_eye, 12.0, 2.5),
        exposure=_logistic(max(m.underexposed, m.overexposed), 0.7, -0.07),
        contrast=_logistic(m.dynamic_range, 12.0, 3.0),
        uniformity=_logistic(m.uniformity, 0.5, -0.08),
        sharpness=_logistic(m.sharpness, 0.15, 0.03),
        compression=_logistic(m.blockiness, 2.0, -0.3),
        roll=_frontal(m.roll), yaw=_frontal(m.yaw), pitch=_frontal(m.pitch),
        detection=_logistic(m.detection, 0.62, 0.04),
        embedding_norm=_logistic(m.embedding_norm, 19.0, 1.5))


def unified(scores: Scores) -> float:
    """The weighted geometric mean of the predictive components (module docstring)."""
    total = sum(_UNIFIED_WEIGHTS.values())
    logs = sum(weight * math.log(max(getattr(scores, name), 1.0) / 100.0)
               for name, weight in _UNIFIED_WEIGHTS.items())
    return 100.0 * math.exp(logs / total)


def assess(pixels: Pixels, box: npt.ArrayLike, detection_score: float,
           landmarks: npt.ArrayLike, aligned: Pixels, embedding_norm: float) -> Quality:
    """The quality of one capture: native measures, 0-100 components, unified score."""
    measures = measure(pixels, box, detection_score, landmarks, aligned, embedding_norm)
    scores = score(measures)
    return Quality(measures, scores, unified(scores))


# What to tell the desk, per component: a retake hint and the native value, worded.
_HINTS: dict[str, tuple[str, Callable[[Measures], str]]] = {
    "face_size": ("move the camera closer so the face fills more of the photo",
                  lambda m: f"the face is {m.face_size:.0f} px"),
    "inter_eye": ("move the camera closer so the face fills more of the photo",
                  lambda m: f"the eyes are {m.inter_eye:.0f} px apart"),
    "exposure": ("retake the photo in even light, neither dark nor over-exposed",
                 lambda m: f"{100 * max(m.underexposed, m.overexposed):.0f}% of the face is "
                 f"{'dark' if m.underexposed > m.overexposed else 'burnt out'}"),
    "contrast": ("retake the photo in better light: the face shows too few shades",
                 lambda m: f"{m.dynamic_range:.0f} grey levels"),
    "uniformity": ("light the face evenly from the front, without a shadow on one side",
                   lambda m: f"halves differ by {100 * m.uniformity:.0f}%"),
    "sharpness": ("retake the photo without motion",
                  lambda m: "hold the camera still and focus on the face"),
    "compression": ("send the camera's photo, not a heavily compressed copy",
                    lambda m: f"blockiness {m.blockiness:.1f}"),
    "roll": ("hold the camera upright and the head straight",
             lambda m: f"tilted {abs(m.roll):.0f} degrees"),
    "yaw": ("ask the person to face the camera", lambda m: f"turned {abs(m.yaw):.0f} degrees"),
    "pitch": ("ask the person to look straight into the camera, chin level",
              lambda m: f"tipped {abs(m.pitch):.0f} degrees"),
    "detection": ("retake the photo with the whole face clearly visible",
                  lambda m: f"detector score {m.detection:.2f}"),
    "embedding_norm": ("the face is not clear enough to recognise: retake it upright, "
                       "facing the camera, in even light",
                       lambda m: f"feature norm {m.embedding_norm:.1f}"),
}


@dataclass(frozen=True)
class Failure:
    """The first component under its minimum, and the message for the desk."""

    component: str  # a field of Scores, or "unified"
    value: float
    minimum: float
    message: str


class Gate(QualityGate):
    """The gate's minimums (dedup.core.settings.QualityGate) with its checks."""

    def failure(self, quality: Quality) -> Failure | None:
        return failure(self, quality)

    def refusal(self, quality: Quality) -> str | None:
        return refusal(self, quality)


def failure(gate: QualityGate, quality: Quality) -> Failure | None:
    """The first component under its minimum (in the order of Scores), else unified."""
    for item in fields(Scores):
        value, minimum = getattr(quality.scores, item.name), getattr(gate, item.name)
        if not value >= minimum:  # NaN (from NaN landmarks, say) fails too
            hint, native = _HINTS[item.name]
            return Failure(item.name, value, minimum, _message(
                item.name, value, minimum, f"{hint} ({native(quality.measures)})"))
    if not quality.unified >= gate.unified:
        weakest = min(_UNIFIED_WEIGHTS, key=lambda name: getattr(quality.scores, name))
        return Failure("unified", quality.unified, gate.unified, _message(
            "unified quality", quality.unified, gate.unified,
            f"{_HINTS[weakest][0]} (the weakest: {weakest.replace('_', ' ')} "
            f"{getattr(quality.scores, weakest):.0f})"))
    return None


def refusal(gate: QualityGate, quality: Quality) -> str | None:
    """Why the capture is refused, for the desk, or None when it passes."""
    failed = failure(gate, quality)
    return None if failed is None else failed.message


def _message(name: str, value: float, minimum: float, hint: str) -> str:
    # Rounded down: never "35 is below the minimum 35".
    shown = math.floor(value) if math.isfinite(value) else value
    return f"{name.replace('_', ' ')} {shown} is below the minimum {minimum:g}: {hint}"
