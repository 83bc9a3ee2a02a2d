"""The suite's own temporary files: a passing run removes them, a failing run keeps the
failures' for debugging. A whole run writes about 5 GB there (stores, Milvus, the 300,000
import); pytest's default kept the last three runs', and a full disk failed a later CI run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "pyproject.toml"

WRITING_TESTS = '''
def test_writes(tmp_path, tmp_path_factory):
    (tmp_path / "per-test").write_bytes(b"x" * 1000)
    (tmp_path_factory.mktemp("shared") / "per-module").write_bytes(b"y" * 1000)


def test_{outcome}(tmp_path):
    (tmp_path / "kept").write_bytes(b"z" * 1000)
    assert {outcome!r} == "passes"
'''


def files_left_by(tmp_path: Path, outcome: str) -> list[str]:
    """Run two tests (the second `outcome`) with the project's pytest settings; the names of
    the files left under the temporary root."""
    (tmp_path / "test_writer.py").write_text(WRITING_TESTS.format(outcome=outcome))
    root = tmp_path / "temp-root"
    root.mkdir()
    environment = {name: value for name, value in os.environ.items()
                   if name != "PYTEST_ADDOPTS"} | {"PYTEST_DEBUG_TEMPROOT": str(root)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(PROJECT_CONFIG),
         "--rootdir", str(tmp_path), str(tmp_path / "test_writer.py")],
        env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False)
    passed = "2 passed" if outcome == "passes" else "1 failed, 1 passed"
    assert passed in run.stdout and run.returncode == (outcome != "passes"), run.stdout
    return sorted(path.name for path in root.rglob("*") if path.is_file())


def test_a_passing_run_leaves_no_temporary_files(tmp_path):
    assert files_left_by(tmp_path, "passes") == []


def test_a_failing_run_keeps_the_failed_tests_files(tmp_path):
    left = files_left_by(tmp_path, "fails")
    assert "kept" in left
    assert "per-test" not in left  # the passing test's own directory still goes
