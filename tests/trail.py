"""Reads the audit records of a stopped server's data directory straight from LMDB."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb


def records(data_dir: Path) -> list[dict]:
    env = lmdb.open(str(data_dir / "store"), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            return [json.loads(value)
                    for _, value in txn.cursor(db=env.open_db(b"audit", txn=txn))]
    finally:
        env.close()
