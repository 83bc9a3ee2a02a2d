"""`dedup console`: the investigators' web console, a client of a running server."""

from __future__ import annotations

import argparse
from pathlib import Path

from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.errors import ConfigError


def register(commands: Subcommands) -> None:
    console = add_subcommand(commands, "console", "the investigators' web console", """
        Serves a web console for fraud investigators and admins: sign in with your own
        bearer token (kept in the console's memory, never in the page), open a case, search
        by an uploaded photo or a registration ID, look at the ID numbers sharing a face as
        a graph (Links), run the gallery-wide cluster sweep with live progress and download
        it as CSV or JSON lines, and settle matches as the same person or different people.
        Every action is a gRPC call to --server with your token and the case, so the server
        authorises and audits it as yours. Admins also see Stats, the index, and (with
        --audit-data-dir or --audit-milvus-uri, beside the server) the audit trail's
        verification and records. HTTPS with --certificate/--private-key; plain HTTP only
        on loopback. Without --ca the server is taken to be an unauthenticated development
        server (no token; the console then listens on loopback only). With
        --photo-url-template the browser shows each matched registration's photo from the
        carrier's own system; the console never fetches it. Needs the console extra:
        pip install 'dedup[console]'.
        """, ["dedup console --server dedup.internal:50052 --ca keys/ca.crt "
              "--address 0.0.0.0:8443 --certificate console.crt --private-key console.key",
              "dedup console --server 127.0.0.1:50052 --ca keys/ca.crt --photo-url-template "
              "'https://bss.example/photos/{registration_id}'"], console_command)
    console.add_argument("--server", default="127.0.0.1:50051",
                         help="HOST:PORT of the server's token listener")
    console.add_argument("--ca", type=Path, help="the CA certificate that signed the server's")
    console.add_argument("--address", default="127.0.0.1:8080",
                         help="HOST:PORT the console listens on (port 0: any free port)")
    console.add_argument("--certificate", type=Path, help="the console's HTTPS certificate")
    console.add_argument("--private-key", type=Path, help="its private key")
    console.add_argument("--photo-url-template", default="", metavar="URL",
                         help="where the browser finds a registration's photo, with "
                         "{registration_id} in it")
    console.add_argument("--idle-timeout", type=float, default=15.0, metavar="MINUTES",
                         help="a session ends after this long without a request")
    console.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    console.add_argument("--max-upload-bytes", type=int, default=None,
                         help="largest photo accepted (default: the server's Face.image "
                         "limit, 8 MiB)")
    audit = console.add_argument_group("the audit pages (admins; run beside the server)")
    audit.add_argument("--audit-data-dir", type=Path, help="the server's data directory")
    audit.add_argument("--audit-milvus-uri", default="", help="or the Milvus backend's URI")
    audit.add_argument("--audit-key", type=Path, help="the audit key (to check every MAC)")
    audit.add_argument("--audit-anchor", type=Path, help="an anchor file to check against")


def console_command(args: argparse.Namespace) -> int:
    try:
        from dedup.console.serve import serve
    except ImportError as error:
        missing = (error.name or "a package").split(".")[0]
        raise ConfigError(f"dedup console needs its extra (missing {missing}): "
                          "pip install 'dedup[console]'") from None
    from dedup.console.settings import DEFAULT_MAX_UPLOAD_BYTES, AuditSource, ConsoleSettings

    settings = ConsoleSettings(
        server=args.server, ca=args.ca, address=args.address, certificate=args.certificate,
        private_key=args.private_key, photo_url_template=args.photo_url_template,
        idle_timeout_s=args.idle_timeout * 60, call_timeout_s=args.timeout,
        max_upload_bytes=args.max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES,
        audit=AuditSource(args.audit_data_dir, args.audit_milvus_uri, args.audit_key,
                          args.audit_anchor))
    serve(settings)
    return 0
