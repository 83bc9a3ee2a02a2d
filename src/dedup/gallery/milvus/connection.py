"""Talking to Milvus: the client, its errors as BackendUnavailable, and paging through rows.

pymilvus is imported on first use, so that importing the backend costs nothing without it.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from dedup.core.errors import BackendUnavailable, ConfigError, StoreError
from dedup.core.files import private_dir
from dedup.core.settings import MilvusConfig

_P = ParamSpec("_P")
_T = TypeVar("_T")


def client_uri(uri: str) -> str:
    """milvus://host:port -> http://host:port; other URIs and Lite paths unchanged."""
    return "http://" + uri.removeprefix("milvus://") if uri.startswith("milvus://") else uri


# How long a call to Milvus (with pymilvus's own retries) may take before dedup answers
# UNAVAILABLE: without a limit pymilvus retries a lost server for minutes. Calls that do
# bulk work get longer.
CALL_TIMEOUT_S = 10.0
BULK_CALL_TIMEOUT_S = {"flush": 300.0, "compact": 60.0, "query_iterator": 60.0,
                       "upsert": 60.0, "create_collection": 60.0, "create_index": 60.0,
                       "load_collection": 60.0, "drop_collection": 60.0}


READS = frozenset({"query", "search", "get", "query_iterator"})


class TimedClient:
    """A MilvusClient whose calls give up after CALL_TIMEOUT_S unless told otherwise, and
    which counts the calls it makes to Milvus (`calls_made`, a query iterator's pages
    included) and its Strong reads (`strong_reads`: each waits for Milvus's next time
    tick)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._takes_timeout: dict[str, bool] = {}
        self._counting = threading.Lock()
        self.calls_made = 0
        self.strong_reads = 0

    def count_call(self, strong: bool = False) -> None:
        with self._counting:
            self.calls_made += 1
            self.strong_reads += strong

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        takes = self._takes_timeout.get(name)
        if takes is None:
            takes = self._takes_timeout[name] = _has_timeout(attribute)
        if not takes:
            return attribute
        limit = BULK_CALL_TIMEOUT_S.get(name, CALL_TIMEOUT_S)

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", limit)
            strong = name in READS and kwargs.get("consistency_level") == "Strong"
            self.count_call(strong)
            result = attribute(*args, **kwargs)
            return _CountedPages(result, self) if name == "query_iterator" else result

        return call


class _CountedPages:
    """A query iterator whose pages count as calls."""

    def __init__(self, iterator: Any, client: TimedClient) -> None:
        self._iterator = iterator
        self._client = client

    def next(self) -> Any:
        self._client.count_call()
        return self._iterator.next()

    def close(self) -> None:
        self._iterator.close()


def _has_timeout(function: Callable[..., Any]) -> bool:
    try:
        return "timeout" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def connect(config: MilvusConfig) -> Any:
    """A MilvusClient for `config` (Milvus Lite: its file's directory is created), whose
    calls time out (TimedClient)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as error:
        raise ConfigError("the milvus backend needs pymilvus (pip install 'dedup[milvus]'; "
                         "milvus-lite too for a local .db file)") from error
    uri = client_uri(config.uri)
    if config.is_lite:
        _private_lite_directory(Path(uri))
    try:
        return TimedClient(MilvusClient(uri=uri, token=config.token, timeout=CALL_TIMEOUT_S))
    except Exception as error:
        raise StoreError(f"cannot connect to Milvus at {config.uri}: {error}") from error


def _private_lite_directory(path: Path) -> None:
    """Milvus Lite keeps every embedding, ID number and phone number in a directory at
    `path`, its files made with the umask's modes (0644 under the usual 022): the directory
    is made 0700 first (narrowed if older), so that no other user can enter it."""
    if path.exists() and not path.is_dir():
        return  # not Lite's directory: Lite refuses it itself
    private_dir(path, narrow=True)


# gRPC codes that pymilvus lets out unretried and that a retry may clear; the others
# (PERMISSION_DENIED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) would fail again.
TRANSIENT_GRPC_CODES = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED"})


def translated(error: Exception) -> BackendUnavailable | StoreError:
    """A Milvus error as the BackendUnavailable a caller gets (retry), or as a StoreError
    where Milvus refused the call for good."""
    import grpc

    if isinstance(error, grpc.Call):  # grpc's errors are Calls: code and details
        code = error.code().name
        message = f"milvus: {error.details() or 'no details'} (gRPC {code})"
        return BackendUnavailable(message) if code in TRANSIENT_GRPC_CODES \
            else StoreError(message)
    return BackendUnavailable(f"milvus: {getattr(error, 'message', error)} "
                              f"(code {getattr(error, 'code', '?')})")


def milvus_errors() -> tuple[type[Exception], ...]:
    """What a call to Milvus raises when Milvus fails it: pymilvus's errors, and gRPC's own
    (a call past its time limit comes out of pymilvus as grpc's DEADLINE_EXCEEDED)."""
    import grpc
    from pymilvus.exceptions import MilvusException

    return MilvusException, grpc.RpcError


def unavailable(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Milvus's own errors (unreachable, timed out, refused) become BackendUnavailable,
    also while a generator method is being iterated."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def iterate(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            try:
                yield from method(*args, **kwargs)
            except milvus_errors() as error:
                raise translated(error) from error

        return iterate

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except milvus_errors() as error:
            raise translated(error) from error

    return call


def pages(client: Any, collection: str, where: str, fields: list[str], block: int
          ) -> Generator[list[dict[str, Any]], None, None]:
    """Every row matching `where`, `block` at a time, in ascending key order (pymilvus's
    iterator; a query with a limit returns any matching rows, not the first ones)."""
    iterator = client.query_iterator(collection, batch_size=block, filter=where,
                                     output_fields=["key", *fields])
    try:
        while page := iterator.next():
            # Rows materialise lazily by position: copy them out of the result list.
            yield [dict(entity) for entity in page]
    finally:
        iterator.close()
