"""Error rates computed by hand, the threshold arithmetic on a known distribution, the
`dedup evaluate` / `dedup calibrate` commands, and Stats' implied FPIR."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from statistics import NormalDist

import cv2
import numpy as np
import pytest

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.accuracy.evaluate import evaluate, photo_set
from dedup.accuracy.quality_bands import NOT_EMBEDDED, default_bands
from dedup.accuracy.rates import (
    SearchOutcomes,
    fnir,
    fpir,
    rank_hit_rate,
    report,
    threshold_for_fpir,
)
from dedup.service.calibration import ImpostorModel, per_comparison_fmr, recommend

MATE_SCORES = np.array([0.9, 0.8, 0.35, 0.6, -math.inf])
MATE_RANKS = np.array([1, 1, 3, 12, math.inf])
NONMATED = np.array([0.5, 0.2, 0.45, 0.1, 0.3, 0.25, 0.05, 0.15, 0.38, 0.41])


def test_rates_counted_by_hand():
    assert fpir(NONMATED, 0.4) == 0.3  # 0.5, 0.45, 0.41 of ten
    assert fnir(MATE_SCORES, 0.4) == 0.4  # 0.35 and the mate never returned, of five
    assert rank_hit_rate(MATE_RANKS, 1) == 0.4
    assert rank_hit_rate(MATE_RANKS, 10) == 0.6


def test_threshold_for_a_target_fpir():
    threshold, resolved = threshold_for_fpir(NONMATED, 0.1)  # one of ten may pass: 0.5
    assert resolved and 0.45 < threshold < 0.4500001
    assert fpir(NONMATED, threshold) == 0.1 and fnir(MATE_SCORES, threshold) == 0.4
    threshold, resolved = threshold_for_fpir(NONMATED, 0.01)  # none may pass
    assert not resolved and 0.5 < threshold < 0.5000001
    assert fpir(NONMATED, threshold) == 0.0


def test_report_rows():
    outcomes = SearchOutcomes(MATE_SCORES, MATE_RANKS, NONMATED)
    result = report(outcomes, targets=(0.1, 0.3))
    assert [row["fpir"] for row in result["at_fpir"]] == [0.1, 0.3]
    assert [row["fnir"] for row in result["at_fpir"]] == [0.4, 0.4]
    assert result["mated_searches"] == 5 and result["nonmated_searches"] == 10


def test_fpir_grows_with_the_gallery():
    model = ImpostorModel(mean=0.0, sd=0.05, comparisons=1000)
    fmr = model.fmr(0.2)
    assert fmr == pytest.approx(1 - NormalDist(0, 0.05).cdf(0.2))
    assert model.fpir(0.2, 1) == pytest.approx(fmr)
    assert model.fpir(0.2, 1000) == pytest.approx(1 - (1 - fmr) ** 1000)
    assert model.fpir(0.2, 1000) == pytest.approx(1000 * fmr, rel=0.05)  # about N x FMR


def test_recommendation_on_a_known_distribution():
    rng = np.random.default_rng(3)
    impostors = rng.normal(0.01, 0.05, 400_000)
    model = ImpostorModel.fit(impostors, "synthetic")
    advice = recommend(model, 0.001, 1_000_000, empirical=impostors)
    needed = 1 - (1 - 0.001) ** (1 / 1_000_000)
    assert per_comparison_fmr(0.001, 1_000_000) == pytest.approx(needed)
    expected = 0.01 + 0.05 * NormalDist().inv_cdf(1 - needed)
    assert advice.match_threshold == pytest.approx(expected, abs=0.002)
    expected_review = 0.01 + 0.05 * NormalDist().inv_cdf(1 - (1 - (1 - 0.01) ** 1e-6))
    assert advice.review_threshold == pytest.approx(expected_review, abs=0.002)
    assert model.fpir(advice.match_threshold, 1_000_000) == pytest.approx(0.001, rel=1e-6)
    assert any("1 - (1 - f)^(1/N)" in line for line in advice.explanation)


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def embedding_set(tmp_path):
    """200 enrolled persons, a capture of each as a mated probe, 300 non-enrolled persons."""
    generator = FaceGenerator(8)
    enrolled, strangers = generator.persons(200), generator.persons(300)
    rows = np.vstack([enrolled, generator.captures(enrolled), strangers])
    np.save(tmp_path / "set.npy", rows)
    with open(tmp_path / "set.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["role", "person", "row"])
        writer.writerows(("gallery", f"p{i}", i) for i in range(200))
        writer.writerows(("probe", f"p{i}", 200 + i) for i in range(200))
        writer.writerows(("probe", f"s{i}", 400 + i) for i in range(300))
    return tmp_path


def test_evaluate_writes_json_and_plots(embedding_set):
    out = embedding_set / "out"
    result = dedup("evaluate", "--manifest", str(embedding_set / "set.csv"), "--embeddings",
                   str(embedding_set / "set.npy"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report_ = json.loads((out / "evaluation.json").read_text())
    assert report_["mated_searches"] == 200 and report_["nonmated_searches"] == 300
    assert report_["rank1_hit_rate"] == 1.0  # captures at ~0.8 of their persons
    assert [row["target_fpir"] for row in report_["at_fpir"]] == [0.1, 0.01, 0.003, 0.001]
    assert report_["impostor_comparisons"] == 500 * 200 - 200
    for name in ("det.png", "scores.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    # Embeddings carry no photo, so no quality: the bands are skipped, and it says so.
    assert "no face image quality" in report_["quality_bands"]["skipped"]
    assert "quality bands: skipped (an embedding set" in result.stdout
    assert not (out / "quality.png").exists()


def test_calibrate_records_and_stats_shows_the_implied_fpir(embedding_set, make_server):
    out = embedding_set / "out"
    assert dedup("evaluate", "--manifest", str(embedding_set / "set.csv"), "--embeddings",
                 str(embedding_set / "set.npy"), "--out", str(out)).returncode == 0
    server = make_server()
    server.stub.Enroll(pb.EnrollRequest(
        registration=pb.Registration(registration_id="r0", id_number="ID0"),
        face=pb.Face(embedding=pb.Embedding(values=FaceGenerator(1).persons(1)[0].tolist()))))
    assert not server.stub.Stats(pb.StatsRequest()).calibration.recorded
    result = dedup("calibrate", "--target-fpir", "0.001", "--gallery-size", "1000000",
                   "--evaluation", str(out), "--record", str(server.data_dir))
    assert result.returncode == 0, result.stderr
    assert "recommended: --match-threshold" in result.stdout
    recorded = json.loads((server.data_dir / "calibration.json").read_text())
    model = ImpostorModel(**recorded)
    calibration = server.stub.Stats(pb.StatsRequest()).calibration
    assert calibration.recorded and calibration.gallery_size == 1
    assert calibration.fpir_at_match_threshold == pytest.approx(model.fpir(0.40, 1))
    assert calibration.fpir_at_review_threshold == pytest.approx(model.fpir(0.30, 1))


@pytest.mark.timeout(300)
def test_evaluate_on_the_packaged_real_photos(tmp_path):
    out = tmp_path / "photos-eval"
    result = dedup("evaluate", "--packaged-photos", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report_ = json.loads((out / "evaluation.json").read_text())
    manifest = list(csv.DictReader((out / "photos" / "manifest.csv").open()))
    assert {"yaoming.jpg", "players-00.jpg", "t1-0.jpg"} <= {row["file"] for row in manifest}
    assert report_["mated_searches"] >= 10 and report_["nonmated_searches"] >= 5
    # Real captures of enrolled people are found first; the rest are listed as failures.
    assert report_["rank1_hit_rate"] >= 0.9
    assert (out / "det.png").stat().st_size > 5000
    # Photos: the mated searches by the probe's quality, printed, in the JSON, plotted.
    rows = report_["quality_bands"]["rows"]
    assert sum(row["mated"] for row in rows) == report_["mated_searches"]
    assert "mated searches by the probe's unified quality:" in result.stdout
    assert "75-85 (marginal: rule 6)" in result.stdout
    assert (out / "quality.png").stat().st_size > 5000


BLUR = 0.08  # Gaussian sigma in inter-eye distances: detected still, visibly soft


def band_index(quality: float) -> int:
    return next(i for i, band in enumerate(default_bands())
                if band.holds(np.array([quality]))[0])


@pytest.fixture
def blurred_photo_set(tmp_path, crops, detect):
    """t1.jpg's faces cut into captures: four enrolled, each probed by a mirrored sharp copy
    and a mirrored copy blurred by BLUR; the other faces are non-mated probes."""
    rows = []
    for i, crop in enumerate(crops["t1"]):
        image = cv2.imread(str(crop.path))
        cv2.imwrite(str(tmp_path / crop.path.name), image)
        if i >= 4:
            rows.append(("probe", f"t1-{i}", crop.path.name))
            continue
        rows.append(("gallery", f"t1-{i}", crop.path.name))
        _, landmarks = detect(image)
        eyes = float(np.linalg.norm(landmarks[0][1] - landmarks[0][0]))
        mirrored = cv2.flip(image, 1)
        for kind, copy in (("sharp", mirrored),
                           ("blurred", cv2.GaussianBlur(mirrored, (0, 0), BLUR * eyes))):
            cv2.imwrite(str(tmp_path / f"t1-{i}-{kind}.jpg"), copy,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            rows.append(("probe", f"t1-{i}", f"t1-{i}-{kind}.jpg"))
    assert len(rows) >= 14, "t1.jpg yields six single-face captures"
    with open(tmp_path / "set.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["role", "person", "file"])
        writer.writerows(rows)
    return tmp_path / "set.csv", [row[2] for row in rows if row[0] == "probe"]


def test_evaluate_reports_genuine_scores_by_quality_band(blurred_photo_set, tmp_path):
    manifest, probe_files = blurred_photo_set
    labelled = photo_set(manifest, None)
    out = tmp_path / "out"
    evaluate(labelled, out)
    report_ = json.loads((out / "evaluation.json").read_text())
    table = report_["quality_bands"]
    assert [row["band"] for row in table["rows"]] == \
        ["< 40", "40-60", "60-75", "75-85", ">= 85", NOT_EMBEDDED]
    assert (table["review_threshold"], table["match_threshold"]) == (0.30, 0.40)
    assert report_["mated_searches"] == 8
    assert sum(row["mated"] for row in table["rows"]) == report_["mated_searches"]
    quality = dict(zip(probe_files, labelled.probe_qualities, strict=True))
    for i in range(4):
        sharp, blurred = quality[f"t1-{i}-sharp.jpg"], quality[f"t1-{i}-blurred.jpg"]
        assert sharp >= 85, "an undegraded capture is never marginal"
        assert math.isnan(blurred) or blurred < sharp - 2
    lowered = [i for i in range(4) if not math.isnan(quality[f"t1-{i}-blurred.jpg"]) and
               band_index(quality[f"t1-{i}-blurred.jpg"]) < band_index(
                   quality[f"t1-{i}-sharp.jpg"])]
    assert lowered, "a blurred copy lands in a lower band than its sharp original"
    # The table counts each probe in its band: the sharp copies all in the top one.
    top = table["rows"][4]
    assert top["mated"] == 4 + sum(quality[f"t1-{i}-blurred.jpg"] >= 85 for i in range(4))
    assert top["fnir_at_match"] == 0.0 and top["median_genuine"] > 0.6
    assert table["rows"][5]["mated"] == sum(math.isnan(quality[f"t1-{i}-blurred.jpg"])
                                            for i in range(4))
    data = (out / "quality.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
