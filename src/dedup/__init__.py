"""dedup: face de-duplication for mobile-carrier SIM registration.

The public surface: configuration, the server factory, the service's errors and
the synthetic face generator used by the demo, tests and benchmarks.
"""

from dedup.core.errors import (
    AlreadyExists,
    CheckpointError,
    DeadlineExceeded,
    DedupError,
    FailedPrecondition,
    InvalidArgument,
    ModelError,
    NotFound,
    ResourceExhausted,
    StoreError,
)
from dedup.core.records import Verdict
from dedup.core.settings import DIMENSION, GIB, MIB, Limits, Policy, ServerConfig, StoreConfig
from dedup.core.synthetic import FaceGenerator, noise_for_similarity
from dedup.server import DedupServer, create_server

__all__ = [
    "DIMENSION",
    "GIB",
    "MIB",
    "AlreadyExists",
    "CheckpointError",
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
    "StoreConfig",
    "StoreError",
    "Verdict",
    "create_server",
    "noise_for_similarity",
]
