"""The data commands: bulk import, index rebuild and store compaction (through a running
server, or with --data-dir on a data directory no server holds), and the offline check and
hot backup of a data directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.cli.channel import add_client_subcommand, open_channel, open_dedup_stub
from dedup.cli.offline import add_offline_arguments, open_offline_gallery
from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.settings import Limits


def register(commands: Subcommands) -> None:
    bulk = add_client_subcommand(commands, "import", "bulk-load embeddings from .npy + .csv "
                                 "files", """
        Loads registrations with their embeddings: row i of each FILE.npy (N x 512 float32)
        with row i of the FILE.csv beside it; a CSV with more or fewer rows than its
        embeddings stops the import before anything is stored. Into a running server
        (EnrollStream, with an admin's credential: a registration desk's embeddings are
        refused), or with --data-dir straight into a data directory no server holds (one
        LMDB transaction per batch). Registration IDs already enrolled are skipped,
        so an interrupted import resumes when run again; rows that fail validation or
        collide are reported, never half-stored. Prints a summary and the rate; exit
        status 2 when any row was rejected.
        """, ["dedup import batch-1.npy batch-2.npy --server 127.0.0.1:50051",
              "dedup import batch-1.npy --data-dir index_data"], import_command)
    bulk.add_argument("files", type=Path, nargs="+", metavar="FILE.npy",
                      help="each with a FILE.csv beside it (registration_id, id_number, msisdn, "
                      "carrier, region), row i for embedding i")
    add_offline_arguments(bulk)

    rebuild = add_client_subcommand(commands, "rebuild", "rebuild the index (live on a server, "
                                    "or offline on a data directory)", """
        Builds a new index of the stored embeddings. On a server (IndexAdmin.Rebuild) it is
        built in a separate process while the old index keeps answering, the changes made
        meanwhile are applied, and the two are swapped atomically; with --data-dir it is
        built and checkpointed in a data directory no server holds. Shows the progress and
        prints the index type and size built. A SignIVF or FastScanIVF index is calibrated as
        it is built: the nprobe it searches is measured on the gallery's own duplicates.
        """, ["dedup rebuild --index-factory BinarySign512",
              "dedup rebuild --data-dir index_data --index-factory FastScanIVF4096",
              "dedup rebuild --data-dir index_data --index-factory IVF4096,Flat"],
        rebuild_command)
    rebuild.add_argument("--index-factory", default="",
                         help="Flat, BinarySign512, BinarySign256, BinaryIVF<n>, SignIVF<n>, "
                         "FastScanIVF<n>, IVF<n>,Flat|SQ8|PQ<m>, OPQ<m>,IVF<n>,PQ<m>; "
                         "default: the server's configured type (offline: auto)")
    add_offline_arguments(rebuild)

    compact = add_client_subcommand(commands, "compact", "rewrite the store compacted, so "
                                    "erased registrations leave no bytes behind", """
        Rewrites the LMDB store compacted, so that the bytes of erased registrations are no
        longer in any file: on a server (IndexAdmin.Compact; reads go on, writes pause for its
        last step), or with --data-dir on a data directory no server holds. Prints the store's
        size before and after.
        """, ["dedup compact", "dedup compact --data-dir index_data"], compact_command)
    add_offline_arguments(compact)
    _register_doctor_and_backup(commands)


def _register_doctor_and_backup(commands: Subcommands) -> None:
    doctor = add_subcommand(commands, "doctor", "check a data directory offline and report", """
        Checks an embedded data directory without a server (or read-only beside a running
        one) and prints a report: whether a server holds it, that every page of the LMDB
        store reads, that every registration has its lookups and a unit embedding, that the
        index checkpoint plus the change log give as many vectors as the store holds, the
        map's use and the free disk space, and whether it is a backup that did not finish.
        Exit status 1 when any check found a problem.
        """, ["dedup doctor index_data"], doctor_command)
    doctor.add_argument("data_dir", type=Path, metavar="DATA_DIR")

    backup = add_subcommand(commands, "backup", "a consistent copy of a data directory, also "
                            "while a server runs on it", """
        Copies a data directory into DEST, also while a server runs on it: first the index
        checkpoint, then the store (LMDB's compacting copy in one read transaction, then the
        embeddings' file up to that transaction's last registration), so the checkpoint
        never covers changes the copy lacks. A registration erased before the slots are all
        read is erased in the copy too, which is compacted if it holds erasures not
        compacted away; its checkpoint is brought up to it if it holds registrations erased
        since (or left out, where it cannot be, or would take more than the memory
        available: about three times its size). A failed backup removes what it wrote; one
        killed leaves BACKUP-NOT-FINISHED in DEST, which a server then refuses. Prints the
        registrations, change sequence and sizes copied. To restore, stop the server and
        serve the copy.
        """, ["dedup backup index_data /backups/dedup-2024-06-01"], backup_command)
    backup.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    backup.add_argument("dest", type=Path, metavar="DEST", help="a new or empty directory")


def import_command(args: argparse.Namespace) -> int:
    from dedup.ops.bulk_import import count_rows, import_offline, import_to_server

    started = time.monotonic()
    total = count_rows(args.files)  # every file checked before the data directory or server
    if args.data_dir is not None:
        gallery = open_offline_gallery(args)
        try:
            report = import_offline(gallery, args.files, Limits(), total)
        finally:
            gallery.close(checkpoint=True)
    else:
        channel, stub = open_dedup_stub(args)
        with channel:
            report = import_to_server(stub, args.files, timeout=None, total=total)
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
            gallery = open_offline_gallery(args)
            try:
                built = gallery.build_offline(args.index_factory or gallery.wanted_kind(),
                                              progress)
                kind, vectors = built.index.kind, len(built.index)
                searched = gallery.index_status().search_parameters
            finally:
                gallery.close(checkpoint=False)
        else:
            channel = open_channel(args)
            with channel:
                admin = pb_grpc.IndexAdminStub(channel)
                for update in admin.Rebuild(pb.RebuildRequest(index_factory=args.index_factory)):
                    progress(update.phase, update.done, update.total)
                kind, vectors = update.index.index_type, update.index.vectors
                searched = update.index.search_parameters
    print(f"rebuilt the index as {kind} with {vectors:,} vectors"
          + (f", searched with {searched}" if searched else ""))
    return 0


def compact_command(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        gallery = open_offline_gallery(args)
        started = time.monotonic()
        try:
            before, after = gallery.compact()
        finally:
            gallery.close(checkpoint=True)
        seconds = time.monotonic() - started
    else:
        with open_channel(args) as channel:
            reply = pb_grpc.IndexAdminStub(channel).Compact(pb.CompactRequest(),
                                                             timeout=max(args.timeout, 3600))
        before, after, seconds = reply.bytes_before, reply.bytes_after, reply.seconds
    print(f"compacted the store from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB "
          f"in {seconds:.1f} s")
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
    if report.erased_meanwhile:
        print(f"erased {report.erased_meanwhile} registration(s) in the copy: they were erased "
              "while it was taken")
    if report.checkpoint == "brought up to the copy":
        print("index checkpoint brought up to the copy: it held registrations erased since it "
              "was written")
    elif report.checkpoint == "left out":
        print("index checkpoint left out (see the warning above): a server started on the "
              "copy builds its index from the store")
    print(f"restore: stop the server, then serve --data-dir {args.dest} (or move it into place)")
    return 0
