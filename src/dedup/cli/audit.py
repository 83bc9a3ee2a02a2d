"""`dedup audit verify|export`: check or export the hash-chained audit trail, of an embedded
data directory or of the Milvus backend (one chain per node process)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from dedup.cli.offline import open_store_reader
from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.audit_chain import Verification
from dedup.core.settings import MilvusConfig, milvus_token


def register(commands: Subcommands) -> None:
    audit = add_subcommand(commands, "audit", "check or export the audit trail", """
        Works on the audit trail: every erasure and every investigator's search is a
        record (who called, the method, case ID, purpose, query and the registration IDs
        returned) holding the SHA-256 hash of the record before it, so a record edited,
        removed or reordered afterwards breaks the chain. `verify` checks the chain(s),
        `export` writes the records as JSON lines. The trail of an embedded data directory
        (read-only, also beside a running server) or, with --milvus-uri, of the Milvus
        backend.
        """, ["dedup audit verify index_data",
              "dedup audit export index_data --since 2024-06-01 --out june.jsonl"])
    actions = audit.add_subparsers(required=True, metavar="ACTION")

    verify = add_subcommand(actions, "verify", "check the hash chain(s)", """
        Recomputes every record's hash and its link to the record before, and prints
        whether the trail is intact or the first record where it breaks and why (for
        Milvus, one line per node's chain). Exit status 1 when any chain is broken.
        """, ["dedup audit verify index_data",
              "dedup audit verify --milvus-uri milvus://milvus:19530"], audit_verify_command)
    _trail_arguments(verify)

    export = add_subcommand(actions, "export", "records as JSON lines", """
        Writes the audit records with --since <= time < --until (all by default) as JSON
        lines, oldest first, to --out or standard output: one record a line with its
        sequence, time, caller and role, method, case ID, purpose, query, the registration
        IDs returned, and its own and the previous record's hash.
        """, ["dedup audit export index_data --since 2024-06-01 --until 2024-07-01 "
              "--out june.jsonl"], audit_export_command)
    _trail_arguments(export)
    export.add_argument("--since", type=_moment, help="ISO date-time (UTC unless given)")
    export.add_argument("--until", type=_moment, help="ISO date-time, exclusive")
    export.add_argument("--out", type=Path, help="file to write (default stdout)")


def _trail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, nargs="?", metavar="DATA_DIR",
                        help="an embedded data directory; or give --milvus-uri")
    parser.add_argument("--milvus-uri", default="", metavar="URI",
                        help="the Milvus backend's trail (one chain per node process)")
    parser.add_argument("--milvus-prefix", default="dedup")


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _milvus_trail(args: argparse.Namespace) -> dict[str, list[tuple[int, bytes]]] | None:
    """The Milvus chains with --milvus-uri, None for a data directory (exactly one given)."""
    if bool(args.milvus_uri) == (args.data_dir is not None):
        raise SystemExit("dedup audit: give DATA_DIR or --milvus-uri, one of them")
    if not args.milvus_uri:
        return None
    from dedup.gallery.milvus import read_audit_chains

    return read_audit_chains(MilvusConfig(uri=args.milvus_uri, token=milvus_token(),
                                          prefix=args.milvus_prefix))


def audit_verify_command(args: argparse.Namespace) -> int:
    from dedup.core.audit_chain import verify, verify_chains

    chains = _milvus_trail(args)
    if chains is not None:
        return _report_chains(verify_chains(chains))
    store = open_store_reader(args.data_dir)
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
        store = open_store_reader(args.data_dir)
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
