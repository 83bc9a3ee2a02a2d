"""Every error dedup raises, in one place.

Service logic raises these; the gRPC layer maps each class to one status code,
so a client always sees the same status for the same kind of failure.

    DedupError
    ├── InvalidArgument      bad request field            -> INVALID_ARGUMENT
    ├── NotFound             unknown registration or key  -> NOT_FOUND
    ├── AlreadyExists        registration_id or msisdn in use -> ALREADY_EXISTS
    ├── FailedPrecondition   request valid, state forbids it -> FAILED_PRECONDITION
    ├── ResourceExhausted    map or disk full, limits     -> RESOURCE_EXHAUSTED
    ├── DeadlineExceeded     the call's deadline passed   -> DEADLINE_EXCEEDED
    ├── Unauthenticated      no valid credential          -> UNAUTHENTICATED
    ├── PermissionDenied     the caller's role may not call this -> PERMISSION_DENIED
    ├── Stopping             the server is stopping; the work did not run -> UNAVAILABLE
    ├── AuditUnavailable     the audit record could not be written -> UNAVAILABLE
    ├── BackendUnavailable   Milvus unreachable, or an enrolment not confirmed in time
    │                        (nothing was stored)       -> UNAVAILABLE
    ├── StoreError           the data (an LMDB store, a Milvus collection, a backup or
    │   │                    migration target) cannot be used as it is
    │   ├── StoreDamaged     LMDB reports a damaged page, or a stored vector is garbage
    │   │                                             -> DATA_LOSS
    │   └── CheckpointError  an index checkpoint is missing or damaged (recovered by a rebuild)
    └── StartupError         the server or a command cannot start as configured
        ├── ConfigError      a setting, the security file, an address or a missing optional
        │   │                package (pymilvus for the milvus backend)
        │   └── SharedDataDir  the data directory is open to group or other users
        └── ModelError       the face model directory is missing or unusable

StoreError and StartupError are raised before or outside calls (start-up, offline commands);
a StoreError that reaches a call is INTERNAL, except StoreDamaged.
"""

from __future__ import annotations


class DedupError(Exception):
    """Base class of every error dedup raises on purpose."""


class InvalidArgument(DedupError):
    """A request field is missing or malformed; `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(DedupError):
    """No registration matches the given key."""


class AlreadyExists(DedupError):
    """A unique key (registration_id, msisdn) is already taken."""


def registration_id_taken(registration_id: str) -> AlreadyExists:
    return AlreadyExists(f"registration.registration_id: {registration_id!r} is already enrolled")


def msisdn_taken(msisdn: str) -> AlreadyExists:
    return AlreadyExists(f"registration.msisdn: {msisdn!r} is held by another registration; "
                         "delete that registration first")


class FailedPrecondition(DedupError):
    """The request is well-formed, but the service's state does not allow it."""


class ResourceExhausted(DedupError):
    """The store cannot take more data (map cap or disk full), or a limit was hit."""


class RefusedUnstarted(ResourceExhausted):
    """A limit refused the work before any of it was done (no photo slot, the server's or
    the caller's share of them): no check was done, so a caller's check rate is not
    charged for it."""


class DeadlineExceeded(DedupError):
    """The caller's deadline passed before the work was done; the work was dropped."""


class Unauthenticated(DedupError):
    """No credential, or one the server does not accept (unknown or expired token)."""


class PermissionDenied(DedupError):
    """The caller is known, but its role does not allow this method."""


class Stopping(DedupError):
    """The server is stopping: the call's work did not run, and it may be retried."""


class AuditUnavailable(DedupError):
    """The audit record of an audited call could not be written: the call returns nothing."""


class BackendUnavailable(DedupError):
    """The Milvus backend cannot be reached, or an enrolment's claim could not be confirmed
    in time; nothing was stored, and the call may be retried."""


class NotServedHere(BackendUnavailable):
    """A read replica cannot answer from its own store now (it is released for a compaction,
    or not open yet): the primary process must answer instead."""


class StoreError(DedupError):
    """The data directory cannot be opened or is damaged."""


class StoreDamaged(StoreError):
    """LMDB found a damaged page, or a stored embedding is not a unit vector: restore a backup."""


class CheckpointError(StoreError):
    """An index checkpoint file is missing, truncated or fails its checksum."""


class StartupError(DedupError):
    """The server or a command cannot start as configured; the message says what to change."""


class ConfigError(StartupError):
    """A setting, the security file, a listen address, or a package the configuration needs."""


class SharedDataDir(ConfigError):
    """The data directory can be entered or read by users other than its owner."""

    def __init__(self, path: object, mode: int) -> None:
        super().__init__(
            f"{path}: the data directory has mode {mode:04o}, so other users can read the "
            f"registrations in it; run `chmod 700 {path}` (or serve it anyway with "
            "--allow-shared-data-dir)")
        self.path = path
        self.mode = mode


class ModelError(StartupError):
    """The model directory is missing, unreadable or incomplete."""
