"""Talking to Milvus: the client, its errors as BackendUnavailable, and paging through rows.

pymilvus is imported on first use, so that importing the backend costs nothing without it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from dedup.core.errors import BackendUnavailable, ConfigError, StoreError
from dedup.core.settings import MilvusConfig

_P = ParamSpec("_P")
_T = TypeVar("_T")


def client_uri(uri: str) -> str:
    """milvus://host:port -> http://host:port; other URIs and Lite paths unchanged."""
    return "http://" + uri.removeprefix("milvus://") if uri.startswith("milvus://") else uri


def connect(config: MilvusConfig) -> Any:
    """A MilvusClient for `config` (Milvus Lite: its file's directory is created)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as error:
        raise ConfigError("the milvus backend needs pymilvus (pip install 'dedup[milvus]'; "
                         "milvus-lite too for a local .db file)") from error
    uri = client_uri(config.uri)
    if config.is_lite:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, token=config.token)
    except Exception as error:
        raise StoreError(f"cannot connect to Milvus at {config.uri}: {error}") from error


def _translated(error: Exception) -> BackendUnavailable:
    return BackendUnavailable(f"milvus: {getattr(error, 'message', error)} "
                              f"(code {getattr(error, 'code', '?')})")


def unavailable(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Milvus's own errors (unreachable, timed out, refused) become BackendUnavailable,
    also while a generator method is being iterated."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def iterate(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            from pymilvus.exceptions import MilvusException

            try:
                yield from method(*args, **kwargs)
            except MilvusException as error:
                raise _translated(error) from error

        return iterate

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        from pymilvus.exceptions import MilvusException

        try:
            return method(*args, **kwargs)
        except MilvusException as error:
            raise _translated(error) from error

    return call


def pages(client: Any, collection: str, where: str, fields: list[str], block: int
          ) -> Iterator[list[dict[str, Any]]]:
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
