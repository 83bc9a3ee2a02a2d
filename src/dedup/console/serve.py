"""Serving the console: uvicorn on a socket the console binds itself (so port 0 works and the
port is printed), HTTPS with --certificate/--private-key, plain HTTP on loopback only."""

from __future__ import annotations

import logging
import socket

import uvicorn

from dedup.console.app import create_app
from dedup.console.settings import ConsoleSettings, split_address
from dedup.core.errors import ConfigError

log = logging.getLogger("dedup.console")


def bind(address: str) -> socket.socket:
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"--address {address}: cannot listen there: {error}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(settings: ConsoleSettings) -> None:
    """Runs until SIGINT or SIGTERM."""
    app = create_app(settings)
    sock = bind(settings.address)
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.https else "http"
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, server_header=False,
        proxy_headers=False, timeout_graceful_shutdown=5,
        ssl_certfile=str(settings.certificate) if settings.certificate else None,
        ssl_keyfile=str(settings.private_key) if settings.private_key else None)
    log.info("console on %s://%s:%d/ for the server %s (%s)", scheme, shown, port,
             settings.server, "TLS" if settings.authenticated else "plain, unauthenticated")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        app.state.console.backend.close()
        sock.close()
