"""`dedup migrate` of a large embedded data directory into a real Milvus server: the time it
takes, its resumption after a kill, and its verification.

The data directory is scale.py's (generated and imported there, or here if absent). A
Milvus 2.3.5 standalone server (tests/milvus_server.py) is started on free loopback ports;
`dedup migrate` runs as a process of its own and is killed with SIGKILL once --kill-at of
the registrations are copied (read from its resume file), then run again to the end. Reported:
registrations/s of each run, how much the second run copied again (resumption costs a batch
at most), whether the verification passed, and Milvus's row count.

    .venv/bin/python benchmarks/migrate_server.py --registrations 1000000
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dedup.ops.migrate import STATE_FILE

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gallery_data import VARIANTS, generate
from milvus_server import MilvusServer
from scale import import_gallery

RESULTS = Path(__file__).parent / "results"
PREFIX = "migrated"


def migrate_command(data_dir: Path, uri: str, batch: int) -> list[str]:
    return [sys.executable, "-m", "dedup", "migrate", "--from", str(data_dir), "--to", uri,
            "--milvus-prefix", PREFIX, "--batch", str(batch), "--sample", "100"]


def copied_so_far(data_dir: Path) -> int:
    """The last key the migration recorded as copied (its resume file), 0 before any."""
    try:
        return int(json.loads((data_dir / STATE_FILE).read_text()).get("last_key", 0))
    except (ValueError, OSError):
        return 0


def run_until_killed(command: list[str], data_dir: Path, kill_at: int, log: Path
                     ) -> dict[str, float]:
    started = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None and copied_so_far(data_dir) < kill_at:
            time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait()
    seconds = time.perf_counter() - started
    copied = copied_so_far(data_dir)
    return {"seconds": seconds, "copied_before_kill": copied, "per_second": copied / seconds}


def run_to_the_end(command: list[str], log: Path) -> dict[str, object]:
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    log.write_text(log.read_text() + finished.stdout + finished.stderr)
    seconds = time.perf_counter() - started
    resumed = re.search(r"resumed after key (\d+)", finished.stdout + finished.stderr)
    return {"seconds": seconds, "exit_status": finished.returncode,
            "resumed_after_key": int(resumed.group(1)) if resumed else None,
            "last_lines": (finished.stdout + finished.stderr).strip().splitlines()[-6:]}


def milvus_rows(uri: str) -> int:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        found = client.query(f"{PREFIX}_registrations", filter="", output_fields=["count(*)"],
                             consistency_level="Strong")
        return int(found[0]["count(*)"])
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="iso")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--batch", type=int, default=10_000, help="registrations per upsert")
    parser.add_argument("--kill-at", type=float, default=0.4,
                        help="share of the registrations copied when the first run is killed")
    args = parser.parse_args()

    work = args.workdir / f"{args.registrations}-{args.variant}"
    gallery = generate(work / "input", args.registrations, args.variant, 1000)
    data_dir = work / "data"
    if not (work / "imported").exists():
        import_gallery(data_dir, gallery.files)
        (work / "imported").touch()
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="dedup-migrate-") as base:
        server = MilvusServer(Path(base))
        server.start()
        try:
            command = migrate_command(data_dir, server.uri, args.batch)
            log = RESULTS / f"migrate-server-{gallery.registrations}.log"
            RESULTS.mkdir(exist_ok=True)
            log.write_text("")
            first = run_until_killed(command, data_dir,
                                     int(args.kill_at * gallery.registrations), log)
            print("killed:", json.dumps(first), flush=True)
            second = run_to_the_end(command, log)
            print("resumed:", json.dumps(second), flush=True)
            rows = milvus_rows(server.uri)
        finally:
            server.stop()
    result = {"registrations": gallery.registrations, "batch": args.batch,
              "killed_run": first, "resumed_run": second, "milvus_rows": rows,
              "overall_per_second": gallery.registrations
              / (first["seconds"] + float(second["seconds"]))}  # type: ignore[arg-type]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"migrate-server-{gallery.registrations}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1), f"\nwrote {out}")


if __name__ == "__main__":
    main()
