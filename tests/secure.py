"""Test keys (made once per session by `dedup keys`' code) and channels that use them."""

from __future__ import annotations

from pathlib import Path

import grpc


def channel(port: int, keys: Path, role: str | None = None, token: str | None = None,
            ca: Path | None = None) -> grpc.Channel:
    """TLS to 127.0.0.1:port trusting `ca` (default the test CA); with `role`, that role's
    client certificate; with `token`, a bearer token on every call."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or keys / "ca.crt").read_bytes(),
        private_key=(keys / f"{role}.key").read_bytes() if role else None,
        certificate_chain=(keys / f"{role}.crt").read_bytes() if role else None)
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    # The server certificate names localhost and 127.0.0.1.
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def tokens(keys: Path) -> dict[str, str]:
    return dict(line.split() for line in (keys / "tokens.txt").read_text().splitlines())


def secured(make_server, keys: Path, **overrides):
    """A server with the test keys' security file (mutual TLS and the token listener)."""
    from dedup.core.security import load_security

    return make_server(security=load_security(keys / "security.toml"), **overrides)
