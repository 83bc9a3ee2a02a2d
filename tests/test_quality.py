"""Face image quality on real captures: each component moves the right way, the gate says why.

The captures are the packaged photos, cut at test time (tests/photos.py), through the real
model pack: SCRFD's box, score and landmarks, the aligned crop and the ArcFace feature norm,
as the embedder has them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from photos import GDP, YAOMING, Crop, cut_single_faces

from dedup.core.errors import InvalidArgument
from dedup.core.settings import CaptureRules
from dedup.face import quality as face_quality
from dedup.face.embedder import choose_face
from dedup.face.quality import Gate, Quality, Scores, assess

Image = np.ndarray
Measure = Callable[[Image], "Quality | None"]


@pytest.fixture(scope="module")
def quality_of() -> Measure:
    """A photo (BGR) -> its Quality, or None when the capture rules refuse it."""
    import onnxruntime
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align

    from dedup.face.model_pack import default_pack_dir

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    analyzer = FaceAnalysis(name=str(default_pack_dir()),
                            allowed_modules=["detection", "recognition"],
                            providers=["CPUExecutionProvider"], sess_options=options)
    analyzer.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    recogniser, rules = analyzer.models["recognition"], CaptureRules()

    def measure(image: Image) -> Quality | None:
        boxes, landmarks = analyzer.det_model.detect(image, max_num=0)
        try:
            index, _ = choose_face(boxes, rules, False, "face.image")
        except InvalidArgument:
            return None
        crop = face_align.norm_crop(image, landmark=landmarks[index], image_size=112)
        norm = float(np.linalg.norm(recogniser.get_feat([crop])[0]))
        return assess(image, boxes[index, :4], float(boxes[index, 4]), landmarks[index], crop,
                      norm)

    return measure


@pytest.fixture(scope="module")
def yao() -> Image:
    """yaoming.jpg: one frontal face, 105 px, yaw and roll within 5 degrees."""
    image = cv2.imread(str(YAOMING))
    assert image is not None
    return image


def reencoded(image: Image, quality: int = 95) -> Image:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    assert ok and decoded is not None
    return decoded


def scaled(image: Image, factor: float | Image) -> Image:
    return np.clip(image * factor, 0, 255).astype(np.uint8)


def measured(quality_of: Measure, image: Image) -> Quality:
    quality = quality_of(image)
    assert quality is not None, "the capture rules refused the degraded capture"
    return quality


def test_blurring_lowers_sharpness_and_the_embedding_norm(
        quality_of: Measure, yao: Image) -> None:
    sharp = measured(quality_of, yao)
    blurs = [measured(quality_of, cv2.GaussianBlur(yao, (0, 0), sigma)) for sigma in (1.5, 3.0)]
    values = [q.measures.sharpness for q in (sharp, *blurs)]
    assert values == sorted(values, reverse=True) and values[0] - values[-1] > 0.2
    assert sharp.scores.sharpness > 95 > 50 > blurs[-1].scores.sharpness
    assert sharp.measures.embedding_norm > blurs[-1].measures.embedding_norm + 2
    assert sharp.unified > blurs[-1].unified


def test_darkening_and_over_exposure_lower_exposure_and_contrast(
        quality_of: Measure, yao: Image) -> None:
    normal = measured(quality_of, yao)
    dark = measured(quality_of, reencoded(scaled(yao, 0.07)))
    bright = measured(quality_of, reencoded(scaled(yao, 3.0)))
    assert normal.scores.exposure > 99
    assert dark.measures.underexposed > 0.5 > normal.measures.underexposed
    assert bright.measures.overexposed > 0.5 > normal.measures.overexposed
    assert dark.scores.exposure < 50 and bright.scores.exposure < 50
    assert dark.measures.mean_luminance < 30 < normal.measures.mean_luminance
    assert max(dark.measures.dynamic_range, bright.measures.dynamic_range) \
        < normal.measures.dynamic_range / 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_shadow_on_one_side_lowers_uniformity(quality_of: Measure, yao: Image, side: str) -> None:
    shadow = np.ones(yao.shape[1])
    nose_x = 126  # yaoming.jpg's nose tip, as SCRFD places it
    shadow[slice(None, nose_x) if side == "left" else slice(nose_x, None)] = 0.3
    even = measured(quality_of, yao)
    shaded = measured(quality_of, reencoded(scaled(yao, shadow[None, :, None])))
    assert shaded.measures.uniformity > even.measures.uniformity + 0.3
    assert shaded.scores.uniformity < even.scores.uniformity


def squeezed_half(image: Image, pivot_x: float, factor: float) -> Image:
    """The part of the photo left of `pivot_x` squeezed horizontally (the far half of a
    turned head is foreshortened): the nose ends nearer the left eye than the right."""
    h, w = image.shape[:2]
    xs = np.arange(w, dtype=np.float32)
    source_x = np.where(xs < pivot_x, pivot_x - (pivot_x - xs) / factor, xs)
    map_x = np.repeat(source_x[None, :], h, axis=0).astype(np.float32)
    map_y = np.repeat(np.arange(h, dtype=np.float32)[:, None], w, axis=1)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def test_a_turned_face_raises_yaw_and_a_tilted_one_roll(
        quality_of: Measure, yao: Image) -> None:
    frontal = measured(quality_of, yao)
    assert abs(frontal.measures.yaw) < 10 and abs(frontal.measures.roll) < 10
    nose_x = 126.0  # yaoming.jpg's nose tip, as SCRFD places it
    turned = measured(quality_of, squeezed_half(yao, nose_x, 0.35))
    assert abs(turned.measures.yaw) > abs(frontal.measures.yaw) + 15
    assert turned.scores.yaw < frontal.scores.yaw
    mirrored = measured(quality_of, cv2.flip(squeezed_half(yao, nose_x, 0.35), 1))
    assert np.sign(mirrored.measures.yaw) == -np.sign(turned.measures.yaw)
    centre = (yao.shape[1] / 2, yao.shape[0] / 2)
    tilted = measured(quality_of, cv2.warpAffine(
        yao, cv2.getRotationMatrix2D(centre, 30, 1.0), yao.shape[1::-1],
        borderMode=cv2.BORDER_REPLICATE))
    assert abs(tilted.measures.roll - frontal.measures.roll) == pytest.approx(30, abs=6)
    assert tilted.scores.roll < frontal.scores.roll


def test_jpeg_at_quality_5_raises_blockiness(
        quality_of: Measure, yao: Image) -> None:
    original = measured(quality_of, yao)
    compressed = measured(quality_of, reencoded(yao, 5))
    assert original.measures.blockiness < 1.3
    assert compressed.measures.blockiness > original.measures.blockiness + 1.0
    assert compressed.scores.compression < 20 < 90 < original.scores.compression


@pytest.mark.parametrize("moved", [1, 3, 5])
def test_jpeg_blocks_off_the_photos_grid_are_still_found(
        quality_of: Measure, yao: Image, moved: int) -> None:
    # Cropped by a few pixels before it is re-encoded, a JPEG keeps its blocks off the
    # photo's own 8-px grid: blockiness measured on that grid alone read 0.6 (uncompressed).
    aligned = measured(quality_of, reencoded(yao, 5))
    off_grid = measured(quality_of, reencoded(reencoded(yao, 5)[moved:, moved:]))
    assert off_grid.measures.blockiness > 3.0
    assert off_grid.measures.blockiness > aligned.measures.blockiness - 1.0
    assert refusal(off_grid).startswith("compression ")


def resized(image: Image, factor: float) -> Image:
    h, w = image.shape[:2]
    shrinking = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=shrinking)


@pytest.mark.parametrize("factor", [1.1, 1.25, 1.5, 2.0])
def test_a_jpeg_enlarged_after_compression_is_refused(
        quality_of: Measure, yao: Image, factor: float) -> None:
    # Enlarged after its compression, a JPEG's blocks are factor x 8 px apart: measured on
    # an 8-px grid alone they read 0.9-2.1 and passed (in place: 4.1).
    compressed = measured(quality_of, reencoded(resized(reencoded(yao, 5), factor)))
    assert compressed.measures.blockiness > 2.42  # the default minimum's
    assert refusal(compressed).startswith("compression ")


@pytest.mark.parametrize("factor", [0.8, 0.9])
def test_a_jpeg_shrunk_after_compression_reads_as_compressed(
        quality_of: Measure, yao: Image, factor: float) -> None:
    # Shrinking averages part of each block's edge away: it reads 2.0-2.2, under the gate's
    # minimum, where the 8-px grid alone read 1.1-1.2, as uncompressed.
    compressed = measured(quality_of, reencoded(resized(reencoded(yao, 5), factor)))
    plain = measured(quality_of, reencoded(resized(yao, factor)))
    assert compressed.measures.blockiness > 1.8
    assert compressed.scores.compression < 60 < 90 < plain.scores.compression


@pytest.mark.parametrize("factor", [0.6, 0.8, 1.25, 1.5, 2.0])
def test_an_uncompressed_photo_resized_is_not_taken_for_a_compressed_one(
        quality_of: Measure, yao: Image, factor: float) -> None:
    plain = measured(quality_of, reencoded(resized(yao, factor)))
    assert plain.measures.blockiness < 1.3
    assert plain.scores.compression > 90


@pytest.mark.parametrize("period", [6.4, 10.0, 12.0])
def test_steps_repeating_along_one_axis_are_no_resized_grid(period: float) -> None:
    # A resize scales both axes alike; stripes behind a face, or a face's rows of brows,
    # eyes and mouth, repeat along one. Steps of 40 on a grid of `period` px, noise of 2;
    # the noise's own strongest period falls within 3% of the stripes' for a few seeds.
    on_grid = np.abs((np.arange(200) + period / 2) % period - period / 2) <= 0.5
    elsewhere = np.abs((np.arange(200) + 4.0) % 9.0 - 4.5) <= 0.5  # another period
    whole = (slice(None), slice(None))
    for seed in range(50):
        noise = np.abs(np.random.default_rng(seed).normal(0.0, 2.0, (2, 200, 200)))
        across = noise[0] + 40.0 * on_grid[None, :]
        grid = noise[1] + 40.0 * on_grid[None, :]
        assert face_quality._resized_step_ratio(across, grid, whole) > 5.0
        assert face_quality._resized_step_ratio(across, noise[1], whole) < 1.1
        other = noise[1] + 40.0 * elsewhere[None, :]
        assert face_quality._resized_step_ratio(across, other, whole) < 1.1
    # The face's part of the region starts off the grid's phase on both axes.
    face = (slice(27, 163), slice(23, 171))
    assert face_quality._resized_step_ratio(across, grid, face) > 5.0
    assert face_quality._resized_step_ratio(across, grid, (slice(300, 400), slice(0, 9))) == 1.0


def behind_yao(image: Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, outside): each pixel's row and column, and whether it lies outside an
    ellipse round Yao Ming's face (SCRFD's box: 72-177, 73-212)."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    return y, x, ((x - 124.0) / 53.0) ** 2 + ((y - 143.0) / 77.0) ** 2 > 1.0


def striped_behind(image: Image, period: int, rows: bool) -> Image:
    """Stripes of `period` px (blinds, shelves, tiles) in 65 and 185 grey levels behind Yao
    Ming: everywhere outside an ellipse round his face."""
    y, x, outside = behind_yao(image)
    dark = (((y if rows else x) + 3) // (period // 2)) % 2 == 0
    striped = image.copy()
    striped[outside & dark], striped[outside & ~dark] = 65, 185
    return striped


@pytest.mark.parametrize("period", [8, 16, 24])
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "columns"])
def test_stripes_behind_a_face_are_no_compression(
        quality_of: Measure, yao: Image, period: int, rows: bool) -> None:
    # Their edges 8 px apart on one axis, they read as JPEG blocks (blockiness 2.2-5.7:
    # refused, "send the camera's photo"); a JPEG's blocks raise both axes' grids.
    striped = measured(quality_of, reencoded(striped_behind(yao, period, rows)))
    assert striped.measures.blockiness < 1.6
    assert Gate().failure(striped) is None


@pytest.mark.parametrize("period", [8, 10, 12, 14, 16])
def test_tiles_behind_a_face_are_no_compression(
        quality_of: Measure, yao: Image, period: int) -> None:
    # Grout lines every `period` px on both axes, as a JPEG's grid, in place (8, 16: read
    # 2.2 and 1.7) or resized (10-14: 2.4-2.8, refused): but a JPEG's grid covers the face
    # too, and a wall's stops at it.
    y, x, outside = behind_yao(yao)
    grout = outside & ((x % period == 0) | (y % period == 0))
    tiled = yao.astype(np.int16)
    tiled[grout] -= 40
    tiles = measured(quality_of, reencoded(np.clip(tiled, 0, 255).astype(np.uint8)))
    assert tiles.measures.blockiness < 1.6
    assert Gate().failure(tiles) is None


def test_face_regions_of_every_small_size_are_measured() -> None:
    # The resized grid's search once had no period to try on a 25-px region (24 lines
    # hold no five lines of a 4.8-px grid) and raised: the photo's call failed INTERNAL.
    rng = np.random.default_rng(3)
    for side in range(25, 64):
        for height, width in ((side, side), (side, 256), (256, side)):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            box = (0.0, 0.0, float(width), float(height))
            assert math.isfinite(face_quality._blockiness(pixels, box))
    assert math.isnan(face_quality._blockiness(pixels, (math.nan, 0.0, 40.0, 40.0)))


def test_downscaling_lowers_face_size_and_inter_eye_distance(
        quality_of: Measure, yao: Image) -> None:
    full = measured(quality_of, yao)
    h, w = yao.shape[:2]
    small = measured(quality_of, cv2.resize(yao, (int(w * 0.35), int(h * 0.35)),
                                            interpolation=cv2.INTER_AREA))
    for name in ("face_size", "inter_eye"):
        ratio = getattr(small.measures, name) / getattr(full.measures, name)
        assert ratio == pytest.approx(0.35, abs=0.07), name
        assert getattr(small.scores, name) < getattr(full.scores, name)


def refusal(quality: Quality, gate: Gate | None = None) -> str:
    message = (gate or Gate()).refusal(quality)
    assert message is not None, "the gate let the capture pass"
    return message


def with_scores(quality: Quality, **scores: float) -> Quality:
    return dataclasses.replace(quality, scores=dataclasses.replace(quality.scores, **scores))


def test_the_gate_names_the_component_its_value_and_the_minimum(
        quality_of: Measure, yao: Image) -> None:
    good = measured(quality_of, yao)
    assert Gate().refusal(good) is None
    blurred = with_scores(good, sharpness=12.4)
    assert refusal(blurred).startswith("sharpness 12 is below the minimum 35: "
                                       "retake the photo without motion")
    failure = Gate(sharpness=20).failure(blurred)
    assert failure is not None
    assert (failure.component, failure.value, failure.minimum) == ("sharpness", 12.4, 20)
    assert Gate(sharpness=10).refusal(blurred) is None
    # The first failing component in the order of Scores: size before sharpness.
    both = with_scores(good, sharpness=12.0, face_size=20.0)
    assert refusal(both).startswith("face size 20 is below the minimum 50")
    # A value just under its minimum is never shown as equal to it.
    assert "34 is below the minimum 35" in refusal(with_scores(good, sharpness=34.96))
    # A score that is not a number (a pose from NaN landmarks) fails; it passed every
    # comparison before.
    assert refusal(with_scores(good, yaw=math.nan)).startswith("yaw nan is below the minimum")
    assert refusal(dataclasses.replace(good, unified=math.nan)).startswith(
        "unified quality nan is below the minimum")


def test_unified_score_refusal_names_the_weakest_component(
        quality_of: Measure, yao: Image) -> None:
    good = measured(quality_of, yao)
    marginal = dataclasses.replace(with_scores(good, embedding_norm=31.0), unified=60.0)
    message = refusal(marginal)
    assert message.startswith("unified quality 60 is below the minimum 75: ")
    assert "the weakest: embedding norm 31" in message


def test_real_degraded_captures_are_refused_with_their_cause(
        quality_of: Measure, yao: Image) -> None:
    blurred = measured(quality_of, cv2.GaussianBlur(yao, (0, 0), 4.6))  # 0.10 inter-eye
    assert refusal(blurred).startswith("sharpness ")
    bright = measured(quality_of, reencoded(scaled(yao, 3.0)))
    message = refusal(bright)
    assert message.startswith("exposure ")
    assert "% of the face is burnt out" in message
    upside_down = measured(quality_of, cv2.rotate(yao, cv2.ROTATE_180))
    refusal(upside_down)  # its genuine score is 0.04: it must not pass


def test_gate_minimums_are_0_to_100() -> None:
    with pytest.raises(ValueError, match="sharpness must be within 0-100"):
        Gate(sharpness=120)
    assert {f.name for f in dataclasses.fields(Gate)} == \
        {f.name for f in dataclasses.fields(Scores)} | {"unified"}


def test_undegraded_packaged_captures_pass_the_default_gate(
        quality_of: Measure, crops: dict[str, list[Crop]], detect: Callable[[Image], Any],
        tmp_path: Path) -> None:
    captures = [c.path for c in crops["t1"] + crops["players"]]
    captures += [c.path for c in cut_single_faces(GDP, tmp_path, detect)] + [YAOMING]
    checked = 0
    for path in captures:
        image = cv2.imread(str(path))
        assert image is not None
        for capture in (image, cv2.flip(image, 1)):
            quality = quality_of(capture)
            if quality is None:
                continue  # refused by the capture rules (a face under 32 px)
            assert Gate().refusal(quality) is None, f"{path.name}: {Gate().refusal(quality)}"
            assert 0 <= quality.unified <= 100
            checked += 1
    assert checked >= 40
