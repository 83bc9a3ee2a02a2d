"""How the client commands reach a running server: the connection options, the channel (plain
or TLS, with a client certificate or a bearer token) and replies printed as JSON."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.cli.subcommand import Command, Subcommands, add_subcommand

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "DEDUP_TOKEN"


def add_client_subcommand(commands: Subcommands, name: str, summary: str, description: str,
                          examples: Sequence[str], command: Command) -> argparse.ArgumentParser:
    """A subcommand that calls a server, with the options saying which one and how."""
    parser = add_subcommand(commands, name, summary, description, examples, command)
    parser.add_argument("--server", default=DEFAULT_ADDRESS, help="HOST:PORT of a dedup server")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--ca", type=Path, help="the CA certificate that signed the server's "
                        "(TLS; without it the channel is plain, for a local server)")
    parser.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, help="client certificate's private key")
    parser.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")
    return parser


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain to a local unauthenticated server; TLS with --ca (a client certificate with
    --cert/--key, a bearer token with --token or $DEDUP_TOKEN)."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if args.ca is None:
        if token:
            raise ValueError("--token needs TLS: give --ca too")
        return grpc.insecure_channel(args.server)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes(),
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None)
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(args.server, credentials)


def open_dedup_stub(args: argparse.Namespace) -> tuple[grpc.Channel, pb_grpc.FaceDedupStub]:
    channel = open_channel(args)
    return channel, pb_grpc.FaceDedupStub(channel)


def print_message(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True))
