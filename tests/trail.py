"""Reads the audit records of a stopped server: from its LMDB store, or its Milvus collection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lmdb


def records(where: Any) -> list[dict]:
    """`where`: a RunningServer (either backend) or an embedded data directory."""
    config = getattr(where, "config", None)
    if config is not None and config.milvus is not None:
        return _milvus_records(config.milvus)
    return _lmdb_records(where.data_dir if config is not None else Path(where))


def _lmdb_records(data_dir: Path) -> list[dict]:
    env = lmdb.open(str(data_dir / "store"), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            return [json.loads(value)
                    for _, value in txn.cursor(db=env.open_db(b"audit", txn=txn))]
    finally:
        env.close()


def _milvus_records(config: Any) -> list[dict]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=config.uri)
    try:
        found = client.query(f"{config.prefix}_audit", filter="seq > 0", limit=16_384,
                             output_fields=["record"], consistency_level="Strong")
    finally:
        client.close()
    return sorted((json.loads(row["record"]) for row in found),
                  key=lambda record: (record["time"], record["seq"]))
