"""The security file: TLS material, certificate subjects and tokens with their roles.

Read at start-up; `dedup.api.auth` turns it into gRPC credentials and per-call checks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dedup.core.audit_chain import AuditKey, read_audit_key
from dedup.core.errors import ConfigError

ROLES = ("registration", "investigator", "admin")


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    sha256: bytes
    expires: datetime | None = None


@dataclass(frozen=True)
class SecurityConfig:
    certificate: bytes
    private_key: bytes
    client_ca: bytes
    # Client certificate common name -> role.
    clients: dict[str, str] = field(default_factory=dict)
    tokens: tuple[Token, ...] = ()
    # The server-TLS listener for bearer tokens; None: tokens are not accepted.
    token_address: str | None = None
    # [audit] key_file: authenticates the audit trail and pseudonymises the ID numbers and
    # phone numbers in it; None: a key in the data directory (service/audit.py).
    audit_key: AuditKey | None = None


def load_security(path: Path) -> SecurityConfig:
    """Reads the TOML security file; paths in it are relative to the file."""
    try:
        document = tomllib.loads(path.read_text())
        tls = document["tls"]
        base = path.parent

        def read(name: str) -> bytes:
            return (base / str(tls[name])).read_bytes()

        clients = {entry["common_name"]: _role(entry["role"], path)
                   for entry in document.get("clients", [])}
        tokens = tuple(_token(entry, path) for entry in document.get("tokens", []))
        return SecurityConfig(read("certificate"), read("private_key"), read("client_ca"),
                              clients, tokens, document.get("listen", {}).get("token_address"),
                              audit_key=_audit_key(document.get("audit", {}), base))
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"security file {path}: {type(error).__name__}: {error}") from error


def _audit_key(section: dict[str, object], base: Path) -> AuditKey | None:
    """The [audit] section's key_file (relative to the security file), if it names one."""
    key_file = section.get("key_file")
    return None if key_file is None else read_audit_key(base / str(key_file))


def _role(role: str, path: Path) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is none of {', '.join(ROLES)}")
    return role


def _token(entry: dict[str, object], path: Path) -> Token:
    digest = bytes.fromhex(str(entry["sha256"]))
    if len(digest) != 32:
        raise ValueError(f"token {entry.get('name')!r}: sha256 must be 64 hex digits")
    expires = entry.get("expires")
    if expires is not None and not isinstance(expires, datetime):
        raise ValueError(f"token {entry.get('name')!r}: expires must be a TOML date-time")
    if isinstance(expires, datetime) and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return Token(str(entry["name"]), _role(str(entry["role"]), path), digest, expires)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(address: str) -> bool:
    """Whether `address` (host:port) is on loopback: the only place dedup listens without a
    security file."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
