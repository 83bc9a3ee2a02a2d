"""Bytes on disk per registration: the LMDB store, the vector file and the index checkpoint.

Imports N registrations (realistic fields: an 18-character ID number, a phone number, a
carrier and a region, in random order; random unit embeddings) with `dedup import`'s own
code into a fresh data directory, BinarySign512 index, then reports the blocks each file
holds on disk
(st_blocks, so a sparse file counts only what is written) and LMDB's pages per database;
then compacts the store (the entry-by-entry rewrite) and reports again.

    .venv/bin/python benchmarks/store_size.py --registrations 200000 --label format2

Writes a table to stdout and benchmarks/results/store_size-N-LABEL.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import lmdb
import numpy as np

from dedup.core.settings import IndexConfig, Limits, StoreConfig
from dedup.face.model_pack import RECOGNISER, model_id_for, resolve_model_dir
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.ops.bulk_import import import_offline

RESULTS = Path(__file__).parent / "results"
CHUNK = 100_000
DIMENSION = 512


def write_input(out: Path, registrations: int, seed: int = 11) -> list[Path]:
    """.npy + .csv chunks of registrations with every field a carrier fills in."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    shuffled = rng.permutation(registrations)  # ID and phone numbers come in no order
    for start in range(0, registrations, CHUNK):
        path = out / f"regs-{start // CHUNK:04d}.npy"
        count = min(CHUNK, registrations - start)
        if not path.exists():
            matrix = rng.standard_normal((count, DIMENSION), dtype=np.float32)
            np.save(path, matrix / np.linalg.norm(matrix, axis=1, keepdims=True))
            with open(path.with_suffix(".csv"), "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["registration_id", "id_number", "msisdn", "carrier", "region"])
                for i in range(start, start + count):
                    person = int(shuffled[i])
                    writer.writerow([f"REG-2024-{i:09d}", f"4403001990{person:08d}",
                                     f"+86139{person:08d}", "CMCC", f"44{person % 100:02d}00"])
        files.append(path)
    return files


def disk_bytes(path: Path) -> dict[str, int]:
    if not path.exists():
        return {"apparent": 0, "allocated": 0}
    status = path.stat()
    return {"apparent": status.st_size, "allocated": status.st_blocks * 512}


def lmdb_pages(store_dir: Path) -> dict[str, dict[str, int]]:
    """Pages per named database (branch, leaf, overflow) and entries."""
    env = lmdb.open(str(store_dir), readonly=True, lock=False, max_dbs=16, map_size=1 << 40)
    try:
        found = {}
        with env.begin() as txn:
            names = [bytes(key) for key, _ in txn.cursor()]
        for name in names:
            db = env.open_db(name, create=False)
            with env.begin() as txn:
                stat = txn.stat(db)
            found[name.decode()] = {
                "entries": stat["entries"],
                "pages": stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"],
                "overflow_pages": stat["overflow_pages"]}
        info, stat = env.info(), env.stat()
        found["(environment)"] = {"entries": 0, "pages": int(info["last_pgno"]) + 1,
                                  "overflow_pages": 0, "page_size": stat["psize"]}
        return found
    finally:
        env.close()


def measure(data_dir: Path, registrations: int) -> dict[str, object]:
    files = {name: disk_bytes(data_dir / name)
             for name in ("store/data.mdb", "store/vectors.f32", "index.ckpt")}
    total = sum(entry["allocated"] for entry in files.values())
    return {"files": files, "allocated_total": total,
            "bytes_per_registration": total / registrations,
            "lmdb": lmdb_pages(data_dir / "store")}


def open_gallery(data_dir: Path) -> EmbeddedGallery:
    model = model_id_for(resolve_model_dir(None) / RECOGNISER)
    return EmbeddedGallery(StoreConfig(data_dir=data_dir), model, IndexConfig("BinarySign512"),
                           background=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=200_000)
    parser.add_argument("--label", default="current", help="names the result file")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dedup-store-size"))
    args = parser.parse_args()

    files = write_input(args.workdir / f"input-{args.registrations}", args.registrations)
    data_dir = args.workdir / f"data-{args.label}"
    shutil.rmtree(data_dir, ignore_errors=True)
    gallery = open_gallery(data_dir)
    started = time.monotonic()
    report = import_offline(gallery, files, Limits())
    imported_s = time.monotonic() - started
    gallery.close(checkpoint=True)
    assert report.imported == args.registrations, report.summary()
    result: dict[str, object] = {"registrations": args.registrations, "label": args.label,
                                 "import_seconds": imported_s,
                                 "imported": measure(data_dir, args.registrations)}
    gallery = open_gallery(data_dir)
    started = time.monotonic()
    gallery.compact()
    result["compact_seconds"] = time.monotonic() - started
    gallery.close(checkpoint=True)
    result["compacted"] = measure(data_dir, args.registrations)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"store_size-{args.registrations}-{args.label}.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\nwrote {out}")


def print_table(result: dict[str, object]) -> None:
    count = int(result["registrations"])  # type: ignore[call-overload]
    print(f"\n{count:,} registrations ({result['label']}), bytes on disk per registration\n")
    print("| file | as imported | after compaction |")
    print("|---|---|---|")
    imported, compacted = result["imported"], result["compacted"]
    for name in imported["files"]:  # type: ignore[index]
        before = imported["files"][name]["allocated"] / count  # type: ignore[index]
        after = compacted["files"][name]["allocated"] / count  # type: ignore[index]
        print(f"| {name} | {before:,.0f} | {after:,.0f} |")
    print(f"| **total** | **{imported['bytes_per_registration']:,.0f}** | "  # type: ignore[index]
          f"**{compacted['bytes_per_registration']:,.0f}** |")  # type: ignore[index]
    print("\nLMDB pages per database (4 KB each) per 1,000 registrations, as imported / compacted:")
    for name, stat in imported["lmdb"].items():  # type: ignore[index]
        after = compacted["lmdb"].get(name, {"pages": 0})  # type: ignore[index]
        print(f"  {name:<20} {1000 * stat['pages'] / count:8.1f} / "
              f"{1000 * after['pages'] / count:8.1f}  ({stat['entries']:,} entries)")


if __name__ == "__main__":
    main()
