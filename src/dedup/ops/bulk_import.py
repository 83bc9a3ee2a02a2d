"""`dedup import`: registrations with embeddings from .npy + CSV files.

Each `X.npy` (N x 512 float32) goes with `X.csv` (N rows: registration_id, id_number and
optionally msisdn, carrier, region), row i with row i. Into a data directory no server holds
(one LMDB transaction per batch), or into a running server (EnrollStream). Rows whose
registration_id is already enrolled are skipped, so an interrupted import is resumed by
running it again; rows that fail validation or collide are reported, never half-stored.

Offline, the import leaves the index type the gallery wants at its new size ("auto": see
index_plan.kind_for), so that a server started on the directory serves it at once instead of
an exact index it would have to rebuild. A type without training is switched to before the
rows are added (an exact in-memory index of every imported vector would take 2 KB each); one
that needs training is built at the end from the store, and the rows are stored meanwhile
without being indexed (an interim BinarySign512 of every row grew ~220 B a registration).
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core import validation
from dedup.core.errors import DedupError
from dedup.core.records import Registration
from dedup.core.settings import Limits
from dedup.core.vectors import MIN_NORM, Vector, unit_vector
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index import BINARY_DEFAULT, FLAT, training_size
from dedup.gallery.embedded.index_plan import kind_for

BATCH = 10_000
COLUMNS = ("registration_id", "id_number", "msisdn", "carrier", "region")


@dataclass
class ImportReport:
    imported: int = 0
    already_enrolled: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    # Offline: the index type the data directory's checkpoint holds, and the one wanted.
    index_kind: str = ""
    wanted_kind: str = ""
    store_bytes: tuple[int, int] | None = None  # offline: data.mdb before and after compaction

    def summary(self) -> str:
        lines = [f"imported {self.imported:,}, already enrolled {self.already_enrolled:,}, "
                 f"rejected {sum(self.rejected.values()):,}"]
        lines += [f"  rejected {count:,} x {reason}" for reason, count in
                  self.rejected.most_common(20)]
        if self.store_bytes:
            lines.append(f"store compacted from {self.store_bytes[0]:,} to "
                         f"{self.store_bytes[1]:,} bytes")
        if self.index_kind:
            lines.append(f"index: {self.index_kind}" + (
                "" if self.index_kind == self.wanted_kind else
                f" ({self.wanted_kind} needs more registrations to train)"))
        return "\n".join(lines)


@dataclass(frozen=True)
class Row:
    line: int
    registration: pb.Registration
    values: np.ndarray


def rows_of(npy: Path) -> Iterator[Row]:
    """`npy`'s registrations, row i of its CSV with embedding i. (count_rows checks that the
    two agree before anything is stored; checked here again, should a file change since.)"""
    vectors, table = _embeddings(npy), _table_of(npy)
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        _check_columns(table, reader.fieldnames)
        count = -1
        for count, record in enumerate(reader):
            if count >= len(vectors):
                raise ValueError(f"{table}: more rows than {npy.name} has embeddings "
                                 f"({len(vectors)})")
            value = {name: (record.get(name) or "").strip() for name in COLUMNS}
            registration = pb.Registration(
                registration_id=value["registration_id"], id_number=value["id_number"],
                msisdn=value["msisdn"], carrier=value["carrier"], region=value["region"])
            yield Row(count + 2, registration, vectors[count])
        if count + 1 < len(vectors):
            raise ValueError(f"{table}: {count + 1} rows for {len(vectors)} embeddings")


def count_rows(files: list[Path]) -> int:
    """The registrations in `files`, every file checked before any row is stored: its CSV
    beside it, with the columns needed and as many rows as the .npy has embeddings. (Row i
    goes with embedding i: a row missing or added halfway would store everyone after it
    under another person's face, and a rerun would skip them as already enrolled.)"""
    return sum(_checked_rows(npy) for npy in files)


def _checked_rows(npy: Path) -> int:
    vectors, table = _embeddings(npy), _table_of(npy)
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            _check_columns(table, next(reader, None))
            rows = sum(1 for row in reader if row)  # blank lines, as DictReader skips them
        except csv.Error as error:
            raise ValueError(f"{table}, line {reader.line_num}: not CSV ({error}): nothing "
                             "imported") from error
    if rows != len(vectors):
        raise ValueError(f"{table}: {rows:,} rows for the {len(vectors):,} embeddings of "
                         f"{npy.name} (row i goes with embedding i): nothing imported")
    return rows


def _embeddings(npy: Path) -> np.ndarray:
    vectors: np.ndarray = np.load(npy, mmap_mode="r", allow_pickle=False)
    if vectors.ndim != 2:
        raise ValueError(f"{npy}: expected a 2-d array of embeddings, got shape {vectors.shape}")
    return vectors


def _table_of(npy: Path) -> Path:
    table = npy.with_suffix(".csv")
    if not table.exists():
        raise ValueError(f"{npy}: no {table.name} beside it with the registrations")
    return table


def _check_columns(table: Path, header: Sequence[str] | None) -> None:
    missing = [c for c in COLUMNS[:2] if c not in (header or [])]
    if missing:
        raise ValueError(f"{table}: lacks the column(s) {', '.join(missing)}")


def unit_rows(block: np.ndarray, dimension: int) -> tuple[np.ndarray, list[str | None]]:
    """A block of embeddings normalised at once, and per row None or why it is refused.

    The same rules as `unit_vector`, applied with whole-array operations: the import's
    hot loop stays out of Python.
    """
    rows = np.asarray(block, dtype=np.float32)
    if rows.shape[1] != dimension:
        return rows, [f"embedding: expected {dimension} values, got {rows.shape[1]}"] * len(rows)
    finite = np.asarray(np.isfinite(rows).all(axis=1), dtype=bool)
    norms = np.linalg.norm(np.where(finite[:, None], rows, 0).astype(np.float64), axis=1)
    problems: list[str | None] = [None] * len(rows)
    for i in np.flatnonzero(~finite | (norms < MIN_NORM)):
        try:
            unit_vector(rows[i], dimension, "embedding")  # words the error like everywhere
        except DedupError as error:
            problems[i] = str(error)
    units = (rows / np.maximum(norms, MIN_NORM)[:, None]).astype(np.float32)
    return units, problems


def import_offline(gallery: EmbeddedGallery, files: list[Path], limits: Limits,
                   total: int | None = None) -> ImportReport:
    """`total`: count_rows(files), if the caller checked them already."""
    total = count_rows(files) if total is None else total  # every file checked first
    report = ImportReport()
    dimension = gallery.config.dimension
    if _index_before(gallery, gallery.comparable_count() + total):
        gallery.defer_indexing()
    with tqdm(total=total, desc="importing", unit="reg") as progress:
        for npy in files:
            rows = rows_of(npy)
            while chunk := list(itertools.islice(rows, BATCH)):
                units, problems = unit_rows(np.vstack([row.values for row in chunk]), dimension)
                batch: list[tuple[Registration, Vector]] = []
                for row, unit, problem in zip(chunk, units, problems, strict=True):
                    if problem is not None:
                        report.rejected[problem] += 1
                        continue
                    try:
                        registration = _validated(row.registration, limits)
                    except DedupError as error:
                        report.rejected[str(error)] += 1
                        continue
                    batch.append((registration, unit))
                _store_batch(gallery, batch, report)
                progress.update(len(chunk))
    report.index_kind, report.wanted_kind = _index_after(gallery), gallery.wanted_kind()
    if report.imported:
        # Each batch's transaction rewrites most pages of the lookups; LMDB keeps the freed
        # ones in the file (about a tenth of the store): a compaction hands them back.
        report.store_bytes = gallery.compact()
    return report


def _index_before(gallery: EmbeddedGallery, expected: int) -> bool:
    """Switches to the index type wanted at `expected` registrations before adding them;
    where that type needs training, keeps the current one until the end (an exact Flat
    becomes a BinarySign512). True when the import
    will end by building another type from the store: then the rows need not be indexed
    meanwhile (at 10,000,000 the interim BinarySign512 grew ~220 bytes a registration)."""
    current = gallery.index.kind
    config = gallery.index_config
    wanted = kind_for(gallery.configured_kind, expected, config.auto_threshold,
                      config.auto_lists_threshold)
    interim = wanted
    if training_size(wanted, gallery.dimension):
        interim = BINARY_DEFAULT if current == FLAT else current
    if interim != current:
        gallery.build_offline(interim, lambda *_: None)
    return interim != wanted and training_size(wanted, gallery.dimension) <= expected


def _index_after(gallery: EmbeddedGallery) -> str:
    """Builds the wanted index type if the import ends on another and it can be trained (or
    else the interim type again, if the rows were stored without being indexed); returns the
    type the gallery now holds."""
    wanted = gallery.wanted_kind()
    if training_size(wanted, gallery.dimension) > gallery.comparable_count():
        wanted = gallery.index.kind
    if wanted != gallery.index.kind or gallery.indexing_deferred:
        with tqdm(desc=f"building the {wanted} index", unit="reg") as bar:
            def progress(phase: str, done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            gallery.build_offline(wanted, progress)
    return gallery.index.kind


def _validated(message: pb.Registration, limits: Limits) -> Registration:
    return validation.registration(message.registration_id, message.id_number, message.msisdn,
                                   message.carrier, message.region, limits)


def _store_batch(gallery: EmbeddedGallery, batch: list[tuple[Registration, Vector]],
                 report: ImportReport) -> None:
    fresh: list[tuple[Registration, Vector]] = []
    seen_ids: set[str] = set()
    seen_msisdns: set[str] = set()
    for registration, vector in batch:
        if gallery.is_enrolled(registration.registration_id) or \
                registration.registration_id in seen_ids:
            report.already_enrolled += 1
            continue
        if registration.msisdn and (registration.msisdn in seen_msisdns
                                    or gallery.msisdn_taken(registration.msisdn)):
            report.rejected["registration.msisdn: held by another registration"] += 1
            continue
        seen_ids.add(registration.registration_id)
        if registration.msisdn:
            seen_msisdns.add(registration.msisdn)
        fresh.append((registration, vector))
    if fresh:
        gallery.insert_many(fresh)
        report.imported += len(fresh)


def import_to_server(stub: pb_grpc.FaceDedupStub, files: list[Path], timeout: float | None,
                     total: int | None = None) -> ImportReport:
    """`total`: count_rows(files), if the caller checked them already."""
    total = count_rows(files) if total is None else total  # every file checked first
    report = ImportReport()

    def requests() -> Iterator[pb.EnrollRequest]:
        for npy in files:
            for row in rows_of(npy):
                yield pb.EnrollRequest(registration=row.registration, face=pb.Face(
                    embedding=pb.Embedding(values=np.asarray(row.values, np.float32).tolist())))

    with tqdm(total=total, desc="importing", unit="reg") as progress:
        for response in stub.EnrollStream(requests(), timeout=timeout):
            if response.enrolled:
                report.imported += 1
            elif response.error.code == grpc.StatusCode.ALREADY_EXISTS.name and \
                    "registration_id" in response.error.message:
                report.already_enrolled += 1
            else:
                report.rejected[f"{response.error.code}: {response.error.message}"] += 1
            progress.update(1)
    return report
