"""`dedup clusters`: the investigator's sweep of the whole gallery for faces registered under
several ID numbers (Investigate.FindClusters), written to a file."""

from __future__ import annotations

import argparse
from pathlib import Path

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.cli.channel import add_client_subcommand, open_channel
from dedup.cli.subcommand import Subcommands


def register(commands: Subcommands) -> None:
    clusters = add_client_subcommand(commands, "clusters", "every group of registrations "
                                     "sharing one face across ID numbers "
                                     "(Investigate.FindClusters)", """
        Asks a server for every group of registrations that share one face (linked by
        scores of at least --min-score) across at least --min-distinct-id-numbers ID
        numbers, over the whole gallery, and writes each cluster as it arrives: one JSON
        object a line (.jsonl) or one CSV row per registration with its cluster number
        (.csv). The call needs the investigator (or admin) role and is recorded in the
        audit trail under --case-id and --purpose.
        """, ["dedup clusters --out clusters.csv --case-id CASE-17 --purpose "
              "\"SIM fraud review\" --ca keys/ca.crt --cert keys/investigator.crt "
              "--key keys/investigator.key"], clusters_command)
    clusters.add_argument("--out", type=Path, required=True, help=".jsonl or .csv")
    clusters.add_argument("--case-id", required=True)
    clusters.add_argument("--purpose", required=True)
    clusters.add_argument("--min-distinct-id-numbers", type=int, default=2)
    clusters.add_argument("--min-score", type=float, default=None,
                          help="default: the server's match threshold")


def clusters_command(args: argparse.Namespace) -> int:
    from dedup.ops.cluster_export import write_clusters

    request = pb.FindClustersRequest(case_id=args.case_id, purpose=args.purpose,
                                     min_distinct_id_numbers=args.min_distinct_id_numbers)
    if args.min_score is not None:
        request.min_score = args.min_score
    with open_channel(args) as channel:
        updates = pb_grpc.InvestigateStub(channel).FindClusters(request)
        found = write_clusters(updates, args.out)
    print(f"wrote {found} clusters to {args.out}")
    return 0
