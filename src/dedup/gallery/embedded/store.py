"""The LMDB store: the durable source of truth.

Named databases in one environment (`<data_dir>/store/`):
    meta                 format, dimension, next key, change sequence, distinct ID numbers,
                         registrations per embedding model ("model:<model_id>")
    records              key -> registration fields (JSON)
    vectors              key -> unit embedding (float32 bytes)
    by_registration_id   registration_id -> key
    by_id_number         id_number -> key (sorted duplicates: one ID number, many keys)
    by_msisdn            msisdn -> key
    changes              sequence -> (op, key): the log the index replays after a checkpoint

Every change is one transaction committed with sync on, so an acknowledged write is on
disk. Keys are int64, assigned in increasing order and never reused.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np
import numpy.typing as npt

from dedup.core.audit_chain import GENESIS, AuditMaker
from dedup.core.errors import (
    ResourceExhausted,
    StoreDamaged,
    StoreError,
    msisdn_taken,
    registration_id_taken,
)
from dedup.core.records import DeleteKey, Registration, StoredFace
from dedup.core.rwlock import ReadWriteLock
from dedup.core.settings import StoreConfig
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.embedded.checkpoint import fsync_directory
from dedup.gallery.embedded.layout import DATA_FILE, store_dir

log = logging.getLogger("dedup.store")

FORMAT = 1
OP_ADD = b"A"
OP_REMOVE = b"R"

_U64 = struct.Struct(">Q")
_MODEL_PREFIX = b"model:"
_T = TypeVar("_T")


def _u64(value: int) -> bytes:
    return _U64.pack(value)


def _from_u64(raw: bytes | memoryview | None) -> int:
    if raw is None:
        raise StoreError("the store is damaged: a metadata or index entry is missing")
    return int(_U64.unpack(raw)[0])




@dataclass(frozen=True)
class StoreUsage:
    map_bytes: int  # the LMDB map's current size
    used_bytes: int  # pages in use, up to the last one written
    file_bytes: int  # data.mdb's size on disk


def _usage_of(env: lmdb.Environment, file_bytes: int) -> StoreUsage:
    info, page_size = env.info(), env.stat()["psize"]
    return StoreUsage(map_bytes=int(info["map_size"]),
                      used_bytes=(int(info["last_pgno"]) + 1) * int(page_size),
                      file_bytes=file_bytes)


@dataclass(frozen=True)
class Change:
    sequence: int
    op: bytes
    key: int


class Store:
    """Registrations and their embeddings in LMDB, with secondary lookups and a change log."""

    def __init__(self, config: StoreConfig, readonly: bool = False) -> None:
        self.config = config
        self.readonly = readonly
        self.path = store_dir(config.data_dir)
        # Every transaction runs under `reading`; growing the map takes `writing`, since
        # LMDB allows a resize only while this process has no transaction open.
        self._resize = ReadWriteLock()
        self._env = self._open_environment()
        self._dbs = self._open_dbs()
        if not readonly:
            self._initialise_meta()

    @classmethod
    def reader(cls, data_dir: Path) -> Store:
        """Read-only, beside a running server if need be (the tools: doctor, backup, audit)."""
        return cls(StoreConfig(data_dir=data_dir, check_on_open=False), readonly=True)

    def _open_dbs(self) -> dict[str, Any]:
        try:
            dbs = {
                name: self._env.open_db(name.encode(), dupsort=(name == "by_id_number"),
                                        dupfixed=(name == "by_id_number"),
                                        create=not self.readonly)
                for name in ("meta", "records", "vectors", "by_registration_id", "by_id_number",
                             "by_msisdn", "changes")
            }
            dbs["audit"] = self._open_optional_db(b"audit")
            dbs["adjudications"] = self._open_optional_db(b"adjudications")
            return dbs
        except _DAMAGE as error:
            self._env.close()
            raise self._damaged(error) from error

    # -- opening ---------------------------------------------------------------------

    def _open_environment(self) -> lmdb.Environment:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"{self.path}: cannot create the store directory ({error})") from error
        map_size = max(self.config.initial_map_size, self._existing_size())
        try:
            env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=16, max_readers=self.config.max_readers,
                sync=True, metasync=True, lock=True, readahead=False, readonly=self.readonly,
                create=not self.readonly,
            )
        except lmdb.Error as error:
            raise StoreError(f"{self.path}: cannot open the LMDB store ({error})") from error
        stale = env.reader_check()
        if stale:
            log.warning("cleared %d stale LMDB reader slot(s) left by a dead process", stale)
        self._refuse_truncated(env)
        return env

    def _open_optional_db(self, name: bytes) -> Any:
        try:
            return self._env.open_db(name, create=not self.readonly)
        except lmdb.NotFoundError:
            return None  # read-only, and nothing was ever written to it

    def _refuse_truncated(self, env: lmdb.Environment) -> None:
        # Pages past the end of a truncated file are mapped but unbacked: touching one is a
        # SIGBUS, not an error, so a short file is refused before any page is read.
        usage = _usage_of(env, self._existing_size())
        if usage.file_bytes < usage.used_bytes:
            env.close()
            raise StoreError(
                f"{self.path}: the store is damaged: data.mdb holds {usage.file_bytes} bytes "
                f"but its pages reach {usage.used_bytes}; restore it from a backup")

    def _existing_size(self) -> int:
        data_file = self.path / DATA_FILE
        return data_file.stat().st_size if data_file.exists() else 0

    def _initialise_meta(self) -> None:
        def initialise(txn: lmdb.Transaction) -> None:
            meta = self._dbs["meta"]
            stored_format = txn.get(b"format", db=meta)
            if stored_format is None:
                txn.put(b"format", _u64(FORMAT), db=meta)
                txn.put(b"dimension", _u64(self.config.dimension), db=meta)
                txn.put(b"next_key", _u64(1), db=meta)
                txn.put(b"sequence", _u64(0), db=meta)
                txn.put(b"distinct_id_numbers", _u64(0), db=meta)
                return
            if _from_u64(stored_format) != FORMAT:
                raise StoreError(
                    f"{self.path}: store format {_from_u64(stored_format)}, "
                    f"this dedup reads {FORMAT}"
                )
            dimension = _from_u64(txn.get(b"dimension", db=meta))
            if dimension != self.config.dimension:
                raise StoreError(
                    f"{self.path}: holds {dimension}-d embeddings, server configured for "
                    f"{self.config.dimension}"
                )

        try:
            self._write(initialise)
        except lmdb.Error as error:
            raise StoreError(f"{self.path}: the store is damaged ({error})") from error

    def verify(self, progress: Callable[[int], object] = lambda done: None) -> list[str]:
        """Reads every record and vector in one snapshot; returns what is inconsistent."""
        return self._read(lambda txn: _verify(self, txn, progress))

    def erased_since(self) -> float | None:
        """When the first erasure not yet compacted away was made (Unix time), if any."""
        raw = self._read(lambda txn: txn.get(b"erased_since", db=self._dbs["meta"]))
        return None if raw is None else float(struct.unpack(">d", raw)[0])

    def compact(self) -> tuple[int, int]:
        """Rewrites the store entry by entry into a new file (fsynced, renamed over the old).

        Not LMDB's compacting copy: that copies whole pages, and a page's free space still
        holds bytes of entries deleted from it (ID numbers, say). New pages start zeroed, so
        after this no byte of an erased registration is left in data.mdb. Every transaction
        waits meanwhile. Returns the file's size before and after.
        """
        before = self._existing_size()
        staging = self.path.with_name(self.path.name + ".compacting")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with self._resize.writing():
            try:
                self._rewrite_into(staging)
            except _DAMAGE as error:
                shutil.rmtree(staging, ignore_errors=True)
                raise self._damaged(error) from error
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._env.close()
            try:
                os.replace(staging / DATA_FILE, self.path / DATA_FILE)
                fsync_directory(self.path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                self._env = self._open_environment()
                self._dbs = self._open_dbs()
        after = self._existing_size()
        log.info("compacted the store from %d to %d bytes", before, after)
        return before, after

    def _rewrite_into(self, staging: Path) -> None:
        target = lmdb.open(str(staging), map_size=int(self._env.info()["map_size"]),
                           max_dbs=16, sync=False, metasync=False, lock=False)
        try:
            with self._env.begin(write=False) as source:
                for name, db in self._dbs.items():
                    if db is not None:
                        _copy_entries(source, db, target, name)
            # The copy holds no freed pages: no erasure awaits compaction in it. (Cleared here,
            # under the same lock as the copy, so an erasure right after it is not forgotten.)
            with target.begin(write=True, db=target.open_db(b"meta")) as txn:
                txn.delete(b"erased_since")
            target.sync(True)
        finally:
            target.close()
        with open(staging / DATA_FILE, "rb") as written:
            os.fsync(written.fileno())

    def copy_to(self, directory: Path) -> None:
        """LMDB's compacting copy, consistent as of one read transaction; fsynced."""
        with self._resize.reading():
            try:
                self._env.copy(str(directory), compact=True)
            except _DAMAGE as error:
                raise self._damaged(error) from error
        with open(directory / DATA_FILE, "rb") as copied:
            os.fsync(copied.fileno())

    def usage(self) -> StoreUsage:
        with self._resize.reading():
            return _usage_of(self._env, self._existing_size())

    def close(self) -> None:
        with self._resize.writing():
            self._env.close()

    # -- transactions ----------------------------------------------------------------

    def _read(self, work: Callable[[lmdb.Transaction], _T]) -> _T:
        try:
            with self._resize.reading(), self._env.begin(write=False) as txn:
                return work(txn)
        except _DAMAGE as error:
            raise self._damaged(error) from error

    def _damaged(self, error: lmdb.Error) -> StoreDamaged:
        log.error("LMDB reports damage in %s: %s", self.path, error)
        return StoreDamaged(f"{self.path}: the store is damaged ({error}); restore it from a "
                            "backup (run `dedup doctor` for a full check)")

    def _write(self, work: Callable[[lmdb.Transaction], _T]) -> _T:
        """Runs `work` in one write transaction, committed durably; grows a full map."""
        while True:
            try:
                with self._resize.reading(), self._env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._grow_map()
            except _DAMAGE as error:
                raise self._damaged(error) from error
            except lmdb.Error as error:
                if _is_disk_full(error):
                    raise ResourceExhausted(f"store: the disk is full ({error})") from error
                raise

    def _grow_map(self) -> None:
        with self._resize.writing():
            current = int(self._env.info()["map_size"])
            if current >= self.config.max_map_size:
                raise ResourceExhausted(
                    f"store: the LMDB map is at its cap of {self.config.max_map_size} bytes"
                )
            grown = min(current * 2, self.config.max_map_size)
            self._env.set_mapsize(grown)
            log.info("grew the LMDB map from %d to %d bytes", current, grown)

    # -- writes ----------------------------------------------------------------------

    def insert(self, registration: Registration, vector: Vector) -> StoredFace:
        """Stores a registration; AlreadyExists if its registration_id or msisdn is taken."""
        return self._write(lambda txn: self._insert(txn, registration, vector))

    def insert_many(self, batch: list[tuple[Registration, Vector]]) -> list[StoredFace]:
        """Stores a batch in one transaction: all of it, or (on any conflict) none of it."""
        return self._write(lambda txn: [self._insert(txn, r, v) for r, v in batch])

    def _insert(self, txn: lmdb.Transaction, registration: Registration, vector: Vector
                ) -> StoredFace:
        self._ensure_unique(txn, registration)
        meta = self._dbs["meta"]
        key = _from_u64(txn.get(b"next_key", db=meta))
        txn.put(b"next_key", _u64(key + 1), db=meta)
        stored = Registration(
            registration_id=registration.registration_id,
            id_number=registration.id_number,
            msisdn=registration.msisdn,
            carrier=registration.carrier,
            region=registration.region,
            enrolled_at_us=time.time_ns() // 1000,
            embedding_model=registration.embedding_model,
        )
        packed = _u64(key)
        id_number = stored.id_number.encode()
        if txn.get(id_number, db=self._dbs["by_id_number"]) is None:
            self._bump(txn, b"distinct_id_numbers", +1)
        self._bump(txn, _model_key(stored.embedding_model), +1)
        txn.put(packed, _encode_registration(stored), db=self._dbs["records"])
        txn.put(packed, np.ascontiguousarray(vector, np.float32).tobytes(),
                db=self._dbs["vectors"])
        txn.put(stored.registration_id.encode(), packed, db=self._dbs["by_registration_id"])
        txn.put(id_number, packed, db=self._dbs["by_id_number"])
        if stored.msisdn:
            txn.put(stored.msisdn.encode(), packed, db=self._dbs["by_msisdn"])
        self._log_change(txn, OP_ADD, key)
        return StoredFace(key, stored, vector)

    def ensure_unique(self, registration: Registration) -> None:
        """AlreadyExists if the registration_id or msisdn is taken (checked again on insert)."""
        self._read(lambda txn: self._ensure_unique(txn, registration))

    def _ensure_unique(self, txn: lmdb.Transaction, registration: Registration) -> None:
        if txn.get(registration.registration_id.encode(), db=self._dbs["by_registration_id"]):
            raise registration_id_taken(registration.registration_id)
        if registration.msisdn and txn.get(registration.msisdn.encode(), db=self._dbs["by_msisdn"]):
            raise msisdn_taken(registration.msisdn)

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None
               ) -> tuple[list[StoredFace], bytes | None]:
        """Deletes every registration under one key, and appends the audit record `audit`
        makes for them in the same transaction: both commit, or neither does.

        Returns what was deleted and the audit record's hash (None without `audit`, or when
        nothing was deleted).
        """
        def delete(txn: lmdb.Transaction) -> tuple[list[StoredFace], bytes | None]:
            deleted = []
            for key in self._keys_for(txn, by, value):
                face = self._load(txn, key, with_vector=False)
                if face is not None:
                    self._delete_one(txn, face)
                    deleted.append(face)
            meta = self._dbs["meta"]
            if deleted and txn.get(b"erased_since", db=meta) is None:
                # Compaction will overwrite the freed pages; until then they hold old bytes.
                txn.put(b"erased_since", struct.pack(">d", time.time()), db=meta)
            if audit is None or not deleted:
                return deleted, None
            ids = [face.registration.registration_id for face in deleted]
            return deleted, self._append_audit(txn, lambda seq, prev: audit(seq, prev, ids))

        return self._write(delete)

    def _delete_one(self, txn: lmdb.Transaction, face: StoredFace) -> None:
        packed = _u64(face.key)
        registration = face.registration
        id_number = registration.id_number.encode()
        txn.delete(packed, db=self._dbs["records"])
        txn.delete(packed, db=self._dbs["vectors"])
        txn.delete(registration.registration_id.encode(), db=self._dbs["by_registration_id"])
        txn.delete(id_number, packed, db=self._dbs["by_id_number"])
        if txn.get(id_number, db=self._dbs["by_id_number"]) is None:
            self._bump(txn, b"distinct_id_numbers", -1)
        self._bump(txn, _model_key(registration.embedding_model), -1)
        if registration.msisdn:
            txn.delete(registration.msisdn.encode(), db=self._dbs["by_msisdn"])
        self._log_change(txn, OP_REMOVE, face.key)

    def _bump(self, txn: lmdb.Transaction, name: bytes, delta: int) -> None:
        meta = self._dbs["meta"]
        value = _from_u64(txn.get(name, db=meta, default=_u64(0))) + delta
        if value:
            txn.put(name, _u64(value), db=meta)
        else:
            txn.delete(name, db=meta)

    def _log_change(self, txn: lmdb.Transaction, op: bytes, key: int) -> None:
        meta = self._dbs["meta"]
        sequence = _from_u64(txn.get(b"sequence", db=meta)) + 1
        txn.put(b"sequence", _u64(sequence), db=meta)
        txn.put(_u64(sequence), op + _u64(key), db=self._dbs["changes"])

    def truncate_changes(self, through: int) -> int:
        """Drops change-log entries up to and including `through` (a checkpoint covers them)."""
        def truncate(txn: lmdb.Transaction) -> int:
            removed = 0
            cursor = txn.cursor(db=self._dbs["changes"])
            while cursor.first() and _from_u64(cursor.key()) <= through:
                cursor.delete()
                removed += 1
            return removed

        return self._write(truncate)

    # -- the audit trail (records made by _audit.py) ---------------------------------

    def append_audit(self, make: Callable[[int, bytes], tuple[bytes, bytes]]) -> bytes:
        """Appends `make(sequence, previous_hash) -> (record, hash)` durably; returns the hash.

        The head (last sequence and hash) is kept in meta too, so that a record cut off the
        end of the chain is noticed.
        """
        return self._write(lambda txn: self._append_audit(txn, make))

    def _append_audit(self, txn: lmdb.Transaction,
                      make: Callable[[int, bytes], tuple[bytes, bytes]]) -> bytes:
        sequence, previous = self._audit_head(txn)
        record, digest = make(sequence + 1, previous)
        if not txn.put(_u64(sequence + 1), record, db=self._dbs["audit"], append=True,
                       overwrite=False):
            raise StoreError("audit: the record sequence is already taken")
        txn.put(b"audit_head", _u64(sequence + 1) + digest, db=self._dbs["meta"])
        return digest

    def _audit_head(self, txn: lmdb.Transaction) -> tuple[int, bytes]:
        head = txn.get(b"audit_head", db=self._dbs["meta"])
        return (0, GENESIS) if head is None else (_from_u64(head[:8]), bytes(head[8:]))

    def audit_head(self) -> tuple[int, bytes]:
        return self._read(self._audit_head)

    def audit_records(self) -> Iterator[tuple[int, bytes]]:
        """(sequence, record) in key order, read in one snapshot."""
        if self._dbs["audit"] is None:
            return iter(())
        return iter(self._read(lambda txn: [
            (_from_u64(key), bytes(value))
            for key, value in txn.cursor(db=self._dbs["audit"])]))

    # -- adjudications ---------------------------------------------------------------

    def settle(self, first: str, second: str, record: bytes,
               audit: Callable[[int, bytes], tuple[bytes, bytes]]) -> bytes:
        """Stores an adjudicated pair under both orders, with its audit record, in one
        transaction; returns the audit record's hash."""
        def settle(txn: lmdb.Transaction) -> bytes:
            db = self._dbs["adjudications"]
            txn.put(_pair_key(first, second), record, db=db)
            txn.put(_pair_key(second, first), record, db=db)
            return self._append_audit(txn, audit)

        return self._write(settle)

    def settled(self, registration_id: str) -> dict[str, bytes]:
        """The other registration_id -> record of every pair settled with this one."""
        db = self._dbs["adjudications"]
        if db is None or not registration_id:
            return {}
        prefix = registration_id.encode() + b"\x00"

        return self._read(lambda txn: {
            key.decode(): value for key, value in _with_prefix(txn, db, prefix)})

    def adjudications(self) -> list[bytes]:
        """Every settled pair's record, once."""
        db = self._dbs["adjudications"]
        if db is None:
            return []
        return self._read(lambda txn: [
            bytes(value) for key, value in txn.cursor(db=db)
            if bytes(key).split(b"\x00", 1)[0] <= bytes(key).split(b"\x00", 1)[1]])

    # -- reads -----------------------------------------------------------------------

    def _keys_for(self, txn: lmdb.Transaction, by: DeleteKey, value: str) -> list[int]:
        raw = value.encode()
        if by is DeleteKey.ID_NUMBER:
            cursor = txn.cursor(db=self._dbs["by_id_number"])
            if not cursor.set_key(raw):
                return []
            return [_from_u64(packed) for packed in cursor.iternext_dup()]
        db = self._dbs["by_registration_id" if by is DeleteKey.REGISTRATION_ID else "by_msisdn"]
        packed = txn.get(raw, db=db)
        return [] if packed is None else [_from_u64(packed)]

    def _load(self, txn: lmdb.Transaction, key: int, with_vector: bool) -> StoredFace | None:
        packed = _u64(key)
        raw = txn.get(packed, db=self._dbs["records"])
        if raw is None:
            return None
        vector = None
        if with_vector:
            raw_vector = txn.get(packed, db=self._dbs["vectors"])
            if raw_vector is None:
                raise StoreDamaged(f"{self.path}: the store is damaged: registration key {key} "
                                   "has no vector")
            vector = np.frombuffer(raw_vector, dtype=np.float32)
        return StoredFace(key, _decode_registration(bytes(raw)), vector)

    def get(self, registration_id: str) -> Registration | None:
        def get(txn: lmdb.Transaction) -> Registration | None:
            keys = self._keys_for(txn, DeleteKey.REGISTRATION_ID, registration_id)
            face = self._load(txn, keys[0], with_vector=False) if keys else None
            return face.registration if face else None

        return self._read(get)

    def keys_of(self, registration_id: str) -> list[int]:
        return self._read(
            lambda txn: self._keys_for(txn, DeleteKey.REGISTRATION_ID, registration_id))

    def exists(self, registration_id: str) -> bool:
        db = self._dbs["by_registration_id"]
        return self._read(lambda txn: txn.get(registration_id.encode(), db=db) is not None)

    def msisdn_taken(self, msisdn: str) -> bool:
        db = self._dbs["by_msisdn"]
        return self._read(lambda txn: txn.get(msisdn.encode(), db=db) is not None)

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        """The stored faces for `keys`, in order; keys deleted meanwhile are left out."""
        def faces(txn: lmdb.Transaction) -> list[StoredFace]:
            loaded = (self._load(txn, int(key), with_vectors) for key in keys)
            return [face for face in loaded if face is not None]

        return self._read(faces)

    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        """Every registration under an ID number, with vectors, for 1:1 comparison."""
        def faces(txn: lmdb.Transaction) -> list[StoredFace]:
            keys = self._keys_for(txn, DeleteKey.ID_NUMBER, id_number)
            loaded = (self._load(txn, key, with_vector=True) for key in keys)
            return [face for face in loaded if face is not None]

        return self._read(faces)

    def count(self) -> int:
        return self._read(lambda txn: int(txn.stat(self._dbs["records"])["entries"]))

    def distinct_id_numbers(self) -> int:
        return self._read(lambda txn: self._meta(txn, b"distinct_id_numbers"))

    def sequence(self) -> int:
        return self._read(lambda txn: self._meta(txn, b"sequence"))

    def model_counts(self) -> dict[str, int]:
        """Registrations per embedding model."""
        return self._read(self._model_counts)

    def _model_counts(self, txn: lmdb.Transaction) -> dict[str, int]:
        return {key.decode(): _from_u64(value)
                for key, value in _with_prefix(txn, self._dbs["meta"], _MODEL_PREFIX)}

    def _meta(self, txn: lmdb.Transaction, name: bytes) -> int:
        return _from_u64(txn.get(name, db=self._dbs["meta"]))

    def changes_after(self, sequence: int) -> tuple[list[Change], int]:
        """The logged changes after `sequence`, and the store's current sequence.

        The log is truncated behind each checkpoint, so a caller holding an older
        checkpoint sees fewer changes than the sequences span and must rebuild instead.
        """
        def changes(txn: lmdb.Transaction) -> tuple[list[Change], int]:
            cursor = txn.cursor(db=self._dbs["changes"])
            found = []
            if cursor.set_range(_u64(sequence + 1)):
                for raw_sequence, value in cursor:
                    found.append(
                        Change(_from_u64(raw_sequence), bytes(value[:1]), _from_u64(value[1:]))
                    )
            return found, self._meta(txn, b"sequence")

        return self._read(changes)

    def vectors(self, keys: Iterable[int] | npt.NDArray[np.int64]) -> tuple[list[int], Matrix]:
        """The stored vectors of those `keys` that still exist (the re-ranking hot path)."""
        raw = np.fromiter(keys, dtype=np.int64).astype(">u8").tobytes()
        packed = [raw[i:i + 8] for i in range(0, len(raw), 8)]

        def vectors(txn: lmdb.Transaction) -> tuple[list[int], Matrix]:
            # One C-level multi-get and one buffer: a third of the time of a get per key.
            pairs = txn.cursor(db=self._dbs["vectors"]).getmulti(packed)
            if not pairs:
                return [], np.empty((0, self.config.dimension), np.float32)
            found = np.frombuffer(b"".join(k for k, _ in pairs), dtype=">u8").astype(np.int64)
            matrix = np.frombuffer(b"".join(v for _, v in pairs), dtype=np.float32)
            keys = found.tolist()
            return keys, _checked_vectors(
                keys, matrix.reshape(len(pairs), self.config.dimension), self.path)

        return self._read(vectors)

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """One read transaction: a consistent view of the whole store, for as long as needed.

        While it is open LMDB cannot reuse pages freed by later writes, so the file grows
        with the changes made meanwhile; it is meant for rebuilds, not for the hot path.
        """
        try:
            with self._resize.reading(), self._env.begin(write=False) as txn:
                yield Snapshot(self, txn)
        except _DAMAGE as error:
            raise self._damaged(error) from error

    def iter_vectors(self, batch: int = 10_000, only_model: str | None = None, after: int = 0
                     ) -> Iterator[tuple[list[int], Matrix]]:
        """Stored vectors in key order from key `after` + 1, in batches, each batch from its
        own snapshot. With `only_model`, just the vectors that model made (slower: reads
        each record).
        """
        while True:
            last, keys, matrix = self._read(functools.partial(
                self._vector_batch, after=after, batch=batch, only_model=only_model))
            if last == after:
                return
            if keys:
                yield keys, matrix
            after = last

    def _vector_batch(self, txn: lmdb.Transaction, after: int, batch: int,
                      only_model: str | None) -> tuple[int, list[int], Matrix]:
        cursor = txn.cursor(db=self._dbs["vectors"])
        keys, rows = [], []
        last = after
        if cursor.set_range(_u64(after + 1)):
            for raw_key, raw_vector in cursor:
                last = _from_u64(raw_key)
                if only_model is not None and self._model_of(txn, last) != only_model:
                    continue
                keys.append(last)
                rows.append(np.frombuffer(raw_vector, dtype=np.float32))
                if len(keys) == batch:
                    break
        if not rows:
            return last, keys, np.empty((0, self.config.dimension), np.float32)
        return last, keys, _checked_vectors(keys, np.vstack(rows), self.path)

    def _model_of(self, txn: lmdb.Transaction, key: int) -> str:
        face = self._load(txn, key, with_vector=False)
        return face.registration.embedding_model if face else ""


class Snapshot:
    """A consistent read-only view of the store (see Store.snapshot)."""

    def __init__(self, store: Store, txn: lmdb.Transaction) -> None:
        self._store = store
        self._txn = txn
        self.sequence = store._meta(txn, b"sequence")

    def count(self, model_id: str) -> int:
        return _from_u64(self._txn.get(_model_key(model_id), db=self._store._dbs["meta"],
                                       default=_u64(0)))

    def vectors(self, batch: int, only_model: str | None) -> Iterator[tuple[list[int], Matrix]]:
        after = 0
        while True:
            last, keys, matrix = self._store._vector_batch(self._txn, after, batch, only_model)
            if last == after:
                return
            if keys:
                yield keys, matrix
            after = last

    def sample(self, size: int, model_id: str, only_model: str | None) -> Matrix:
        """About `size` vectors spread evenly over the store (every n-th), for training."""
        stride = max(1, self.count(model_id) // max(1, size))
        rows = []
        for _, matrix in self.vectors(20_000, only_model):
            rows.append(matrix[::stride])
        if not rows:
            return np.empty((0, self._store.config.dimension), np.float32)
        return np.vstack(rows)[:size]


def _model_key(model_id: str) -> bytes:
    return _MODEL_PREFIX + model_id.encode()


def _encode_registration(registration: Registration) -> bytes:
    return json.dumps(
        {
            "r": registration.registration_id,
            "i": registration.id_number,
            "m": registration.msisdn,
            "c": registration.carrier,
            "g": registration.region,
            "t": registration.enrolled_at_us,
            "e": registration.embedding_model,
        },
        separators=(",", ":"),
    ).encode()


def _decode_registration(raw: bytes) -> Registration:
    fields = json.loads(raw)
    return Registration(
        registration_id=fields["r"],
        id_number=fields["i"],
        msisdn=fields["m"],
        carrier=fields["c"],
        region=fields["g"],
        enrolled_at_us=fields["t"],
        embedding_model=fields.get("e", ""),
    )


def _verify(store: Store, txn: lmdb.Transaction, progress: Callable[[int], object]) -> list[str]:
    dbs, problems = store._dbs, []
    sizes = {name: txn.stat(dbs[name])["entries"]
             for name in ("records", "vectors", "by_registration_id")}
    counted = sum(store._model_counts(txn).values())
    if len(set(sizes.values()) | {counted}) != 1:
        problems.append(f"entry counts disagree: {sizes}, registrations by model {counted}")
    for done, (packed, raw) in enumerate(txn.cursor(db=dbs["records"]), start=1):
        key = _from_u64(packed)
        try:
            registration = _decode_registration(bytes(raw))
        except (ValueError, KeyError) as error:
            problems.append(f"record {key} does not decode ({error})")
            continue
        if txn.get(registration.registration_id.encode(), db=dbs["by_registration_id"]) != packed:
            problems.append(f"record {key}: registration_id lookup does not lead back to it")
        if registration.msisdn and txn.get(registration.msisdn.encode(),
                                           db=dbs["by_msisdn"]) != packed:
            problems.append(f"record {key}: msisdn lookup does not lead back to it")
        raw_vector = txn.get(packed, db=dbs["vectors"])
        if raw_vector is None or len(raw_vector) != 4 * store.config.dimension:
            problems.append(f"record {key}: no embedding of {store.config.dimension} floats")
        else:
            try:
                _checked_vectors([key], np.frombuffer(raw_vector, np.float32)[None, :],
                                 store.path)
            except StoreDamaged as error:
                problems.append(str(error))
        if done % 10_000 == 0:
            progress(10_000)
        if len(problems) >= 20:
            problems.append("... stopped after 20 problems")
            break
    return problems


_REWRITE_BATCH = 20_000


def _copy_entries(source: lmdb.Transaction, db: Any, target: lmdb.Environment,
                  name: str) -> None:
    """Every entry of one database, in key order, in write transactions of a bounded size."""
    dupsort = name == "by_id_number"
    target_db = target.open_db(name.encode(), dupsort=dupsort, dupfixed=dupsort)
    entries = source.cursor(db=db).iternext(keys=True, values=True)
    while batch := list(itertools.islice(entries, _REWRITE_BATCH)):
        with target.begin(write=True, db=target_db) as txn:
            txn.cursor().putmulti(batch, dupdata=dupsort, append=not dupsort)


def _with_prefix(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key without the prefix, value) of every entry whose key starts with `prefix`."""
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not bytes(key).startswith(prefix):
            return
        yield bytes(key)[len(prefix):], bytes(value)


def _pair_key(first: str, second: str) -> bytes:
    return first.encode() + b"\x00" + second.encode()


# LMDB's answers to a page that is not what the tree says it should be.
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.BadTxnError,
           lmdb.InvalidError, lmdb.VersionMismatchError)


def _checked_vectors(keys: list[int], matrix: Matrix, where: Path) -> Matrix:
    """Every stored embedding is a finite unit vector; anything else is damage on disk."""
    with np.errstate(all="ignore"):  # garbage bytes make overflowing or NaN floats
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3)
    if bad.any():
        key = keys[int(np.argmax(bad))]
        raise StoreDamaged(f"{where}: the store is damaged: the embedding stored under key {key} "
                           f"is not a unit vector ({int(bad.sum())} such in this batch); "
                           "restore it from a backup (run `dedup doctor` for a full check)")
    return matrix


def _is_disk_full(error: lmdb.Error) -> bool:
    return "No space left" in str(error) or getattr(error, "errno", None) == errno.ENOSPC
