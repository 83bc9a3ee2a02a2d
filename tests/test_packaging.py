"""The package as a user installs it: importing it is cheap, and the generated code is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["grpc", "faiss", "cv2", "prometheus_client", "lmdb", "onnxruntime", "insightface",
         "pymilvus"]


def test_importing_the_package_and_its_settings_loads_no_heavy_dependency() -> None:
    code = ("import json, sys, dedup, dedup.core.settings, dedup.core.errors\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       text=True, check=True).stdout)
    assert loaded == []


def test_the_server_factory_loads_on_first_use() -> None:
    code = ("import sys, dedup\nassert 'grpc' not in sys.modules\n"
            "factory = dedup.create_server\nprint(factory.__module__, 'grpc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["dedup.server", "True"]


def test_the_checked_in_generated_code_matches_the_protos() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
