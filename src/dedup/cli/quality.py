"""`dedup quality`: the face image quality of photos, and what the server's gate makes of it."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from dedup.cli.serve import add_quality_gate_arguments, quality_gate
from dedup.cli.subcommand import Subcommands, add_subcommand


def register(commands: Subcommands) -> None:
    quality = add_subcommand(commands, "quality", "face image quality of photos and the "
                             "quality gate's verdict", """
        Runs each photo through the server's pipeline here (the face model, no server):
        the capture rules, then the quality assessment. Prints each component on 0-100
        (100 best), the unified score, and the verdict of the quality gate: `passes`, or
        `refused` with the message a desk would get (component, value, minimum and a hint).
        The gate is the server's default unless --min-quality / --quality-min set it as for
        `dedup serve`. Exit status 0 when every photo passes, 1 otherwise.
        """, ["dedup quality capture.jpg",
              "dedup quality --quality-min sharpness=50 desk/*.jpg"], quality_command)
    quality.add_argument("photos", type=Path, nargs="+", metavar="PHOTO")
    quality.add_argument("--model-dir", type=Path, default=None)
    quality.add_argument("--largest-face", action="store_true",
                         help="with several faces in a photo, use the largest")
    add_quality_gate_arguments(quality)


def quality_command(args: argparse.Namespace) -> int:
    from dedup.core.errors import DedupError
    from dedup.core.settings import CaptureRules
    from dedup.face.embedder import FaceEmbedder
    from dedup.face.model_pack import resolve_model_dir
    from dedup.face.quality import Scores, failure

    gate = quality_gate(args)
    embedder = FaceEmbedder(resolve_model_dir(args.model_dir), CaptureRules(quality_gate=None),
                            workers=1)
    passed = True
    try:
        for photo in args.photos:
            print(photo)
            try:
                embedded = embedder.embed(photo.read_bytes(), args.largest_face, "photo")
            except (DedupError, OSError) as error:
                print(f"  refused by the capture rules: {error}")
                passed = False
                continue
            quality = embedded.quality
            for item in fields(Scores):
                minimum = "" if gate is None else f"  (minimum {getattr(gate, item.name):g})"
                print(f"  {item.name:<15}{getattr(quality.scores, item.name):6.1f}{minimum}")
            minimum = "" if gate is None else f"  (minimum {gate.unified:g})"
            print(f"  {'unified':<15}{quality.unified:6.1f}{minimum}")
            failed = None if gate is None else failure(gate, quality)
            if failed is None:
                print("  gate: passes" if gate is not None else "  gate: off")
            else:
                print(f"  gate: refused: {failed.message}")
                passed = False
    finally:
        embedder.close()
    return 0 if passed else 1
