"""The long variants of the fault tests, which CI runs short: kill -9 during enrolment and
during a checkpoint over 100 seeds each, and the concurrency stress for 60 s per index type.

    .venv/bin/python benchmarks/soak.py [--seeds 100] [--stress-seconds 60]

Prints the pytest summary per test and writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TESTS = {
    "kill -9 during enrolment": "tests/test_crash.py",
    "kill -9 during a checkpoint": "tests/test_damage.py::test_kill_during_checkpoint_recovers",
    "kill -9 during erasures": "tests/test_vector_file.py::"
                               "test_kill_during_erasures_leaves_no_erased_embedding",
    "concurrency stress": "tests/test_stress.py",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--stress-seconds", type=float, default=60.0)
    args = parser.parse_args()
    env = {**os.environ, "DEDUP_SOAK_SEEDS": str(args.seeds),
           "DEDUP_STRESS_SECONDS": str(args.stress_seconds)}
    results = {}
    for name, target in TESTS.items():
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              target], cwd=ROOT, env=env, capture_output=True, text=True)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
        counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error)", summary)}
        results[name] = {"summary": summary, **counts, "exit_code": run.returncode,
                         "seconds": round(time.monotonic() - started, 1)}
        print(f"{name:<30} {summary}")
        if run.returncode:
            print(run.stdout[-5000:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(
        {"seeds": args.seeds, "stress_seconds": args.stress_seconds, "results": results},
        indent=2))
    sys.exit(max(result["exit_code"] for result in results.values()))


if __name__ == "__main__":
    main()
