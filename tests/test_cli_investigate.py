"""The commands of the investigator and security issue: keys, a secured serve, clusters."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys

import pytest
from conftest import face, registration
from processes import ServerProcess

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb

KEY_FILES = {"ca.crt", "server.crt", "server.key", "security.toml", "tokens.txt", "audit.key",
             *(f"{role}.{ext}" for role in ("registration", "investigator", "admin")
               for ext in ("crt", "key"))}


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=120)


def test_keys_then_a_secured_server_and_clients(tmp_path):
    keys = tmp_path / "keys"
    made = dedup("keys", str(keys), "--token-address", "127.0.0.1:0")
    assert made.returncode == 0, made.stderr
    assert {p.name for p in keys.iterdir()} == KEY_FILES
    assert [p.name for p in (tmp_path / "keys-ca").iterdir()] == ["ca.key"]
    assert (keys / "admin.key").stat().st_mode & 0o077 == 0
    server = ServerProcess(tmp_path / "data", "--security", str(keys / "security.toml"))
    try:
        tls = ["--server", server.address, "--ca", str(keys / "ca.crt")]
        as_admin = dedup("stats", *tls, "--cert", str(keys / "admin.crt"),
                         "--key", str(keys / "admin.key"))
        assert as_admin.returncode == 0, as_admin.stderr
        assert json.loads(as_admin.stdout)["registrations"] == "0"
        as_desk = dedup("stats", *tls, "--cert", str(keys / "registration.crt"),
                        "--key", str(keys / "registration.key"))
        assert as_desk.returncode == 1 and "PERMISSION_DENIED" in as_desk.stderr
        anonymous = dedup("stats", *tls)
        assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.wait() == 0
    assert not any("UNAUTHENTICATED on" in line for line in server.lines)


def test_serve_without_security_refuses_a_public_address(tmp_path):
    result = dedup("serve", "--data-dir", str(tmp_path / "data"), "--address", "0.0.0.0:0")
    assert result.returncode == 1
    assert "without a security file" in result.stderr


@pytest.mark.one_backend(reason="the command's files and exit codes; FindClusters itself is "
                         "tested on every backend in test_cluster_limits.py")
def test_clusters_command_jsonl_and_csv(server, tmp_path):
    generator = FaceGenerator(5)
    person, other = generator.persons(2)
    for i, id_number in enumerate(["A1", "A2", "A3"]):
        server.stub.Enroll(pb.EnrollRequest(registration=registration(f"a{i}", id_number),
                                            face=face(generator.capture(person))))
    server.stub.Enroll(pb.EnrollRequest(registration=registration("b0", "B1"),
                                        face=face(other)))
    address = f"127.0.0.1:{server.port}"
    for suffix in ("jsonl", "csv"):
        out = tmp_path / f"clusters.{suffix}"
        result = dedup("clusters", "--server", address, "--out", str(out), "--case-id", "C-1",
                       "--purpose", "sweep")
        assert result.returncode == 0, result.stderr
        assert "wrote 1 clusters" in result.stdout
        if suffix == "jsonl":
            (cluster,) = [json.loads(line) for line in out.read_text().splitlines()]
            assert cluster["id_numbers"] == ["A1", "A2", "A3"]
            assert {r["registration_id"] for r in cluster["registrations"]} == {"a0", "a1", "a2"}
        else:
            rows = list(csv.DictReader(out.open()))
            assert {row["registration_id"] for row in rows} == {"a0", "a1", "a2"}
            assert {row["cluster"] for row in rows} == {"1"}
    missing = dedup("clusters", "--server", address, "--out", str(tmp_path / "x.jsonl"),
                    "--case-id", "", "--purpose", "sweep")
    assert missing.returncode == 1 and "case_id" in missing.stderr
    # A refused run leaves an earlier export as it was (it was emptied), and no partial one.
    earlier = (tmp_path / "clusters.jsonl").read_bytes()
    refused = dedup("clusters", "--server", address, "--out", str(tmp_path / "clusters.jsonl"),
                    "--case-id", "C-1", "--purpose", "sweep", "--min-score", "7")
    assert refused.returncode == 1 and "min_score" in refused.stderr, refused.stderr
    assert (tmp_path / "clusters.jsonl").read_bytes() == earlier
    assert not (tmp_path / "clusters.jsonl.partial").exists()
