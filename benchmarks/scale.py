"""Large galleries: import, disk, start, Check at scale, rebuild and compaction under load.

For one gallery (default 1,000,000 face-like registrations of one data variant) measured in
one run, the way an operator runs dedup:
  1. `dedup import --data-dir` in a process of its own: registrations/s and its anonymous
     memory sampled every second (peak, and growth after the first third);
  2. bytes per registration on disk (store, vector file and index checkpoint together);
  3. `dedup serve` with its defaults: the index type it serves first, seconds from start to
     the first answered Check, resident memory;
  4. Check over gRPC from a load process of its own with pre-serialised requests, at 1 and 8
     clients (q/s, p50, p99), duplicate recall against exact ground truth (of every match,
     and of the matches under other ID numbers: the ones only the index finds), the server's CPU
     seconds per check, the queries a batch search of checks held on average (its metrics),
     and raw FAISS on the same checkpoint, one query at a time;
  5. optionally (--kinds) other index types and search parameters the same way, and
     (--also-with) the default server started with other `dedup serve` options;
  6. a live rebuild while 8 clients keep checking (its time; Check p99 during against
     before), and a compaction while they keep checking (the longest check during it).
Prints a table and writes JSON to benchmarks/results/scale-<N>-<variant>.json.

    .venv/bin/python benchmarks/scale.py --registrations 1000000 --variant iso
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import faiss
import grpc
import numpy as np

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.settings import IndexConfig, StoreConfig
from dedup.face.model_pack import RECOGNISER, model_id_for, resolve_model_dir
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index import SearchOptions, load_index
from dedup.gallery.embedded.layout import CHECKPOINT_FILE
from dedup.gallery.embedded.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from gallery_data import VARIANTS, generate
from gallery_data import EmbeddedGallery as GeneratedGallery
from harness import last_latencies, process_checks, process_cpu_seconds, summarise

RESULTS = Path(__file__).parent / "results"
MATCH = 0.40


def model_id() -> str:
    return model_id_for(resolve_model_dir(None) / RECOGNISER)


def open_gallery(data_dir: Path) -> EmbeddedGallery:
    """The benchmark's own access to a data directory no server holds, with a compact
    in-memory index (an exact one would need 20 GB at 10,000,000 registrations)."""
    return EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id(),
                           IndexConfig("BinarySign512"), background=False)


# -- 1. import ----------------------------------------------------------------------------

def memory_of(pid: int) -> dict[str, int]:
    """RssAnon and VmRSS of a process in MiB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"anon_mib": 0, "rss_mib": 0}
    def field(name: str) -> int:
        match = re.search(rf"{name}:\s+(\d+) kB", text)
        return int(match.group(1)) // 1024 if match else 0
    return {"anon_mib": field("RssAnon"), "rss_mib": field("VmRSS")}


def sampled(process: subprocess.Popen[str], every: float = 1.0) -> list[dict[str, float]]:
    """Memory samples of `process` every `every` seconds until it exits."""
    started, samples = time.monotonic(), []
    while process.poll() is None:
        samples.append({"t": round(time.monotonic() - started, 1), **memory_of(process.pid)})
        time.sleep(every)
    return samples


def import_gallery(data_dir: Path, files: list[Path]) -> dict[str, object]:
    """`dedup import --data-dir` in its own process, its memory sampled every second."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "dedup", "import", "--data-dir", str(data_dir),
         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples = sampled(process)
    output = process.communicate()[0]
    if process.returncode not in (0, 2):
        raise RuntimeError(f"dedup import failed ({process.returncode}): {output}")
    elapsed = time.monotonic() - started
    imported = int(re.search(r"imported ([\d,]+)", output).group(1).replace(",", ""))  # type: ignore[union-attr]
    anon = [s["anon_mib"] for s in samples if s["anon_mib"]]
    third = anon[len(anon) // 3] if anon else 0
    return {"imported": imported, "seconds": elapsed, "per_second": imported / elapsed,
            "peak_anon_mib": max(anon, default=0), "anon_mib_at_first_third": third,
            "anon_mib_growth_after_first_third": max(anon, default=0) - third,
            "samples": samples[:: max(1, len(samples) // 200)]}


def imported_gallery(workdir: Path, registrations: int, variant: str, probes: int
                     ) -> tuple[GeneratedGallery, Path, dict[str, object] | None]:
    """The generated gallery of `workdir` (this script's layout), its data directory and,
    when this call imported it (an earlier one had not), the import's figures."""
    work = workdir / f"{registrations}-{variant}"
    gallery = generate(work / "input", registrations, variant, probes)
    data_dir = work / "data"
    if (work / "imported").exists():
        return gallery, data_dir, None
    imported = import_gallery(data_dir, gallery.files)
    print("import", json.dumps({key: value for key, value in imported.items()
                                if key != "samples"}), flush=True)
    (work / "imported").touch()
    return gallery, data_dir, imported


def disk_bytes(data_dir: Path) -> dict[str, int]:
    """Bytes allocated on disk per file of the data directory (sparse regions not counted)."""
    return {str(path.relative_to(data_dir)): path.stat().st_blocks * 512
            for path in sorted(data_dir.rglob("*")) if path.is_file()}


# -- 2. exact ground truth ----------------------------------------------------------------

def ground_truth(data_dir: Path, probes: np.ndarray) -> list[dict[str, str]]:
    """Per probe, the registrations at or above the match threshold under exact search:
    registration_id -> the ID number it is registered under. Cached beside the data
    directory per store sequence (an exact pass over 10,000,000 took 15 minutes here)."""
    store = Store.reader(data_dir)
    cache = data_dir.parent / f"ground-truth-{MATCH}-{len(probes)}-{store.sequence()}.json"
    if cache.exists():
        store.close()
        return json.loads(cache.read_text())  # type: ignore[no-any-return]
    try:
        truth = _exact_matches(store, probes)
    finally:
        store.close()
    cache.write_text(json.dumps(truth))
    return truth


def _exact_matches(store: Store, probes: np.ndarray) -> list[dict[str, str]]:
    hits: list[list[int]] = [[] for _ in probes]
    for keys, matrix in store.iter_vectors(200_000):  # exact, block by block
        keys_array = np.asarray(keys)
        rows, columns = np.nonzero(probes @ matrix.T >= MATCH)
        for row, column in zip(rows, columns, strict=True):
            hits[row].append(int(keys_array[column]))
    return [{face.registration.registration_id: face.registration.id_number
             for face in store.faces(found, with_vectors=False)} for found in hits]


def under_other_id_numbers(truth: list[dict[str, str]], requests: list[pb.CheckRequest]
                           ) -> list[dict[str, str]]:
    """The ground truth the index alone must find: matches registered under an ID number
    other than the one the probe presents (Check finds the others by ID-number lookup)."""
    return [{key: number for key, number in wanted.items()
             if number != request.claimed_id_number}
            for wanted, request in zip(truth, requests, strict=True)]


def recall(responses: list[pb.CheckResponse | BaseException | None],
           truth: list[dict[str, str]]) -> float:
    expected = found = 0
    for response, wanted in zip(responses, truth, strict=True):
        if not wanted:
            continue
        returned = ({m.registration.registration_id for m in response.matches}
                    if isinstance(response, pb.CheckResponse) else set())
        expected += len(wanted)
        found += len(wanted.keys() & returned)
    return found / max(1, expected)


# -- 3. the server ------------------------------------------------------------------------

class Server:
    """`dedup serve` on a data directory, on a free loopback port."""

    def __init__(self, data_dir: Path, kind: str | None = None, parameter: int | None = None,
                 options: tuple[str, ...] = ()) -> None:
        command = [sys.executable, "-m", "dedup", "serve", "--data-dir", str(data_dir),
                   "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", *options]
        if kind is not None:
            command += ["--index-factory", kind]
        if parameter is not None:
            flag = "--nprobe" if kind and "IVF" in kind else "--rerank-candidates"
            command += [flag, str(parameter)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        self.metrics_port = 0  # from its log, after the line above
        for line in self.process.stderr:
            if match := re.search(r"serving on 127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError("the server did not start")
        self.pauses: list[float] = []  # seconds a compaction paused writes, from its log
        self.pause_details: list[str] = []  # and what the pause was spent on
        # index checkpoints from its log: when each ended (time.monotonic), seconds holding
        # writes, seconds writing
        self.checkpoints: list[dict[str, float]] = []
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if match := re.search(r"metrics on http://[^:]+:(\d+)", line):
                self.metrics_port = int(match.group(1))
            if match := re.search(r"compaction paused writes for ([0-9.]+) s", line):
                self.pauses.append(float(match.group(1)))
                self.pause_details.append(line[match.start():].strip())
            if match := re.search(r"writes held ([0-9.]+) s, written in ([0-9.]+) s", line):
                self.checkpoints.append({"ended": time.monotonic(),
                                         "held_s": float(match.group(1)),
                                         "written_s": float(match.group(2))})

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def pids(self) -> list[int]:
        """The server and its children: with --processes N, its replicas (multiprocessing's
        resource tracker is idle)."""
        listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                                capture_output=True, text=True, check=False).stdout
        return [self.process.pid, *(int(pid) for pid in listed.split())]

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def first_answer_seconds(self, request: pb.CheckRequest) -> float:
        """Seconds from the process's start to its first answered Check."""
        with self.channel() as channel:
            pb_grpc.FaceDedupStub(channel).Check(request, wait_for_ready=True, timeout=600)
        return time.monotonic() - self.started

    def wait_for_type(self, kind: str | None) -> float:
        """Seconds from the process's start until it serves an index of type `kind` (None:
        the type it wants)."""
        while (info := self.index_info()).index_type != (kind or info.wanted_index_type):
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited before serving {kind}")
            if time.monotonic() - self.started > 3600:
                raise RuntimeError(f"the server did not serve {kind} within an hour")
            time.sleep(1)
        return time.monotonic() - self.started

    def index_info(self) -> pb.IndexInfo:
        with self.channel() as channel:
            return pb_grpc.IndexAdminStub(channel).GetIndexInfo(pb.GetIndexInfoRequest())

    def peak_rss_gb(self) -> float:
        """The server process's peak resident memory (VmHWM), file-backed pages included."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20  # type: ignore[union-attr]

    def rss_gb(self) -> float:
        return memory_of(self.process.pid)["rss_mib"] / 1024

    def anon_gb(self) -> float:
        """The memory the server itself holds (RssAnon): its RSS also counts the pages of
        the page cache it maps, up to the whole vector file once that is cached (README,
        *What the server's resident memory counts*)."""
        return memory_of(self.process.pid)["anon_mib"] / 1024

    def pss_gb(self) -> float:
        """The resident memory of the server and its replicas together, each shared page
        (the vector file's, mapped by every process) counted once (Pss summed)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                total += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))  # type: ignore[union-attr]
        return total / 2**20

    def search_batches(self) -> tuple[float, float]:
        """(batches of checks searched, queries in them) so far, from the server's metrics:
        its primary's only (replicas of --processes N keep their own)."""
        deadline = time.monotonic() + 60
        while not self.metrics_port:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server logged no metrics address")
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as page:
            text = page.read().decode()
        return tuple(float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr,return-value]
                     for name in ("dedup_search_batches", "dedup_search_batched_queries"))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=600)


def checks(server: Server, requests: list[pb.CheckRequest], clients: int
           ) -> tuple[dict[str, float], list[pb.CheckResponse | BaseException | None]]:
    """Checks from a load process of its own, with the server's CPU seconds per check."""
    cpu_before, batches_before = server.cpu_seconds(), server.search_batches()
    stats, responses = process_checks(server.port, requests, clients)
    stats["server_cpu_ms_per_check"] = (
        (server.cpu_seconds() - cpu_before) * 1000 / len(requests))
    batches, queries = (after - before for after, before in
                        zip(server.search_batches(), batches_before, strict=True))
    stats["queries_per_batch_search"] = queries / batches if batches else float("nan")
    return stats, responses


def raw_faiss(data_dir: Path, probes: np.ndarray, options: SearchOptions, k: int
              ) -> dict[str, float]:
    """The served checkpoint searched in this process, one query at a time, one thread."""
    index, _ = load_index(data_dir / CHECKPOINT_FILE, probes.shape[1], model_id())
    faiss.omp_set_num_threads(1)
    count = min(len(probes), 500)
    index.search(probes[:1], k, options)  # a warm-up search, before the clock
    started_cpu, started = time.process_time(), time.perf_counter()
    for vector in probes[:count]:
        index.search(vector.reshape(1, -1), k, options)
    return {"qps": count / (time.perf_counter() - started),
            "cpu_ms_per_query": (time.process_time() - started_cpu) * 1000 / count}


def serve_and_measure(data_dir: Path, requests: list[pb.CheckRequest],
                      truth: list[dict[str, str]],
                      client_counts: list[int], kind: str | None = None,
                      parameter: int | None = None, options: tuple[str, ...] = ()
                      ) -> dict[str, object]:
    server = Server(data_dir, kind, parameter, options)
    try:
        row: dict[str, object] = {"first_answer_s": server.first_answer_seconds(requests[0]),
                                  "options": " ".join(options)}
        # A type other than the checkpoint's (asked for, or wanted by auto at this size) is
        # built by a live rebuild after the start: measure that type, not the one before.
        row["serving_asked_type_s"] = server.wait_for_type(kind)
        info = server.index_info()
        row.update(index=info.index_type, parameter=parameter,
                   rerank=info.rerank_candidates, search_parameters=info.search_parameters,
                   wanted=info.wanted_index_type)
        checks(server, requests[:100], 4)  # warm-up
        for clients in client_counts:
            stats, responses = checks(server, requests, clients)
            row[f"{clients}_clients"] = stats
            row[f"recall_{clients}_clients"] = recall(responses, truth)
            row[f"recall_other_id_{clients}_clients"] = recall(
                responses, under_other_id_numbers(truth, requests))
        row["server_rss_gb"] = server.rss_gb()
        row["server_anon_gb"] = server.anon_gb()
        row["server_pss_gb_all_processes"] = server.pss_gb()
        row["server_peak_rss_gb"] = server.peak_rss_gb()
    finally:
        server.stop()
    return row


# -- 4. a rebuild and a compaction under load --------------------------------------------

def under_load(server: Server, requests: list[pb.CheckRequest], work: Callable[[], None]
               ) -> dict[str, object]:
    """Check p99 at 8 clients before `work` (after a warm-up pass: a server just started
    answers its first checks from a cold page cache), and during it while it runs: the
    median and the worst window, and when the worst ended (seconds into `work`); and each
    window of 200 checks with what the server and the machine did in it."""
    checks(server, requests[:400], 8)
    before, _ = checks(server, requests[:400], 8)
    done, timing = threading.Event(), {"started": time.monotonic()}

    def run() -> None:
        started = time.monotonic()
        try:
            work()
        finally:
            timing["seconds"] = time.monotonic() - started
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    during, pooled = [], []
    while not done.is_set():
        before_window = _machine_counters(server.process.pid)
        stats, _ = checks(server, requests[:200], 8)
        pooled.extend(last_latencies)
        during.append(stats | {"ended_s": time.monotonic() - timing["started"]}
                      | _counted_since(before_window, server.process.pid))
    worker.join()
    worst = max(during, key=lambda d: d["p99_ms"], default={"p99_ms": float("nan"),
                                                          "ended_s": float("nan")})
    return {"seconds": timing["seconds"], "p99_before_ms": before["p99_ms"],
            "p99_during_ms": worst["p99_ms"], "worst_window_ended_s": worst["ended_s"],
            "median_p99_during_ms": statistics.median(d["p99_ms"] for d in during)
            if during else float("nan"),
            "errors_during": sum(d["errors"] for d in during),
            "qps_before": before["qps"],
            "qps_during": statistics.median(d["qps"] for d in during) if during else 0.0,
            # every check during `work` together: the p99 of the whole time, which a window
            # of 200 (its third slowest) only estimates
            "pooled_p99_during_ms": summarise(pooled, 1.0)["p99_ms"] if pooled else float("nan"),
            "checks_during": len(pooled),
            "windows": [{key: round(d[key], 3) for key in _WINDOW_FIELDS} for d in during]}


_WINDOW_FIELDS = ("ended_s", "p99_ms", "qps", "server_cpu_s", "server_major_faults",
                  "machine_major_faults", "disk_read_mb", "disk_written_mb")


def _machine_counters(pid: int) -> dict[str, float]:
    """The server process's CPU seconds and major page faults (pages read from disk), and
    the machine's major faults and disk reads and writes in MB (/proc/diskstats, whole disks
    only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    read = written = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        parts = line.split()
        if Path(f"/sys/block/{parts[2]}").exists():  # a disk, not a partition
            read, written = read + int(parts[5]), written + int(parts[9])
    vmstat = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {"server_cpu_s": process_cpu_seconds(pid), "server_major_faults": int(fields[9]),
            "machine_major_faults": int(vmstat["pgmajfault"]),
            "disk_read_mb": read * 512 / 1e6, "disk_written_mb": written * 512 / 1e6}


def _counted_since(before: dict[str, float], pid: int) -> dict[str, float]:
    now = _machine_counters(pid)
    return {key: now[key] - before[key] for key in now}


def rebuild_and_compact(data_dir: Path, requests: list[pb.CheckRequest],
                        skip_rebuild: bool = False, options: tuple[str, ...] = ()
                        ) -> dict[str, object]:
    server = Server(data_dir, options=options)
    try:
        server.first_answer_seconds(requests[0])
        kind = server.index_info().index_type

        phases: dict[str, float] = {}  # the rebuild's phases: seconds from its start

        def rebuild() -> None:
            started = time.monotonic()
            with server.channel() as channel:
                for progress in pb_grpc.IndexAdminStub(channel).Rebuild(
                        pb.RebuildRequest(index_factory=kind)):
                    phases.setdefault(progress.phase, time.monotonic() - started)

        def compact() -> None:
            with server.channel() as channel:
                pb_grpc.IndexAdminStub(channel).Compact(pb.CompactRequest())

        result: dict[str, object] = {"index": kind, "options": " ".join(options)}
        if not skip_rebuild:
            result["live_rebuild"] = under_load(server, requests, rebuild) | {
                "phases_started_s": phases}
        result["compaction"] = under_load(server, requests, compact) | {
            "writes_paused_s": max(server.pauses, default=float("nan")),
            "writes_paused": server.pause_details}
        return result
    finally:
        server.stop()


# -- the run ------------------------------------------------------------------------------

def served_setups(also_with: list[str], kinds: list[str]
                  ) -> list[tuple[str | None, int | None, tuple[str, ...]]]:
    """The servers measured, in order: the default one, the default one with each set of
    --also-with options, then each --kinds type at each of its parameters."""
    setups: list[tuple[str | None, int | None, tuple[str, ...]]] = [(None, None, ())]
    setups += [(None, None, tuple(shlex.split(options))) for options in also_with]
    for spec in kinds:
        kind, _, sweep = spec.partition("@")
        setups += [(kind, parameter, ())
                   for parameter in ([int(n) for n in sweep.split(",")] if sweep else [None])]
    return setups


def check_requests(probes: np.ndarray, probe_ids: list[str]) -> list[pb.CheckRequest]:
    return [pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(values=v.tolist())),
                            claimed_id_number=c, max_candidates=100)
            for v, c in zip(probes, probe_ids, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=1_000_000)
    parser.add_argument("--variant", choices=VARIANTS, default="iso",
                        help="the data variant (see benchmarks/gallery_data.py)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-scale"))
    parser.add_argument("--kinds", nargs="*", default=[],
                        help="other index types to measure, each optionally @param,param,...")
    parser.add_argument("--also-with", action="append", default=[], metavar="OPTIONS",
                        help="one more row of the default server, started with these "
                             "`dedup serve` options (e.g. --also-with='--numpy-blas-threads 0'); "
                             "repeatable; the rows run one after the other, so the later "
                             "one has a warm page cache")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--skip-maintenance", action="store_true",
                        help="skip the live rebuild and the compaction under load")
    parser.add_argument("--maintenance-with", default="", metavar="OPTIONS",
                        help="`dedup serve` options of the server the rebuild and compaction "
                             "run on (e.g. --maintenance-with='--rebuild-niceness 0')")
    parser.add_argument("--maintenance-only", action="store_true",
                        help="only the live rebuild and the compaction under load (on a "
                             "gallery an earlier run imported)")
    parser.add_argument("--skip-rebuild", action="store_true",
                        help="with --maintenance-only: the compaction under load only")
    args = parser.parse_args()

    name = f"{args.registrations}-{args.variant}"
    maintenance_options = tuple(shlex.split(args.maintenance_with))
    gallery, data_dir, imported = imported_gallery(args.workdir, args.registrations,
                                                   args.variant, args.probes)
    result: dict[str, object] = {"registrations": gallery.registrations,
                                 "variant": args.variant}
    if imported is not None:
        result["import"] = imported
    files = disk_bytes(data_dir)
    result["disk"] = {"files": files,
                      "bytes_per_registration": sum(files.values()) / gallery.registrations}
    print("disk", json.dumps(result["disk"]), flush=True)
    requests = check_requests(gallery.probes, gallery.probe_ids)
    if args.maintenance_only:
        maintenance = rebuild_and_compact(data_dir, requests, args.skip_rebuild,
                                          maintenance_options)
        RESULTS.mkdir(exist_ok=True)
        with_options = re.sub(r"[^A-Za-z0-9]+", "-", args.maintenance_with).strip("-")
        out = RESULTS / (f"scale-{name}-{'compaction' if args.skip_rebuild else 'maintenance'}"
                         f"{'-' + with_options if with_options else ''}.json")
        out.write_text(json.dumps(maintenance, indent=2))
        print(json.dumps(maintenance, indent=1), f"\nwrote {out}")
        return
    truth = ground_truth(data_dir, gallery.probes)
    rows = []
    for kind, parameter, options in served_setups(args.also_with, args.kinds):
        row = serve_and_measure(data_dir, requests, truth, args.clients, kind, parameter,
                                options)
        # the server checkpointed its index when it stopped: search that one here
        row["raw_faiss"] = raw_faiss_of_served(data_dir, gallery.probes, row)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result["serving"] = rows
    if not args.skip_maintenance:
        result["maintenance"] = rebuild_and_compact(data_dir, requests,
                                                    options=maintenance_options)
        print("maintenance", json.dumps(result["maintenance"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scale-{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")


def raw_faiss_of_served(data_dir: Path, probes: np.ndarray, row: dict[str, object]
                        ) -> dict[str, float]:
    # e.g. "nprobe=512 (calibrated: 0.9990 of 2,000 same-person pairs found)"
    nprobe = re.search(r"\bnprobe=(\d+)", str(row["search_parameters"]))
    options = SearchOptions(nprobe=int(nprobe[1]) if nprobe else 0)
    return raw_faiss(data_dir, probes, options, max(1, int(row["rerank"])))  # type: ignore[call-overload]


def print_table(result: dict[str, object]) -> None:
    print(f"\n{result['registrations']:,} registrations ({result['variant']})")
    if "import" in result:
        imp = result["import"]
        print(f"import: {imp['per_second']:,.0f} reg/s, peak anon RSS {imp['peak_anon_mib']:,} "  # type: ignore[index]
              f"MiB, growth after the first third {imp['anon_mib_growth_after_first_third']:,} MiB")  # type: ignore[index]
    print(f"disk: {result['disk']['bytes_per_registration']:,.0f} B/registration")  # type: ignore[index]
    print(f"{'index':24} {'param':>6} {'start s':>7} {'recall':>7} {'other':>7} {'q/s@1':>7} "
          f"{'q/s@8':>7} "
          f"{'p50@8':>6} {'p99@8':>6} {'cpu ms':>6} {'raw ms':>6} {'q/bat8':>6} {'RSS GB':>6} "
          f"{'anon':>6} {'PSS GB':>6}")
    for row in result["serving"]:  # type: ignore[attr-defined]
        def get(clients: str, field: str, row: dict = row) -> float:
            return float(row.get(clients, {}).get(field, float("nan")))

        raw = row.get("raw_faiss", {}).get("cpu_ms_per_query", float("nan"))
        if row.get("options"):
            print(f"  with {row['options']}:")
        print(f"{row['index']:24} {row['parameter'] or '':>6} {row['first_answer_s']:7.1f} "
              f"{row.get('recall_8_clients', float('nan')):7.4f} "
              f"{row.get('recall_other_id_8_clients', float('nan')):7.4f} "
              f"{get('1_clients', 'qps'):7.1f} "
              f"{get('8_clients', 'qps'):7.1f} {get('8_clients', 'p50_ms'):6.1f} "
              f"{get('8_clients', 'p99_ms'):6.1f} "
              f"{get('8_clients', 'server_cpu_ms_per_check'):6.2f} {raw:6.2f} "
              f"{get('8_clients', 'queries_per_batch_search'):6.2f} "
              f"{row['server_rss_gb']:6.2f} "
              f"{row.get('server_anon_gb', float('nan')):6.2f} "
              f"{row.get('server_pss_gb_all_processes', float('nan')):6.2f}")
    if "maintenance" in result:
        print(json.dumps(result["maintenance"], indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
