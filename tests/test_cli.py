"""The `dedup` command against real servers: client commands, serve with SIGTERM, the demo."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from dedup.cli.demo import run_demo
from dedup.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_client_commands(server, faces, tmp_path, capsys):
    address = f"127.0.0.1:{server.port}"
    person = faces.persons(1)[0]
    npy = tmp_path / "face.npy"
    np.save(npy, faces.capture(person))
    text = tmp_path / "face.txt"
    text.write_text(",".join(str(v) for v in faces.capture(person)))

    code, out, _ = run(capsys, "enroll", "--server", address, "--registration-id", "o-1",
                       "--id-number", "ID1", "--msisdn", "+8613800000001", "--embedding", str(npy))
    assert code == 0 and json.loads(out)["enrolled"] is True

    code, out, _ = run(capsys, "check", "--server", address, "--embedding", str(text),
                       "--claimed-id-number", "ID2")
    result = json.loads(out)
    assert code == 0 and result["verdict"] == "DUPLICATE_IDENTITY"
    assert result["matches"][0]["registration"]["registration_id"] == "o-1"

    code, out, _ = run(capsys, "enroll", "--server", address, "--registration-id", "o-2",
                       "--id-number", "ID2", "--embedding", str(text), "--check-first")
    assert code == 2 and json.loads(out)["enrolled"] is False

    code, out, _ = run(capsys, "stats", "--server", address)
    assert json.loads(out)["registrations"] == "1"

    code, out, _ = run(capsys, "get", "--server", address, "o-1")
    assert json.loads(out)["msisdn"] == "+8613800000001"

    code, out, _ = run(capsys, "delete", "--server", address, "--msisdn", "+8613800000001")
    assert code == 0 and json.loads(out)["registration_ids"] == ["o-1"]

    code, _, err = run(capsys, "get", "--server", address, "o-1")
    assert code == 1 and "NOT_FOUND" in err


def test_bad_embedding_file_is_reported(server, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1, 2, 3")
    code, _, err = run(capsys, "check", "--server", f"127.0.0.1:{server.port}",
                       "--embedding", str(bad))
    assert code == 1
    assert "INVALID_ARGUMENT: face.embedding.values: expected 512 values, got 3" in err


def test_serve_stops_gracefully_on_sigterm(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "dedup", "serve", "--data-dir", str(tmp_path / "d"),
         "--address", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in process.stderr:
            if match := re.search(r"serving on 127\.0\.0\.1:(\d+)", line):
                assert int(match.group(1)) > 0
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        rest = process.stderr.read()
        assert "shutting down gracefully" in rest
        assert (tmp_path / "d" / "index.ckpt").exists()
    finally:
        process.kill()


def test_serve_refuses_a_negative_nprobe_before_it_starts(tmp_path):
    """`--nprobe -1` was served: every IVF search failed, SignIVF searched one list."""
    finished = subprocess.run(
        [sys.executable, "-m", "dedup", "serve", "--data-dir", str(tmp_path / "d"),
         "--address", "127.0.0.1:0", "--nprobe=-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert finished.returncode == 1
    assert "error: index: nprobe must be >= 0, got -1" in finished.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.timeout(120)
def test_demo_gets_every_expected_verdict(tmp_path, capsys):
    assert run_demo(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "0 probe(s) got a verdict other than expected" in out
    assert run_demo(tmp_path / "demo") == 0  # the second run reuses the enrolled population
    assert "enrolled 0 new registration(s)" in capsys.readouterr().out


def test_enroll_and_check_with_an_image(server, crops, capsys):
    from photos import YAOMING

    address = f"127.0.0.1:{server.port}"
    yao = next(c for c in crops["players"] if c.contains((742, 167)))
    code, out, _ = run(capsys, "enroll", "--server", address, "--registration-id", "yao",
                       "--id-number", "ID-YAO", "--image", str(yao.path))
    assert code == 0 and json.loads(out)["detected_face"]["faces_in_image"] == 1
    code, out, _ = run(capsys, "check", "--server", address, "--image", str(YAOMING),
                       "--claimed-id-number", "ID-OTHER")
    result = json.loads(out)
    assert result["verdict"] == "DUPLICATE_IDENTITY"
    assert result["matches"][0]["registration"]["registration_id"] == "yao"


def test_import_photos_summarises_rejects_and_resumes(server, crops, tmp_path, capsys):
    import shutil

    from photos import T1

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = ["file,registration_id,id_number,msisdn"]
    for i, crop in enumerate(crops["t1"]):
        shutil.copy(crop.path, folder / crop.path.name)
        rows.append(f"{crop.path.name},t1-{i},T{i},+86138000000{i:02d}")
    shutil.copy(T1, folder / "group.jpg")
    rows += ["group.jpg,group,G1,", "missing.jpg,gone,G2,"]
    (folder / "notes.txt").write_text("not a photo")
    rows.append("notes.txt,notes,G3,")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    rejects = tmp_path / "rejects.csv"
    address = f"127.0.0.1:{server.port}"

    code, out, _ = run(capsys, "import-photos", str(folder), "--manifest", str(manifest),
                       "--server", address, "--rejects", str(rejects))
    assert code == 2
    assert "enrolled 6, already enrolled 0, refused by the check 0, rejected 3" in out
    assert "rejected 1 x INVALID_ARGUMENT: face.image: N faces detected" in out
    assert "rejected 1 x cannot read the file" in out
    assert "rejected 1 x INVALID_ARGUMENT: face.image: unsupported format" in out
    assert len(rejects.read_text().splitlines()) == 4
    assert rejects.stat().st_mode & 0o777 == 0o600  # a reason can name a phone number

    code, out, _ = run(capsys, "import-photos", str(folder), "--manifest", str(manifest),
                       "--server", address)
    assert "enrolled 0, already enrolled 6" in out
    code, out, _ = run(capsys, "stats", "--server", address)
    assert json.loads(out)["registrations"] == "6"
