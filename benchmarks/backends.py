"""The backends side by side on the same data, over gRPC: embedded, Milvus Lite, and a real
Milvus server.

Configurations (--backends, --index-types, --nodes), each on an empty gallery, every dedup
node a `dedup serve` process:
  - embedded: LMDB + FAISS Flat in the node;
  - lite INDEX: Milvus Lite in the node's process (a local .db), one node;
  - server INDEX, N nodes: a Milvus 2.3.5 standalone server (the `milvus` package, started
    here by tests/milvus_server.py with Milvus's own settings unless --milvus-setting says
    otherwise; or --milvus-uri), with one dedup node or two on it.
INDEX is FLAT (exact), or IVF_FLAT, IVF_SQ8, HNSW. Verdicts never rest on approximate
scores: IVF_FLAT and HNSW keep the vectors whole, so the scores Milvus returns for their
candidates are the exact inner products; the types that quantise (IVF_SQ8) have their
candidates re-scored from the stored embeddings.
Measured for each:
  - enrol/s through EnrollStream (--registrations, one stream per node at once), then a
    flush and Milvus's index build; enrol/s by Enroll with check_first (--checked new
    persons, one client per node);
  - Check q/s, p50, p99 with 1 and --clients clients (spread over the nodes), probes a fresh
    capture of an enrolled person claiming its ID, half of them persons registered twice;
  - duplicate recall: of the registrations each duplicate probe truly matches (exact cosine
    >= the match threshold, numpy), the share its Check lists;
  - Milvus calls per enrolment (stream, check_first) and per Check, and how many of them
    were Strong reads (each waits for Milvus's next time tick): the nodes'
    dedup_milvus_calls and dedup_milvus_strong_reads gauges before and after.
With --preload N the first N registrations are loaded in bulk before any clock starts
(`dedup import --data-dir` into a data directory, copied for the embedded node and copied
into each Milvus configuration's collections by `dedup migrate`), and the streamed
enrolments are the rest, enrolled on top of them: how 1,000,000 is measured.
Prints a table; writes benchmarks/results/backends-N.json.

    .venv/bin/python benchmarks/backends.py --registrations 100000
    .venv/bin/python benchmarks/backends.py --registrations 1000000 --preload 980000 \\
        --backends embedded server --index-types FLAT --nodes 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from dedup import FaceGenerator, Policy
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.ops.migrate import STATE_FILE

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import connected_stub, own_channel, run_threads
from milvus_server import MilvusServer, drop_prefix
from processes import ServerProcess

RESULTS = Path(__file__).parent / "results"
MATCH = Policy().match_threshold


def index_options(index: str, registrations: int) -> list[str]:
    """`dedup serve` options for a Milvus index type, sized for the gallery."""
    nlist = int(min(4096, max(64, 4 * registrations ** 0.5)))
    build, search = {"FLAT": ({}, {}),
                     "IVF_FLAT": ({"nlist": nlist}, {"nprobe": max(16, nlist // 16)}),
                     "IVF_SQ8": ({"nlist": nlist}, {"nprobe": max(16, nlist // 16)}),
                     "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 128})}[index]
    return ["--milvus-index-type", index, "--milvus-index-params", json.dumps(build),
            "--milvus-search-params", json.dumps(search)]


@dataclass(frozen=True)
class Setup:
    """One configuration: its name, each node's `dedup serve` options, Milvus's URI."""

    name: str
    node_options: list[list[str]]
    milvus_uri: str = ""


def setups(args: argparse.Namespace, work: Path, server_uri: str) -> Iterator[Setup]:
    if "embedded" in args.backends:
        yield Setup("embedded (LMDB + FAISS, auto)", [[]])
    for index in args.index_types:
        options = index_options(index, args.registrations)
        if "lite" in args.backends:
            lite = str(work / f"lite-{index}.db")
            yield Setup(f"Milvus Lite, {index}", [["--backend", "milvus", "--milvus-uri",
                                                  lite, *options]])
        if "server" in args.backends:
            for count in args.nodes:
                prefix = ["--backend", "milvus", "--milvus-uri", server_uri,
                          "--milvus-prefix", f"bench_{index.lower()}_{count}", *options]
                yield Setup(f"Milvus 2.3.5 server, {index}, {count} node(s)",
                            [prefix] * count, server_uri)


def node_dir(setup: Setup, work: Path, n: int) -> Path:
    return work / f"node-{abs(hash(setup.name))}-{n}"


def option(setup: Setup, name: str) -> str | None:
    options = setup.node_options[0]
    return options[options.index(name) + 1] if name in options else None


def preloaded_directory(load: Workload, count: int, work: Path) -> Path:
    """A data directory holding the first `count` registrations: `dedup import --data-dir`
    of them, written as .npy + .csv files of 100,000."""
    files = work / "preload"
    files.mkdir()
    for start in range(0, count, 100_000):
        part = range(start, min(count, start + 100_000))
        np.save(files / f"part-{start:09d}.npy", load.vectors[part.start:part.stop])
        with open(files / f"part-{start:09d}.csv", "w") as csv:
            csv.write("registration_id,id_number\n")
            csv.writelines(f"{load.registrations[i].registration_id},"
                           f"{load.registrations[i].id_number}\n" for i in part)
    data_dir = work / "preloaded"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "dedup", "import", "--data-dir", str(data_dir),
                    *map(str, sorted(files.glob("*.npy")))], check=True)
    print(f"  preloaded {count:,} registrations in {time.monotonic() - started:.0f} s",
          flush=True)
    shutil.rmtree(files)
    return data_dir


def preload(setup: Setup, work: Path, preloaded: Path) -> None:
    """The preloaded registrations into the configuration: a copy of the data directory for
    the embedded node, `dedup migrate` of it into a Milvus configuration's collections."""
    started = time.monotonic()
    uri = option(setup, "--milvus-uri")
    if uri is None:
        shutil.copytree(preloaded, node_dir(setup, work, 0))
    else:
        (preloaded / STATE_FILE).unlink(missing_ok=True)  # another configuration's copy
        subprocess.run([sys.executable, "-m", "dedup", "migrate", "--from", str(preloaded),
                        "--to", uri,
                        *[part for name in ("--milvus-prefix", "--milvus-index-type",
                                            "--milvus-index-params", "--milvus-search-params")
                          if option(setup, name) is not None
                          for part in (name, str(option(setup, name)))],
                        "--batch", "10000", "--sample", "10"], check=True,
                       stdout=subprocess.DEVNULL)
    print(f"  copied in {time.monotonic() - started:.0f} s", flush=True)


@contextmanager
def started_nodes(setup: Setup, work: Path) -> Iterator[list[ServerProcess]]:
    nodes = []
    try:
        for n, options in enumerate(setup.node_options):
            nodes.append(ServerProcess(node_dir(setup, work, n), *options,
                                       "--metrics-address", "127.0.0.1:0"))
        yield nodes
    finally:
        for node in nodes:
            node.process.terminate()
            node.wait(120)


def metrics_port(node: ServerProcess) -> int:
    import re

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in list(node.lines):
            if found := re.search(r"metrics on http://[^:]+:(\d+)/metrics", line):
                return int(found.group(1))
        time.sleep(0.05)
    raise SystemExit("a node did not report its metrics port")


COUNTED = {"dedup_milvus_calls": "milvus_calls", "dedup_milvus_strong_reads": "strong_reads"}


def milvus_calls(ports: list[int]) -> np.ndarray:
    """The nodes' dedup_milvus_calls and dedup_milvus_strong_reads gauges, summed (0 for the
    embedded backend)."""
    totals = dict.fromkeys(COUNTED, 0.0)
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
            for line in page.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name in totals:
                    totals[name] += float(value)
    return np.array(list(totals.values()))


def per(what: str, before: np.ndarray, after: np.ndarray, count: int) -> dict[str, float]:
    """{milvus_calls_per_<what>, strong_reads_per_<what>} from the gauges around `count`."""
    return {f"{name}_per_{what}": float(done) / count
            for name, done in zip(COUNTED.values(), after - before, strict=True)}


def face(vector: np.ndarray) -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=vector.tolist()))


def enrol_streams(stubs: list[pb_grpc.FaceDedupStub], registrations: list[pb.Registration],
                  vectors: np.ndarray) -> float:
    """One EnrollStream per node at once, the registrations split among them: per second."""
    failures: list[str] = []

    def stream(part: int) -> None:
        requests = (pb.EnrollRequest(registration=registrations[i], face=face(vectors[i]))
                    for i in range(part, len(registrations), len(stubs)))
        failures.extend(str(r.error) for r in stubs[part].EnrollStream(requests)
                        if r.HasField("error"))

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(len(stubs))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"enrolment failed: {failures[0]}")
    return len(registrations) / (time.perf_counter() - started)


def enrol_checked(ports: list[int], vectors: np.ndarray) -> float:
    """Enroll with check_first, one client per node: per second."""
    def worker() -> Callable[[int], pb.EnrollResponse]:
        stubs = [pb_grpc.FaceDedupStub(own_channel(f"127.0.0.1:{port}")) for port in ports]
        return lambda n: stubs[n % len(stubs)].Enroll(pb.EnrollRequest(
            registration=pb.Registration(registration_id=f"new{n}", id_number=f"NEW{n}"),
            face=face(vectors[n]), check_first=True), timeout=120)

    stats, results = run_threads(len(vectors), len(ports), worker)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise SystemExit(f"check_first enrolment failed: {failed[0]}")
    return stats["qps"]


def checks(ports: list[int], requests: list[pb.CheckRequest], clients: int
           ) -> tuple[dict[str, float], list[object]]:
    """Check calls from `clients` threads, client i on node i mod nodes."""
    turn = iter(range(clients))
    lock = threading.Lock()

    def worker() -> Callable[[int], pb.CheckResponse]:
        with lock:
            port = ports[next(turn) % len(ports)]
        stub = connected_stub(port)
        return lambda n: stub.Check(requests[n], timeout=120)

    stats, answers = run_threads(len(requests), clients, worker)
    return stats, list(answers)


def settle(port: int, setup: Setup, prefix: str | None) -> None:
    """Flushes (IndexAdmin.Checkpoint), then on a Milvus server waits until its index covers
    every row, as it would a while after a bulk enrolment."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pb_grpc.IndexAdminStub(channel).Checkpoint(pb.CheckpointRequest(), timeout=3600)
    if not setup.milvus_uri or prefix is None:
        return
    from pymilvus import MilvusClient

    client = MilvusClient(uri=setup.milvus_uri)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3600:
            index = client.describe_index(f"{prefix}_registrations", "embedding")
            # Milvus builds no index for a segment under 1,024 rows (it is searched by brute
            # force), so indexed_rows can stay below total_rows: nothing pending is enough.
            if index.get("pending_index_rows", 0) == 0:
                print(f"  index built: {index.get('indexed_rows', 0):,} of "
                      f"{index.get('total_rows', 0):,} rows indexed, waited "
                      f"{time.monotonic() - started:.0f} s", flush=True)
                return
            time.sleep(1)
    finally:
        client.close()


def prefix_of(setup: Setup) -> str | None:
    return option(setup, "--milvus-prefix")


def drop_collections(setup: Setup) -> None:
    """Drops what an earlier run left under the configuration's prefix (--milvus-uri):
    every configuration starts on empty collections, built with its own index."""
    prefix = prefix_of(setup)
    if setup.milvus_uri and prefix is not None:
        drop_prefix(setup.milvus_uri, prefix)


@dataclass(frozen=True)
class Workload:
    registrations: list[pb.Registration]
    vectors: np.ndarray
    fresh: np.ndarray  # new persons for check_first enrolments
    requests: list[pb.CheckRequest]
    truth: list[set[str]]
    duplicate_probes: list[int]


def measure(setup: Setup, work: Path, load: Workload, clients: int,
            preloaded: Path | None, skip: int) -> dict[str, float]:
    drop_collections(setup)
    if preloaded is not None:
        preload(setup, work, preloaded)
    with started_nodes(setup, work) as nodes:
        ports, scraped = [n.port for n in nodes], [metrics_port(n) for n in nodes]
        stubs = [pb_grpc.FaceDedupStub(grpc.insecure_channel(f"127.0.0.1:{p}")) for p in ports]
        served = stubs[0].Stats(pb.StatsRequest(), timeout=1800).registrations
        if served != skip:
            raise SystemExit(f"{setup.name}: the node serves {served:,} registrations, not "
                             f"the {skip:,} preloaded")
        row: dict[str, float] = {}
        before = milvus_calls(scraped)
        streamed = load.registrations[skip:]
        row["enrol_stream_per_s"] = enrol_streams(stubs, streamed, load.vectors[skip:])
        row |= per("stream_enrolment", before, milvus_calls(scraped), len(streamed))
        settle(ports[0], setup, prefix_of(setup))
        before = milvus_calls(scraped)
        row["enrol_check_first_per_s"] = enrol_checked(ports, load.fresh)
        row |= per("checked_enrolment", before, milvus_calls(scraped), len(load.fresh))
        settle(ports[0], setup, prefix_of(setup))
        before = milvus_calls(scraped)
        for count in (1, clients):
            stats, answers = checks(ports, load.requests, count)
            row |= {f"check_{count}c_{key}": value for key, value in stats.items()}
        row |= per("check", before, milvus_calls(scraped), 2 * len(load.requests))
        row["duplicate_recall"] = recall(answers, load.truth, load.duplicate_probes)
        return row


def recall(answers: list[object], truth: list[set[str]], which: list[int]) -> float:
    expected = found = 0
    for n in which:
        answer = answers[n]
        listed = {m.registration.registration_id for m in answer.matches
                  if m.score >= MATCH} if isinstance(answer, pb.CheckResponse) else set()
        expected += len(truth[n])
        found += len(truth[n] & listed)
    return found / max(1, expected)


def population(count: int, seed: int) -> tuple[list[pb.Registration], np.ndarray, np.ndarray]:
    """Registrations, their embeddings, and each one's person (5% of persons twice)."""
    generator = FaceGenerator(seed)
    persons = generator.persons(int(count / 1.05))
    twice = persons[: count - len(persons)]
    vectors = np.vstack([generator.captures(persons), generator.captures(twice)])
    person_of = np.concatenate([np.arange(len(persons)), np.arange(len(twice))])
    registrations = [pb.Registration(registration_id=f"r{i}",
                                     id_number=f"ID{i if i < len(persons) else 'D' + str(i)}")
                     for i in range(len(vectors))]
    return registrations, vectors.astype(np.float32), person_of


def workload(args: argparse.Namespace) -> Workload:
    registrations, vectors, person_of = population(args.registrations, args.seed)
    generator = FaceGenerator(args.seed + 2)
    rng = np.random.default_rng(args.seed)
    duplicated = np.flatnonzero(np.bincount(person_of) > 1)
    chosen = np.concatenate([rng.choice(duplicated, args.probes // 2),
                             rng.choice(len(np.bincount(person_of)), args.probes // 2)])
    first_of = {int(p): i for i, p in reversed(list(enumerate(person_of)))}
    probes = np.vstack([generator.capture(vectors[first_of[int(p)]]) for p in chosen])
    requests = [pb.CheckRequest(face=face(probe), max_candidates=20,
                                claimed_id_number=registrations[first_of[int(p)]].id_number)
                for probe, p in zip(probes, chosen, strict=True)]
    truth: list[set[str]] = [set() for _ in probes]
    for start in range(0, len(vectors), 100_000):  # exact ground truth, a block at a time
        scores = probes @ vectors[start:start + 100_000].T
        for n, row in enumerate(scores):
            truth[n].update(registrations[start + j].registration_id
                            for j in np.flatnonzero(row >= MATCH))
    fresh = FaceGenerator(args.seed + 1).persons(args.checked).astype(np.float32)
    return Workload(registrations, vectors, fresh, requests, truth,
                    list(range(args.probes // 2)))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=100_000)
    parser.add_argument("--checked", type=int, default=300)
    parser.add_argument("--probes", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--preload", type=int, default=0, metavar="N",
                        help="load the first N registrations in bulk, unclocked, and enrol "
                        "only the rest through EnrollStream (see above)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--backends", nargs="+", default=["embedded", "lite", "server"],
                        choices=["embedded", "lite", "server"])
    parser.add_argument("--index-types", nargs="+",
                        default=["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2],
                        help="dedup nodes on the Milvus server")
    parser.add_argument("--milvus-uri", default="",
                        help="a Milvus server to use instead of starting 2.3.5 here")
    parser.add_argument("--milvus-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a Milvus setting for the server started here, e.g. "
                        "proxy.timeTickInterval=20 (default: Milvus's own)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    load = workload(args)
    settings = dict(setting.split("=", 1) for setting in args.milvus_setting)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dedup-backends-") as temporary, ExitStack() as stack:
        work = Path(temporary)
        uri = args.milvus_uri
        if "server" in args.backends and not uri:
            server = MilvusServer(work / "milvus", settings)
            server.start()
            stack.callback(server.stop)
            uri = server.uri
        preloaded = preloaded_directory(load, args.preload, work) if args.preload else None
        for setup in setups(args, work, uri):
            print(f"{setup.name} ...", flush=True)
            results[setup.name] = measure(setup, work, load, args.clients, preloaded,
                                          args.preload)
    print_table(results, args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"backends-{args.registrations}.json"
    out.write_text(json.dumps({"args": vars(args), "milvus_settings": settings,
                               "machine": platform.platform(), "results": results}, indent=2))
    print(f"wrote {out}")


def print_table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    c = args.clients
    print(f"\n{args.registrations:,} registrations, {args.probes:,} Check probes (half of them "
          f"duplicated persons), {c} clients\n")
    print(f"| configuration | enrol/s (stream) | enrol/s (check_first) | Check q/s 1c | p50 ms "
          f"| p99 ms | Check q/s {c}c | p50 ms | p99 ms | duplicate recall | Milvus calls "
          "per enrolment (stream / check_first) | per Check | Strong reads per check_first "
          "enrolment | per Check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['enrol_stream_per_s']:,.0f} | {r['enrol_check_first_per_s']:,.1f} "
              f"| {r['check_1c_qps']:,.1f} | {r['check_1c_p50_ms']:.1f} | "
              f"{r['check_1c_p99_ms']:.1f} | {r[f'check_{c}c_qps']:,.1f} | "
              f"{r[f'check_{c}c_p50_ms']:.1f} | {r[f'check_{c}c_p99_ms']:.1f} | "
              f"{r['duplicate_recall']:.3f} | {r['milvus_calls_per_stream_enrolment']:.1f} / "
              f"{r['milvus_calls_per_checked_enrolment']:.1f} | "
              f"{r['milvus_calls_per_check']:.1f} | "
              f"{r.get('strong_reads_per_checked_enrolment', 0):.1f} | "
              f"{r.get('strong_reads_per_check', 0):.1f} |")


if __name__ == "__main__":
    main()
