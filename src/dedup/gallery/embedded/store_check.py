"""A walk over every page of an LMDB store, in a child process.

LMDB keeps no checksums and trusts its pages: a damaged page can make a reader fault
(SIGBUS, SIGSEGV) instead of returning an error. So the walk, LMDB's own compacting copy
into /dev/null, which visits every branch, leaf and overflow page, runs in a child: a fault
kills the child, and the parent reports the damage instead of dying of it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from dedup.core.errors import StoreDamaged
from dedup.gallery.embedded.layout import DATA_FILE

_WALK = """
import lmdb, os, sys
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=16, map_size=1 << 44)
used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
size = os.path.getsize(sys.argv[2])
if size < used:
    sys.exit(f"{os.path.basename(sys.argv[2])} holds {size} bytes but its pages reach {used}")
with open(os.devnull, "wb") as sink:
    env.copyfd(sink.fileno(), compact=True)
"""


def walk_store(store_dir: Path, timeout: float = 3600.0) -> None:
    """Raises StoreDamaged unless every page of the store in `store_dir` can be read."""
    if not (store_dir / DATA_FILE).exists():
        return  # a new store
    result = subprocess.run([sys.executable, "-c", _WALK, str(store_dir),
                             str(store_dir / DATA_FILE)],
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode == 0:
        return
    if result.returncode < 0:
        fault = signal.Signals(-result.returncode).name
        cause = f"reading it killed the checking process with {fault}"
    else:
        last = result.stderr.strip().splitlines()
        cause = last[-1] if last else f"the check exited with code {result.returncode}"
    raise StoreDamaged(f"{store_dir}: the store is damaged ({cause}); restore it from a backup "
                       "(see README, Backup and restore)")
