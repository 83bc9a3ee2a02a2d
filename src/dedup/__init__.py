"""dedup: face de-duplication for mobile-carrier SIM registration.

The public surface: the settings, the error tree, verdicts, the server factory and the
synthetic face generator used by the demo, tests and benchmarks. Importing the package or
its settings is cheap: the server (grpc, FAISS, LMDB, the face model) loads on first use of
`create_server` or `DedupServer`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dedup.core.errors import (
    AlreadyExists,
    CheckpointError,
    ConfigError,
    DeadlineExceeded,
    DedupError,
    FailedPrecondition,
    InvalidArgument,
    ModelError,
    NotFound,
    ResourceExhausted,
    StartupError,
    StoreError,
)
from dedup.core.records import Verdict
from dedup.core.settings import DIMENSION, GIB, MIB, Limits, Policy, ServerConfig, StoreConfig
from dedup.core.synthetic import FaceGenerator, noise_for_similarity

if TYPE_CHECKING:
    from dedup.server import DedupServer, create_server

_LAZY = {"DedupServer": "dedup.server", "create_server": "dedup.server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dedup' has no attribute {name!r}")


__all__ = [
    "DIMENSION",
    "GIB",
    "MIB",
    "AlreadyExists",
    "CheckpointError",
    "ConfigError",
    "DeadlineExceeded",
    "DedupError",
    "DedupServer",
    "FaceGenerator",
    "FailedPrecondition",
    "InvalidArgument",
    "Limits",
    "ModelError",
    "NotFound",
    "Policy",
    "ResourceExhausted",
    "ServerConfig",
    "StartupError",
    "StoreConfig",
    "StoreError",
    "Verdict",
    "create_server",
    "noise_for_similarity",
]
