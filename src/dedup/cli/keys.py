"""`dedup keys`: test keys and a security file for a local server, and how to use them."""

from __future__ import annotations

import argparse
from pathlib import Path

from dedup.cli.subcommand import Subcommands, add_subcommand


def register(commands: Subcommands) -> None:
    keys = add_subcommand(commands, "keys", "make a test CA, certificates, tokens and a "
                          "security file for local use", """
        Writes into the new directory DIR (mode 0700) a test CA certificate, a server
        certificate for the --host names, a client certificate and key per role
        (registration, investigator, admin), tokens.txt (a bearer token per role, valid 90
        days), audit.key (32 random bytes that authenticate the audit trail and
        pseudonymise the ID numbers and phone numbers in it) and security.toml (the
        certificates' roles, the tokens' SHA-256 only, the --token-address where the server
        takes bearer tokens over TLS, and [audit] key_file), which `dedup serve --security`
        reads. Every secret is created with mode 0600. The CA's
        private key goes to a directory of its own (DIR-ca, or --ca-dir): it can mint a
        certificate of any role, so it belongs offline, never on the server. For local use
        and tests: production deployments bring their own CA and tokens.
        """, ["dedup keys keys --host localhost --host dedup.internal",
              "dedup keys /etc/dedup/keys --ca-dir /media/offline/dedup-ca"], keys_command)
    keys.add_argument("out", type=Path, metavar="DIR")
    keys.add_argument("--host", action="append", default=None,
                      help="names the server certificate is valid for (default localhost, "
                      "127.0.0.1)")
    keys.add_argument("--token-address", default="127.0.0.1:50052")
    keys.add_argument("--ca-dir", type=Path, default=None,
                      help="a new directory for the CA's private key (default DIR-ca)")


def keys_command(args: argparse.Namespace) -> int:
    from dedup.ops.keys import make_keys

    files = make_keys(args.out, tuple(args.host or ("localhost", "127.0.0.1")),
                      args.token_address, ca_dir=args.ca_dir)
    ca_key = files[-1]
    print(f"wrote {len(files) - 1} files to {args.out}: "
          + ", ".join(f.name for f in files[:-1]))
    print(f"wrote the CA's private key to {ca_key}: move it off this host, to offline "
          "storage; the server does not need it")
    print(f"serve: dedup serve --security {args.out / 'security.toml'}; clients: --ca "
          f"{args.out / 'ca.crt'} with --cert/--key <role>.crt/.key, or a token from "
          f"{args.out / 'tokens.txt'} against the token address {args.token_address}")
    print("these are test keys: keep tokens.txt and the *.key files private; give the "
          "auditors a copy of audit.key (`dedup audit verify --key`)")
    return 0
