"""`dedup doctor`: an offline check of a data directory, printed as a report."""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dedup.core.errors import CheckpointError, StoreError
from dedup.core.files import open_private, path_mode, shared_dir_mode
from dedup.core.settings import GIB
from dedup.gallery.embedded.checkpoint import checkpoint_model_id
from dedup.gallery.embedded.index import load_index
from dedup.gallery.embedded.layout import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    UNFINISHED_BACKUP,
    compaction_dir,
    store_dir,
    store_file,
)
from dedup.gallery.embedded.replay import replay_changes
from dedup.gallery.embedded.store import Store
from dedup.gallery.embedded.store_check import walk_store


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warning" or "problem"
    check: str
    detail: str


Check = Callable[[], Finding]


def examine(data_dir: Path) -> list[Finding]:
    """Runs every check that applies; a damaged store stops the checks that need it."""
    if not store_file(data_dir).exists():
        return [Finding("problem", "store", f"no LMDB store under {store_dir(data_dir)}")]
    held = _held(data_dir)
    findings = [_server_lock(held), *_unfinished_compaction(data_dir, held),
                *_unfinished_backup(data_dir), _access(data_dir), _pages(data_dir)]
    if findings[-1].level == "problem":
        return findings
    try:
        store = Store.reader(data_dir)
    except StoreError as error:
        return [*findings, Finding("problem", "store", str(error))]
    try:
        if store.legacy_format:
            findings += [_records(store), _legacy(data_dir), _map(store), _disk(store)]
        else:
            findings += [_records(store), _vectors(store), *_index(store, data_dir),
                         _map(store), _disk(store)]
    finally:
        store.close()
    return findings


def _server_lock(held: bool) -> Finding:
    if held:
        return Finding("ok", "server", "a dedup server holds this directory; checked "
                       "read-only beside it (its latest writes may not be in the checkpoint)")
    return Finding("ok", "server", "no process holds this directory")


def _held(data_dir: Path) -> bool:
    with open_private(data_dir / LOCK_FILE, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _unfinished_backup(data_dir: Path) -> list[Finding]:
    if not (data_dir / UNFINISHED_BACKUP).exists():
        return []
    return [Finding("problem", "backup", f"{data_dir} is a backup that did not finish "
                    "(killed?): it may hold registrations erased since; a server refuses it. "
                    "Remove it and back up again")]


def _unfinished_compaction(data_dir: Path, held: bool) -> list[Finding]:
    staging = compaction_dir(store_dir(data_dir))
    if not staging.exists() or held:  # held: maybe a compaction running now
        return []
    return [Finding("warning", "compaction", f"{staging} was left by a compaction that did not "
                    "finish; it may hold erased registrations' bytes: the server removes it "
                    "when it next opens the directory")]


def _access(data_dir: Path) -> Finding:
    mode = shared_dir_mode(data_dir)
    if mode is not None:
        return Finding("problem", "access", f"mode {mode:04o}: other users can read the "
                       f"registrations; the server refuses it: run `chmod 700 {data_dir}`")
    return Finding("ok", "access", f"mode {path_mode(data_dir):04o}: only its owner can "
                   "read the registrations")


def _pages(data_dir: Path) -> Finding:
    try:
        walk_store(store_dir(data_dir))
    except StoreError as error:
        return Finding("problem", "store pages", str(error))
    size = store_file(data_dir).stat().st_size
    return Finding("ok", "store pages", f"every page of data.mdb ({size / GIB:.2f} GiB) reads")


def _records(store: Store) -> Finding:
    total = store.count()
    with tqdm(total=total, desc="checking records", unit="reg", leave=False) as bar:
        problems = store.verify(lambda done: bar.update(done))
    if problems:
        return Finding("problem", "records", "; ".join(problems))
    return Finding("ok", "records", f"{total} registrations, each with its lookups; "
                   f"{store.distinct_id_numbers()} ID numbers; change sequence "
                   f"{store.sequence()}")


def _vectors(store: Store) -> Finding:
    with tqdm(total=store.assigned(), desc="checking embeddings", unit="slot",
              leave=False) as bar:
        check = store.check_vectors(lambda done: bar.update(done))
    if check.problems:
        return Finding("problem", "vectors", "; ".join(check.problems))
    _, on_disk = store.vector_file_bytes()
    erased = check.slots - check.stored
    detail = (f"{store.vector_path.name} ({on_disk / GIB:.2f} GiB on disk): {check.stored} "
              f"registrations' embeddings, each a unit vector; {erased} erased ones' slots")
    if check.unzeroed:
        return Finding("warning", "vectors", detail + f", of them {len(check.unzeroed)} not "
                       "zeros yet (a Delete under way, or a crash before it zeroed them: the "
                       "server zeroes them when it next opens the directory)")
    return Finding("ok", "vectors", detail + ", all zeros")


def _legacy(data_dir: Path) -> Finding:
    return Finding("warning", "vectors", "store format 1: the embeddings are still in LMDB, a "
                   "4 KB page each; the server moves them into store/vectors.f32 when it "
                   f"starts, or run `dedup upgrade {data_dir}`; they are checked after that")


def _index(store: Store, data_dir: Path) -> list[Finding]:
    path = data_dir / CHECKPOINT_FILE
    if not path.exists():
        return [Finding("warning", "checkpoint", f"no {path.name}: the server builds the index "
                        "from the store at start")]
    try:
        # The header alone first: the whole file is read once, by load_index (at 10,000,000
        # reading it here too held a third copy, ~0.4 GB, beside the file and the index).
        model_id = checkpoint_model_id(path)
        index, covered = load_index(path, store.config.dimension, model_id)
    except CheckpointError as error:
        return [Finding("problem", "checkpoint", f"{error}; the server rebuilds the index from "
                        "the store at its next start")]
    behind = store.sequence() - covered
    found = [Finding("ok" if behind >= 0 else "problem", "checkpoint",
                     f"{index.kind} index of {len(index)} vectors of model "
                     f"{model_id}, covers change {covered}, "
                     f"{behind} change(s) behind the store")]
    delta = replay_changes(store, index, covered, model_id)
    expected = store.model_counts().get(model_id, 0)
    if delta is None:
        found.append(Finding("problem", "index", "the change log no longer reaches back to the "
                             "checkpoint: the server rebuilds the index at its next start"))
    elif len(index) != expected:
        found.append(Finding("problem", "index", f"checkpoint + change log give {len(index)} "
                             f"vectors, the store holds {expected} of model {model_id}: "
                             "the server rebuilds the index at its next start"))
    else:
        found.append(Finding("ok", "index", f"checkpoint + {behind} logged change(s) = "
                             f"{len(index)} vectors, as many as the store holds"))
    return found


def _map(store: Store) -> Finding:
    usage, cap = store.usage(), store.config.max_map_size
    detail = (f"{usage.used_bytes / GIB:.2f} GiB used of a {usage.map_bytes / GIB:.2f} GiB map "
              f"(grows by itself up to {cap / GIB:.0f} GiB)")
    return Finding("warning" if usage.used_bytes > 0.9 * cap else "ok", "map", detail)


def _disk(store: Store) -> Finding:
    free = shutil.disk_usage(store.path).free
    file_bytes = store.usage().file_bytes + store.vector_file_bytes()[1]
    detail = f"{free / GIB:.1f} GiB free beside a {file_bytes / GIB:.2f} GiB store"
    if free < max(GIB, file_bytes // 10):
        return Finding("problem", "disk", detail + ": writes will soon fail")
    if free < file_bytes:
        return Finding("warning", "disk", detail + ": too little for a backup or compaction")
    return Finding("ok", "disk", detail)


def run_doctor(data_dir: Path) -> int:
    """Prints the report; returns 1 if any check found a problem."""
    findings = examine(data_dir)
    print(f"dedup doctor: {data_dir.resolve()}")
    for finding in findings:
        print(f"  {finding.level:<8} {finding.check:<12} {finding.detail}")
    problems = sum(finding.level == "problem" for finding in findings)
    warnings = sum(finding.level == "warning" for finding in findings)
    print(f"{problems} problem(s), {warnings} warning(s)")
    return 1 if problems else 0
