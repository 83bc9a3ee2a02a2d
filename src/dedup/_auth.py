"""Who may call what: roles, the security file, and the two ways in.

Mutual TLS (a listener that requires client certificates signed by the configured CA; the
certificate's subject common name maps to a role) and bearer tokens (`authorization: Bearer
<token>` on a server-TLS listener; the file holds only each token's SHA-256). Health and
reflection stay open. Without a security file the server runs unauthenticated, on loopback only.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

from ._audit import Caller
from ._errors import InvalidArgument, PermissionDenied, StoreError, Unauthenticated

ROLES = ("registration", "investigator", "admin")

# Methods by service; admin may call everything.
_ALLOWED: dict[str, frozenset[str]] = {
    "registration": frozenset({"FaceDedup.Check", "FaceDedup.Enroll", "FaceDedup.EnrollStream",
                               "FaceDedup.GetRegistration"}),
    "investigator": frozenset({"Investigate.*", "FaceDedup.Check",
                               "FaceDedup.GetRegistration"}),
}

CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
UNAUTHENTICATED_CALLER = Caller("unauthenticated (loopback)", "admin", "none")


def allowed(role: str, service: str, method: str) -> bool:
    if role == "admin":
        return True
    granted = _ALLOWED.get(role, frozenset())
    return f"{service}.{method}" in granted or f"{service}.*" in granted


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

    def mtls_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=True)

    def tls_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate)])


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
                              clients, tokens, document.get("listen", {}).get("token_address"))
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as error:
        raise StoreError(f"security file {path}: {type(error).__name__}: {error}") from error


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
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authorizer:
    def __init__(self, security: SecurityConfig | None) -> None:
        self.security = security

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """The authenticated caller, or Unauthenticated."""
        if self.security is None:
            return UNAUTHENTICATED_CALLER
        names = context.auth_context().get("x509_common_name")
        if names:
            common_name = names[0].decode()
            role = self.security.clients.get(common_name)
            if role is None:
                raise Unauthenticated(f"client certificate CN={common_name!r} is not one the "
                                      "security file maps to a role")
            return Caller(f"CN={common_name}", role, "mtls")
        return self._token_caller(context)

    def _token_caller(self, context: grpc.ServicerContext) -> Caller:
        assert self.security is not None
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("no credential: present a client certificate, or "
                                  "`authorization: Bearer <token>` metadata")
        digest = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).digest()
        for token in self.security.tokens:
            if hmac.compare_digest(token.sha256, digest):
                if token.expires is not None and token.expires <= datetime.now(UTC):
                    raise Unauthenticated(f"token {token.name!r} expired at "
                                          f"{token.expires.isoformat()}")
                return Caller(f"token:{token.name}", token.role, "token")
        raise Unauthenticated("unknown token")

    def check(self, caller: Caller, service: str, method: str) -> None:
        if not allowed(caller.role, service, method):
            raise PermissionDenied(f"role {caller.role!r} ({caller.identity}) may not call "
                                   f"{service}.{method}")


def required_text(value: str, field_name: str, limit: int = 256) -> str:
    """case_id and purpose: required, printable, bounded."""
    if not value:
        raise InvalidArgument(field_name, "is required for every investigator call")
    if len(value) > limit or not value.isprintable():
        raise InvalidArgument(field_name, f"must be at most {limit} printable characters")
    return value
