"""`dedup upgrade DATA_DIR`: a data directory's store moved to this version's format."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from dedup.cli.subcommand import Subcommands, add_subcommand


def register(commands: Subcommands) -> None:
    upgrade = add_subcommand(commands, "upgrade", "move a data directory's store to this "
                             "version's format (a server's start does it too)", """
        Upgrades the store in DATA_DIR, which no server may hold, to store format 2: the
        embeddings move out of LMDB, where each took a 4 KB page of its own, into
        store/vectors.f32 beside it (2 KB each), in batches, with a progress bar; then the
        LMDB file is rewritten without them, which gives the space back. An interrupted
        upgrade resumes where it stopped when run again, or when a server starts on the
        directory (which upgrades it the same way, logging its progress). A store already
        in format 2 is left as it is. It needs free disk for the vector file and for the
        rewritten LMDB file; back the directory up first (`dedup backup`). Prints what it did.
        """, ["dedup upgrade index_data"], upgrade_command)
    upgrade.add_argument("data_dir", type=Path, metavar="DATA_DIR")


def upgrade_command(args: argparse.Namespace) -> int:
    from dedup.gallery.embedded.data_dir import upgrade_data_dir

    with tqdm(desc="moving embeddings", unit="emb") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        made = upgrade_data_dir(args.data_dir, progress)
    if made is None:
        print(f"{args.data_dir}: the store is in format 2 already; nothing to do")
        return 0
    print(f"upgraded {args.data_dir} to store format 2 in {made.seconds:.1f} s: moved "
          f"{made.moved:,} embeddings into store/vectors.f32; store/data.mdb from "
          f"{made.store_bytes_before / 2**20:.1f} MiB to {made.store_bytes_after / 2**20:.1f} MiB")
    return 0
