"""The offline import's memory, phase by phase, for one or more source trees side by side.

`dedup import --data-dir` of one generated gallery (benchmarks/scale.py's input) into a fresh
data directory, in a process of its own, its anonymous memory (RssAnon) sampled every second.
The import has two phases: storing the rows, then (from 1,000,000 registrations, where `auto`
wants a trained index) building that index from the store. The rows phase is what must stay
flat: its memory at the first third, at its end and its peak are reported apart from the
build's peak. With --sources, each run takes dedup from another checkout (PYTHONPATH), runs
alternating, so that a change and the commit before it are measured in one session:

    benchmarks/import_memory.py --registrations 1000000 --variant clustered \\
        --sources /tmp/before/src src --repeats 2

Prints a table (the median samples of the rows phase's first and last thirds show its trend
under the ~70 MiB spikes of each batch's arrays); writes
benchmarks/results/import-memory-<N>-<variant>.json, whose table `--table-of FILE` prints again."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from gallery_data import VARIANTS, generate
from scale import RESULTS, memory_of

BUILD_STARTS = b"building the"


def import_run(files: list[Path], data_dir: Path, source: Path | None) -> dict[str, object]:
    """One `dedup import` into the empty `data_dir`: its samples and phase boundary."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "dedup", "import", "--data-dir", str(data_dir), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    build_started: list[float] = []
    watcher = threading.Thread(target=_watch_for_build, daemon=True,
                               args=(process, started, build_started))
    watcher.start()
    samples = []
    while process.poll() is None:
        samples.append((time.monotonic() - started, memory_of(process.pid)["anon_mib"]))
        time.sleep(1.0)
    output = process.stdout.read().decode() if process.stdout else ""
    watcher.join()
    if process.returncode not in (0, 2):
        raise RuntimeError(f"dedup import failed ({process.returncode}): {output}")
    return phases(samples, build_started[0] if build_started else None,
                  time.monotonic() - started)


def _watch_for_build(process: subprocess.Popen[bytes], started: float,
                     build_started: list[float]) -> None:
    """Notes when the import's progress names its index build (tqdm writes to stderr)."""
    assert process.stderr is not None
    tail = b""
    while chunk := process.stderr.read1(65536):
        tail = (tail + chunk)[-4096:]
        if not build_started and BUILD_STARTS in tail:
            build_started.append(time.monotonic() - started)


def phases(samples: list[tuple[float, int]], build_at: float | None, seconds: float
           ) -> dict[str, object]:
    rows = [mib for t, mib in samples if mib and (build_at is None or t < build_at)]
    build = [mib for t, mib in samples if mib and build_at is not None and t >= build_at]
    third = rows[len(rows) // 3] if rows else 0
    steady = rows[3:]  # the first seconds load the interpreter, FAISS and the first batch
    thirds = max(1, len(steady) // 3)
    return {"seconds": round(seconds, 1),
            # a batch's arrays come and go (spikes of ~70 MiB): the medians show the trend
            "rows_median_mib_first_third": _median(steady[:thirds]),
            "rows_median_mib_last_third": _median(steady[-thirds:]),
            "rows_seconds": round(build_at if build_at is not None else seconds, 1),
            "rows_anon_mib_at_first_third": third,
            "rows_anon_mib_at_end": rows[-1] if rows else 0,
            "rows_peak_anon_mib": max(rows, default=0),
            "rows_growth_after_first_third_mib": max(rows, default=0) - third,
            "build_peak_anon_mib": max(build, default=0),
            "peak_anon_mib": max(rows + build, default=0),
            "samples": [(round(t), mib) for t, mib in samples[:: max(1, len(samples) // 300)]]}


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def phases_again(run: dict[str, object]) -> dict[str, object]:
    """A run of a results file summarised by this version of `phases`, from its samples."""
    samples = [(float(t), int(mib)) for t, mib in run["samples"]]  # type: ignore[attr-defined]
    rows_seconds = float(run["rows_seconds"])  # type: ignore[arg-type]
    build_at = rows_seconds if rows_seconds < float(run["seconds"]) else None  # type: ignore[arg-type]
    return {"run": run["run"], "source": run["source"],
            **phases(samples, build_at, float(run["seconds"]))}  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="clustered")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"),
                        help="where scale.py's generated input is (or will be) kept")
    parser.add_argument("--sources", type=Path, nargs="*", default=[],
                        help="source trees (a checkout's src/) to take dedup from, "
                             "alternating; none: the installed dedup")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--table-of", type=Path, metavar="JSON",
                        help="print the table of an earlier run's results file and stop")
    args = parser.parse_args()
    if args.table_of:
        print_table([phases_again(run) for run in json.loads(args.table_of.read_text())["runs"]])
        return

    work = args.workdir / f"{args.registrations}-{args.variant}"
    gallery = generate(work / "input", args.registrations, args.variant)
    sources: list[Path | None] = list(args.sources) or [None]
    runs: list[dict[str, object]] = []
    for repeat in range(1, args.repeats + 1):
        for source in sources:
            data_dir = work / "import-memory-data"
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.mkdir(mode=0o700, parents=True)
            label = str(source) if source else "installed"
            print(f"run {repeat}, {label}: importing {gallery.registrations:,} registrations",
                  flush=True)
            run = {"run": repeat, "source": label,
                   **import_run(gallery.files, data_dir, source)}
            shutil.rmtree(data_dir, ignore_errors=True)
            print(json.dumps({k: v for k, v in run.items() if k != "samples"}), flush=True)
            runs.append(run)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"import-memory-{args.registrations}-{args.variant}.json"
    out.write_text(json.dumps({"registrations": gallery.registrations,
                               "variant": args.variant, "runs": runs}, indent=2))
    print_table(runs)
    print(f"\nwrote {out}")


def print_table(runs: list[dict[str, object]]) -> None:
    print(f"\n{'run':>3} {'source':<24} {'import s':>8} {'rows s':>7} {'rows MiB @1/3':>13} "
          f"{'@end':>6} {'median 1st/last third':>21} {'rows peak':>9} {'build peak':>10} "
          f"{'peak':>6}")
    for run in runs:
        medians = (f"{run['rows_median_mib_first_third']:,.0f} / "
                   f"{run['rows_median_mib_last_third']:,.0f}")
        print(f"{run['run']:>3} {str(run['source'])[-24:]:<24} {run['seconds']:>8} "
              f"{run['rows_seconds']:>7} {run['rows_anon_mib_at_first_third']:>13,} "
              f"{run['rows_anon_mib_at_end']:>6,} {medians:>21} {run['rows_peak_anon_mib']:>9,} "
              f"{run['build_peak_anon_mib']:>10,} {run['peak_anon_mib']:>6,}")
    for source in dict.fromkeys(str(run["source"]) for run in runs):
        peaks = [run["peak_anon_mib"] for run in runs if run["source"] == source]
        print(f"median peak, {source}: {statistics.median(peaks):,} MiB")  # type: ignore[type-var]


if __name__ == "__main__":
    main()
