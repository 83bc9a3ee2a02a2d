"""`dedup migrate`: copy an embedded data directory into Milvus, with progress bars, and
report the verification."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dedup.cli.serve import add_milvus_index_arguments, milvus_index_json
from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.settings import MilvusConfig, milvus_token

if TYPE_CHECKING:
    from dedup.ops.migrate import Migration

# How migrate reports progress: start(total, already done) -> advance(count copied).
ProgressStart = Callable[[int, int], Callable[[int], None]]


def register(commands: Subcommands) -> None:
    migrate = add_subcommand(commands, "migrate", "copy an embedded data directory into Milvus "
                             "(resumable, verified)", """
        Copies an embedded data directory (locked: no server may run on it meanwhile)
        into the Milvus collections under --milvus-prefix: the registrations in key order,
        --batch at a time as upserts (a run that was interrupted resumes after the last
        batch copied), then the audit trail (as the chain "embedded:<data dir>", every
        record and hash unchanged) and the adjudications. Last it verifies the copy: Milvus
        must hold exactly the store's registrations, key by key, and --sample stored
        embeddings must find the same top-10 registrations in both (on an approximate
        index, whose top-10 of unrelated registrations may rightly differ: their own
        registration first, re-scored from its copied embedding). The Milvus token comes
        from $DEDUP_MILVUS_TOKEN. Exit status 1 when the verification fails.
        """, ["dedup migrate --from index_data --to milvus://milvus:19530",
              "dedup migrate --from index_data --to /srv/dedup/milvus.db --batch 10000"],
        migrate_command)
    migrate.add_argument("--from", dest="source", type=Path, required=True, metavar="DATA_DIR")
    migrate.add_argument("--to", dest="target", required=True, metavar="URI",
                         help="milvus://host:port, http(s)://host:port, or a Milvus Lite *.db")
    migrate.add_argument("--milvus-prefix", default="dedup")
    add_milvus_index_arguments(migrate)
    migrate.add_argument("--batch", type=int, default=5_000, help="registrations per upsert")
    migrate.add_argument("--sample", type=int, default=100,
                         help="stored embeddings searched in both to verify the copy")


@contextmanager
def _copy_progress() -> Iterator[ProgressStart]:
    """A progress bar per copy migrate starts, all closed on the way out."""
    from tqdm import tqdm

    bars: list[tqdm[Any]] = []

    def start(total: int, done: int) -> Callable[[int], None]:
        bar: tqdm[Any] = tqdm(desc="copying", unit="reg", total=total, initial=done)
        bars.append(bar)

        def advance(count: int) -> None:
            bar.update(count)

        return advance

    try:
        yield start
    finally:
        for bar in bars:
            bar.close()


def _what_differs(report: Migration) -> str:
    # Compared key by key: Milvus holding more, or fewer, than the store is among these.
    if report.not_in_store or report.missing_in_milvus:
        return ("Milvus holds registrations the store does not (erased from the store since "
                "they were copied?) or lacks some of its own: drop the prefix's collections, "
                "delete the state file milvus-migration.json in the data directory, and "
                "migrate again")
    return ("sampled searches found other registrations in Milvus than in the store: check "
            "the index options, or migrate again")


def migrate_command(args: argparse.Namespace) -> int:
    from dedup.ops.migrate import migrate, top_k

    if args.batch < 1 or args.sample < 0:
        raise SystemExit("dedup migrate: --batch must be >= 1 and --sample >= 0")
    index_params, search_params = milvus_index_json(args, "migrate")
    config = MilvusConfig(uri=args.target, token=milvus_token(),
                          prefix=args.milvus_prefix, index_type=args.milvus_index_type,
                          index_params=index_params, search_params=search_params)
    with _copy_progress() as start:
        report = migrate(args.source, config, args.batch, args.sample, start)
    resumed = ""
    if report.started_over:
        resumed = " (from the start: the target holds nothing an earlier run copied there)"
    elif report.resumed_after:
        resumed = f" (resumed after key {report.resumed_after})"
    print(f"copied {report.copied:,} registrations{resumed}, {report.audit_records:,} audit "
          f"records and {report.adjudications:,} adjudications from {args.source} to "
          f"{args.target}")
    compared = "the same top-10 in both" if top_k(config) > 1 else \
        f"their own registration first ({config.index_type} is approximate: only the best " \
        "is compared)"
    by_key = ""
    if report.missing_in_milvus or report.not_in_store:
        by_key = (f" ({report.missing_in_milvus:,} of the store's missing, "
                  f"{report.not_in_store:,} not in the store)")
    print(f"verify: store {report.store_registrations:,} registrations, Milvus "
          f"{report.milvus_registrations:,}{by_key}; {report.sample_agreeing}/{report.sampled} "
          f"sampled searches found {compared}")
    if not report.verified:
        print(f"VERIFICATION FAILED: the copy differs ({_what_differs(report)})",
              file=sys.stderr)
        return 1
    print("verified")
    return 0
