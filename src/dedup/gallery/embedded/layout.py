"""The files of an embedded data directory: one owner for their names."""

from __future__ import annotations

from pathlib import Path

STORE_DIR = "store"  # the LMDB environment
DATA_FILE = "data.mdb"  # LMDB's data file in it
LMDB_LOCK_FILE = "lock.mdb"  # LMDB's lock file (its reader table) beside it
VECTOR_FILE = "vectors.f32"  # the embeddings, beside LMDB's files (vector_file.py)
CHECKPOINT_FILE = "index.ckpt"  # the index checkpoint
REBUILD_FILE = "index.ckpt.rebuild"  # a live rebuild's index until it is swapped in
LOCK_FILE = "dedup.lock"  # held by the process that has the directory open for writing
FORWARD_SOCKET = "forward.sock"  # `serve --processes N`: the primary's socket for replicas
CHECK_RATES_FILE = "check-rates"  # `serve --processes N`: the desks' check rates, shared
# `serve --processes N`: the replicas' counters and histograms (prometheus-client's
# multiprocess files), which the primary's /metrics adds to its own
REPLICA_METRICS_DIR = "replica-metrics"
# `dedup backup`: in DEST from its start until it finished; a directory holding it is no
# backup (it may hold registrations erased since) and is refused.
UNFINISHED_BACKUP = "BACKUP-NOT-FINISHED"
REPLACED_FILE = "replaced.mdb"  # in the compaction's directory: the data file it replaced


def store_dir(data_dir: Path) -> Path:
    return Path(data_dir) / STORE_DIR


def compaction_dir(store_path: Path) -> Path:
    """Where a compaction writes the store anew, beside the store's directory."""
    return store_path.with_name(store_path.name + ".compacting")


def store_file(data_dir: Path) -> Path:
    """LMDB's data file: present once a store was created in `data_dir`."""
    return store_dir(data_dir) / DATA_FILE


def vector_file(data_dir: Path) -> Path:
    """The embeddings' file: present once a store of format 2 was created in `data_dir`."""
    return store_dir(data_dir) / VECTOR_FILE
