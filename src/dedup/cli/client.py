"""The client commands: one call (or a stream of calls) to a running server, its reply printed:
enroll, check, delete, get, stats, index-info and import-photos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.cli.channel import add_client_subcommand, open_channel, open_dedup_stub, print_message
from dedup.cli.subcommand import Subcommands

EMBEDDING_HELP = "a .npy file, or a text file of numbers (JSON list, commas or white space)"


def register(commands: Subcommands) -> None:
    _register_enroll_and_check(commands)
    delete = add_client_subcommand(commands, "delete", "erase registrations by one key", """
        Erases every registration holding the given registration ID, ID number or phone
        number (Delete) and prints the reply as JSON: the erased registration IDs, the hash
        of the erasure's audit record, and the times by which the store is compacted and
        the index checkpoint rewritten without them (`dedup compact` compacts at once).
        --case-id and --purpose, the erasure's reason (a subject's request, a case), are
        recorded in its audit record.
        """, ["dedup delete --msisdn +8613800000001",
              "dedup delete --id-number 110101199003077777 --case-id ERASURE-2024-118 "
              "--purpose 'subject request (PIPL art. 47)'"], delete_command)
    delete_keys = delete.add_mutually_exclusive_group(required=True)
    for name in ("registration-id", "id-number", "msisdn"):
        delete_keys.add_argument(f"--{name}")
    for name, what in (("case-id", "the case or request"), ("purpose", "the reason")):
        delete.add_argument(f"--{name}", default="", help=f"{what} of the erasure (sent as "
                            f"x-{name} metadata; both or neither; audited)")

    get = add_client_subcommand(commands, "get", "show one registration", """
        Prints one registration by its registration ID (GetRegistration) as JSON: its ID
        number, phone number, carrier, region, enrolment time and embedding model, never
        the embedding itself. A registration that does not exist is NOT_FOUND (exit 1).
        """, ["dedup get order-1001",
              "dedup get order-1001 --ca ca.crt --cert admin.crt --key admin.key "
              "--case-id CASE-7 --purpose 'duplicate review'"], get_command)
    get.add_argument("registration_id")
    _case_arguments(get)

    add_client_subcommand(commands, "stats", "gallery size, index and policy", """
        Prints the server's Stats as JSON: how many registrations and distinct ID numbers
        the gallery holds, the index in use, the verdict policy in force, the face model,
        and (when `dedup calibrate --record` was run) the FPIR the thresholds imply at the
        gallery's size.
        """, ["dedup stats --server 127.0.0.1:50051"], stats_command)

    add_client_subcommand(commands, "index-info", "the index in use", """
        Prints the index the server searches (IndexAdmin.GetIndexInfo) as JSON: its type
        (and the configured one), how many vectors it holds, whether its scores are exact
        or re-ranked, its search parameters and whether a rebuild is running.
        """, ["dedup index-info"], index_info_command)
    _register_import_photos(commands)


def _register_enroll_and_check(commands: Subcommands) -> None:
    enroll = add_client_subcommand(commands, "enroll", "enrol a registration", """
        Stores one registration (Enroll) with a face given as an embedding or a photo, and
        prints the reply as JSON. With --check-first the server checks the face first and
        stores it, atomically, only when the verdict is CLEAR or SAME_PERSON. Exit status
        0 when stored, 2 when not.
        """, ["dedup enroll --registration-id order-1001 --id-number ID123 "
              "--msisdn +8613800000001 --image applicant.jpg --check-first"], enroll_command)
    for name in ("registration-id", "id-number"):
        enroll.add_argument(f"--{name}", required=True)
    for name in ("msisdn", "carrier", "region"):
        enroll.add_argument(f"--{name}", default="")
    _face_arguments(enroll)
    enroll.add_argument("--check-first", action="store_true",
                        help="check first; store only on CLEAR or SAME_PERSON (required of a "
                        "registration-role credential, which also sends --image, unless the "
                        "server allows otherwise)")

    check = add_client_subcommand(commands, "check", "check a face against the gallery", """
        Searches the whole gallery for a face (Check, read-only) and prints the verdict
        (CLEAR, SAME_PERSON, REVIEW, DUPLICATE_IDENTITY, SIM_LIMIT_EXCEEDED or
        ID_FACE_MISMATCH) with the matching registrations, best first, as JSON. With
        --claimed-id-number the per-ID rules apply too.
        """, ["dedup check --image applicant.jpg --claimed-id-number ID123",
              "dedup check --embedding face.npy --max-candidates 20"], check_command)
    _face_arguments(check)
    check.add_argument("--claimed-id-number", default="",
                       help="the ID number the applicant presents (required of the "
                       "registration role)")
    check.add_argument("--max-candidates", type=int, default=0)
    _case_arguments(check)


def _register_import_photos(commands: Subcommands) -> None:
    photos = add_client_subcommand(commands, "import-photos", "enrol a folder of photos", """
        Enrols every photo a CSV manifest lists (one Enroll call per row, --parallel in
        flight) and prints a summary of what was enrolled and why rows were rejected;
        --rejects writes the rejected rows and their reasons to a CSV. A registration ID
        already enrolled counts as done, so an interrupted import resumes when run again.
        Exit status 2 when any row was rejected.
        """, ["dedup import-photos photos/ --manifest photos/manifest.csv "
              "--rejects rejects.csv"], import_photos_command)
    photos.add_argument("directory", type=Path)
    photos.add_argument("--manifest", type=Path, required=True,
                        help="CSV with columns file, registration_id, id_number "
                        "(and optionally msisdn, carrier, region)")
    photos.add_argument("--check-first", action="store_true",
                        help="check each first; store only on CLEAR or SAME_PERSON (required "
                        "of a registration-role credential unless the server allows otherwise)")
    photos.add_argument("--largest-face", action="store_true")
    photos.add_argument("--parallel", type=int, default=4, help="calls in flight")
    photos.add_argument("--rejects", type=Path, help="write rejected rows and why to this CSV")


def _case_arguments(parser: argparse.ArgumentParser) -> None:
    for name, what in (("case-id", "the case"), ("purpose", "the purpose")):
        parser.add_argument(f"--{name}", default="", help=f"{what} the read is for (sent as "
                            f"x-{name} metadata; required of investigators and admins by a "
                            "server with a security file, and audited)")


def case_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    given = (("x-case-id", args.case_id), ("x-purpose", args.purpose))
    return tuple((name, value) for name, value in given if value)


def _face_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embedding", type=Path, help=EMBEDDING_HELP)
    source.add_argument("--image", type=Path, help="a JPEG or PNG capture")
    parser.add_argument("--largest-face", action="store_true",
                        help="with several faces in the image, use the largest")


def load_embedding(path: Path) -> list[float]:
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
    else:
        text = path.read_text().strip()
        values = np.asarray(json.loads(text) if text.startswith("[")
                            else text.replace(",", " ").split(), dtype=np.float32)
    return [float(value) for value in np.ravel(values)]


def face_from_args(args: argparse.Namespace) -> pb.Face:
    if args.image is not None:
        return pb.Face(image=args.image.read_bytes(), use_largest_face=args.largest_face)
    return pb.Face(embedding=pb.Embedding(values=load_embedding(args.embedding)))


def enroll_command(args: argparse.Namespace) -> int:
    request = pb.EnrollRequest(
        registration=pb.Registration(
            registration_id=args.registration_id, id_number=args.id_number,
            msisdn=args.msisdn, carrier=args.carrier, region=args.region,
        ),
        face=face_from_args(args),
        check_first=args.check_first,
    )
    channel, stub = open_dedup_stub(args)
    with channel:
        response = stub.Enroll(request, timeout=args.timeout)
    print_message(response)
    return 0 if response.enrolled else 2


def check_command(args: argparse.Namespace) -> int:
    request = pb.CheckRequest(
        face=face_from_args(args),
        claimed_id_number=args.claimed_id_number,
        max_candidates=args.max_candidates,
    )
    channel, stub = open_dedup_stub(args)
    with channel:
        print_message(stub.Check(request, timeout=args.timeout, metadata=case_metadata(args)))
    return 0


def delete_command(args: argparse.Namespace) -> int:
    if args.registration_id is not None:
        request = pb.DeleteRequest(registration_id=args.registration_id)
    elif args.id_number is not None:
        request = pb.DeleteRequest(id_number=args.id_number)
    else:
        request = pb.DeleteRequest(msisdn=args.msisdn)
    channel, stub = open_dedup_stub(args)
    with channel:
        print_message(stub.Delete(request, timeout=args.timeout, metadata=case_metadata(args)))
    return 0


def get_command(args: argparse.Namespace) -> int:
    channel, stub = open_dedup_stub(args)
    with channel:
        print_message(stub.GetRegistration(
            pb.GetRegistrationRequest(registration_id=args.registration_id), timeout=args.timeout,
            metadata=case_metadata(args)))
    return 0


def stats_command(args: argparse.Namespace) -> int:
    channel, stub = open_dedup_stub(args)
    with channel:
        print_message(stub.Stats(pb.StatsRequest(), timeout=args.timeout))
    return 0


def index_info_command(args: argparse.Namespace) -> int:
    channel = open_channel(args)
    with channel:
        print_message(pb_grpc.IndexAdminStub(channel).GetIndexInfo(pb.GetIndexInfoRequest(),
                                                                   timeout=args.timeout))
    return 0


def import_photos_command(args: argparse.Namespace) -> int:
    from dedup.ops.photo_import import import_photos

    channel, stub = open_dedup_stub(args)
    with channel:
        summary = import_photos(stub, args.directory, args.manifest, check_first=args.check_first,
                                largest_face=args.largest_face, parallel=args.parallel,
                                timeout=args.timeout)
    print(summary.report())
    if args.rejects is not None:
        summary.write_rejects(args.rejects)
        print(f"rejected rows written to {args.rejects}")
    return 0 if not summary.rejected else 2
