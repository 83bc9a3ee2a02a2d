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
import json
from datetime import UTC, datetime

import grpc

from dedup.core.audit_chain import Caller
from dedup.core.errors import PermissionDenied, Unauthenticated
from dedup.core.security import SecurityConfig

# Methods by service; admin may call everything.
_ALLOWED: dict[str, frozenset[str]] = {
    "registration": frozenset({"FaceDedup.Check", "FaceDedup.CheckStream", "FaceDedup.Enroll",
                               "FaceDedup.EnrollStream", "FaceDedup.GetRegistration"}),
    "investigator": frozenset({"Investigate.*", "FaceDedup.Check", "FaceDedup.CheckStream",
                               "FaceDedup.GetRegistration"}),
}

# A read replica (`dedup serve --processes N`) relays calls to the primary process naming
# the caller it authenticated (a client certificate cannot travel through the relay), with
# the secret the primary gave it: only a caller named with that secret is believed.
FORWARD_SECRET_KEY = "x-dedup-forward-secret"
FORWARDED_CALLER_KEY = "x-dedup-forwarded-caller"
FORWARD_KEYS = (FORWARD_SECRET_KEY, FORWARDED_CALLER_KEY)

CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
UNAUTHENTICATED_CALLER = Caller("unauthenticated (loopback)", "admin", "none")


def current_caller() -> Caller:
    """The admitted caller of the call being served (set before every servicer method)."""
    return CALLER.get() or UNAUTHENTICATED_CALLER


def allowed(role: str, service: str, method: str) -> bool:
    if role == "admin":
        return True
    granted = _ALLOWED.get(role, frozenset())
    return f"{service}.{method}" in granted or f"{service}.*" in granted


def mtls_credentials(security: SecurityConfig) -> grpc.ServerCredentials:
    """Mutual TLS: client certificates signed by the configured CA are required."""
    return grpc.ssl_server_credentials([(security.private_key, security.certificate)],
                                       root_certificates=security.client_ca,
                                       require_client_auth=True)


def tls_credentials(security: SecurityConfig) -> grpc.ServerCredentials:
    """Server TLS for the bearer-token listener."""
    return grpc.ssl_server_credentials([(security.private_key, security.certificate)])



def forwarded_caller_metadata(caller: Caller, secret: str) -> list[tuple[str, str]]:
    """What a replica adds to a call it relays: the caller it authenticated."""
    expires = None if caller.expires is None else caller.expires.isoformat()
    named = json.dumps([caller.identity, caller.role, caller.via, expires])
    return [(FORWARD_SECRET_KEY, secret), (FORWARDED_CALLER_KEY, named)]


def _expiry(named: object) -> datetime | None:
    """A forwarded caller's expiry (ISO 8601; one without a zone is UTC)."""
    if named is None:
        return None
    until = datetime.fromisoformat(str(named))
    return until if until.tzinfo is not None else until.replace(tzinfo=UTC)


class Authorizer:
    def __init__(self, security: SecurityConfig | None, forward_secret: str | None = None
                 ) -> None:
        """`forward_secret`: a primary's, which believes the callers replicas name with it."""
        self.security = security
        self.forward_secret = forward_secret

    def relayed(self, context: grpc.ServicerContext) -> bool:
        """Whether a replica of this server relayed the call (it names the primary's
        secret): the replica counts the call in the metrics, this process does not."""
        if self.forward_secret is None:
            return False
        secret = dict(context.invocation_metadata() or ()).get(FORWARD_SECRET_KEY)
        return secret is not None and self._from_a_replica(context, secret)

    def _from_a_replica(self, context: grpc.ServicerContext, secret: object) -> bool:
        """The call came over the replicas' socket and names the primary's secret."""
        assert self.forward_secret is not None
        return str(context.peer()).startswith("unix:") and isinstance(secret, str) and \
            hmac.compare_digest(secret.encode(), self.forward_secret.encode())

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """The authenticated caller, or Unauthenticated."""
        if self.security is None:
            return UNAUTHENTICATED_CALLER
        if self.forward_secret is not None:
            forwarded = self._forwarded_caller(context)
            if forwarded is not None:
                return forwarded
        names = context.auth_context().get("x509_common_name")
        if names:
            common_name = names[0].decode()
            role = self.security.clients.get(common_name)
            if role is None:
                raise Unauthenticated(f"client certificate CN={common_name!r} is not one the "
                                      "security file maps to a role")
            return Caller(f"CN={common_name}", role, "mtls")
        return self._token_caller(context)

    def _forwarded_caller(self, context: grpc.ServicerContext) -> Caller | None:
        """The caller a replica authenticated, if the call came through one."""
        assert self.forward_secret is not None
        metadata = dict(context.invocation_metadata() or ())
        secret = metadata.get(FORWARD_SECRET_KEY)
        if secret is None:
            return None
        if not self._from_a_replica(context, secret):
            raise Unauthenticated("a forwarded call must come from a replica of this server")
        try:
            identity, role, via, *rest = json.loads(str(metadata.get(FORWARDED_CALLER_KEY)))
            until = _expiry(rest[0] if rest else None)
        except (TypeError, ValueError) as error:
            raise Unauthenticated("a forwarded call must name its caller") from error
        if until is not None and until <= datetime.now(UTC):
            raise Unauthenticated(f"the credential of {identity} expired at "
                                  f"{until.isoformat()}")
        return Caller(str(identity), str(role), str(via), until)

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
                return Caller(f"token:{token.name}", token.role, "token", token.expires)
        raise Unauthenticated("unknown token")

    def check(self, caller: Caller, service: str, method: str) -> None:
        if not allowed(caller.role, service, method):
            raise PermissionDenied(f"role {caller.role!r} ({caller.identity}) may not call "
                                   f"{service}.{method}")
