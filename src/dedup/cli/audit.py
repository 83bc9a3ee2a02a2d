"""`dedup audit verify|export|anchor`: check, export or anchor the audit trail (hash-chained
records authenticated with the audit key), of an embedded data directory or of the Milvus
backend (one chain per node process)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dedup.cli.offline import open_store_reader
from dedup.cli.subcommand import Subcommands, add_subcommand
from dedup.core.audit_anchor import Anchor
from dedup.core.audit_chain import AuditKey, Verification
from dedup.core.files import write_private
from dedup.core.settings import MilvusConfig, milvus_token

Records = list[tuple[int, bytes]]


def register(commands: Subcommands) -> None:
    audit = add_subcommand(commands, "audit", "check, export or anchor the audit trail", """
        Works on the audit trail: every erasure and every investigator's read is a record
        (who called, the method, case ID, purpose, query and the registration IDs returned)
        holding the SHA-256 hash of the record before it and a MAC under the audit key (the
        security file's [audit] key_file), so a record edited, removed or reordered
        afterwards breaks the chain, and one re-hashed without the key fails its MAC. ID
        numbers and phone numbers appear as pseudonyms made with the key. `verify` checks
        the chain(s), `export` writes the records as JSON lines, `anchor` appends the
        chain's head to a file kept elsewhere. The trail of an embedded data directory
        (read-only, also beside a running server) or, with --milvus-uri, of the Milvus
        backend.
        """, ["dedup audit verify index_data --key keys/audit.key --anchor /mnt/worm/anchors",
              "dedup audit export index_data --since 2024-06-01 --out june.jsonl"])
    actions = audit.add_subparsers(required=True, metavar="ACTION")
    _add_verify(actions)
    _add_export(actions)
    _add_anchor(actions)


def _add_verify(actions: Subcommands) -> None:
    verify = add_subcommand(actions, "verify", "check the chain(s), MACs and anchors", """
        Recomputes every record's hash and its link to the record before, with --key every
        record's MAC, and with --anchor that the trail still holds every record an anchor
        saw (so a trail cut short or rolled back to an older copy fails), and prints
        whether the trail is intact or the first record where it breaks and why (for
        Milvus, one line per node's chain). Exit status 1 when any check fails.
        """, ["dedup audit verify index_data --key keys/audit.key --anchor anchors.jsonl",
              "dedup audit verify --milvus-uri milvus://milvus:19530 --key audit.key"],
        audit_verify_command)
    _trail_arguments(verify)
    verify.add_argument("--key", type=Path, metavar="FILE",
                        help="the audit key file: check every record's MAC (and anchors')")
    verify.add_argument("--anchor", type=Path, metavar="FILE",
                        help="an anchor file (`dedup serve --audit-anchor`, `audit anchor`)")


def _add_export(actions: Subcommands) -> None:
    export = add_subcommand(actions, "export", "records as JSON lines", """
        Writes the audit records with --since <= time < --until (all by default) as JSON
        lines, oldest first, to --out (created 0600) or standard output: one record a line
        with its sequence, time, caller and role, method, case ID, purpose, query, the
        registration IDs returned, its own and the previous record's hash, and its MAC.
        --id-number / --msisdn (with --key) keep the records whose query names that person:
        the pseudonym is computed from the value with the key.
        """, ["dedup audit export index_data --since 2024-06-01 --until 2024-07-01 "
              "--out june.jsonl",
              "dedup audit export index_data --key keys/audit.key --id-number 110101199003070015"],
        audit_export_command)
    _trail_arguments(export)
    export.add_argument("--since", type=_moment, help="ISO date-time (UTC unless given)")
    export.add_argument("--until", type=_moment, help="ISO date-time, exclusive")
    export.add_argument("--out", type=Path, help="file to write (default stdout)")
    export.add_argument("--key", type=Path, metavar="FILE", help="the audit key file")
    export.add_argument("--id-number", action="append", default=[], metavar="ID",
                        help="only records about this ID number (needs --key; repeatable)")
    export.add_argument("--msisdn", action="append", default=[], metavar="MSISDN",
                        help="only records about this phone number (needs --key; repeatable)")


def _add_anchor(actions: Subcommands) -> None:
    anchor = add_subcommand(actions, "anchor", "append the chain's head to an anchor file", """
        Verifies the trail with --key, then appends one JSON line per chain (time, seq and
        hash of its last record, a MAC under the key; for Milvus the chain's name) to --out
        (created 0600, fsynced). Keep the file off the data directory's host, or send the
        line to append-only storage: `verify --anchor` then catches a trail cut short or
        rolled back to an older copy. A running server anchors on its own schedule too
        (`dedup serve --audit-anchor`).
        """, ["dedup audit anchor index_data --key keys/audit.key --out /mnt/worm/anchors"],
        audit_anchor_command)
    _trail_arguments(anchor)
    anchor.add_argument("--key", type=Path, metavar="FILE", required=True,
                        help="the audit key file: verifies the trail, authenticates the anchor")
    anchor.add_argument("--out", type=Path, metavar="FILE", required=True,
                        help="the anchor file to append to (keep it off this host)")


def _trail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, nargs="?", metavar="DATA_DIR",
                        help="an embedded data directory; or give --milvus-uri")
    parser.add_argument("--milvus-uri", default="", metavar="URI",
                        help="the Milvus backend's trail (one chain per node process)")
    parser.add_argument("--milvus-prefix", default="dedup")


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _key(path: Path | None) -> AuditKey | None:
    from dedup.core.audit_chain import read_audit_key

    try:
        return None if path is None else read_audit_key(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"dedup audit: --key: {error}") from error


@dataclass(frozen=True)
class _Trail:
    chains: dict[str, Records]  # "" is a data directory's one chain
    head: tuple[int, bytes] | None  # the head kept beside a data directory's records


def _read_trail(args: argparse.Namespace) -> _Trail:
    """DATA_DIR's trail in one read, or with --milvus-uri every node's chain."""
    if bool(args.milvus_uri) == (args.data_dir is not None):
        raise SystemExit("dedup audit: give DATA_DIR or --milvus-uri, one of them")
    if args.milvus_uri:
        from dedup.gallery.milvus import read_audit_chains

        return _Trail(read_audit_chains(MilvusConfig(
            uri=args.milvus_uri, token=milvus_token(), prefix=args.milvus_prefix)), None)
    store = open_store_reader(args.data_dir)
    try:
        records, head = store.audit_trail()
        return _Trail({"": records}, head)
    finally:
        store.close()


def _verify(trail: _Trail, key: AuditKey | None, anchors: list[Anchor]
            ) -> dict[str, Verification]:
    from dedup.core.audit_anchor import pinned_by_chain
    from dedup.core.audit_chain import verify, verify_chains

    pinned = pinned_by_chain(anchors)
    if trail.head is not None:
        return {"": verify(trail.chains[""], trail.head, key, pinned.get("", []))}
    pinned.pop("", None)  # a data directory's anchors: not these chains'
    return verify_chains(trail.chains, key, pinned)


def _anchors(path: Path | None, key: AuditKey | None) -> list[Anchor]:
    from dedup.core.audit_anchor import forged, parse_anchors

    if path is None:
        return []
    try:
        anchors = parse_anchors(path.read_text(), str(path))
    except (OSError, ValueError) as error:
        raise SystemExit(f"dedup audit: --anchor: {error}") from error
    bad = forged(anchors, key) if key is not None else []
    if bad:
        raise SystemExit(f"dedup audit: {path}: the anchor of {bad[0].time} (record "
                         f"{bad[0].seq}) is not authentic: its MAC is not the key's; "
                         f"{len(bad)} such anchor(s)")
    return anchors


def audit_verify_command(args: argparse.Namespace) -> int:
    key = _key(args.key)
    results = _verify(_read_trail(args), key, _anchors(args.anchor, key))
    broken = _report(results, key is not None)
    if key is None:
        print("MACs not checked: give --key FILE to tell a trail rewritten and re-hashed")
    return 1 if broken else 0


def _report(results: dict[str, Verification], keyed: bool) -> int:
    """Prints each chain's result and the summary; how many are broken."""
    checks = ("each chained to the one before" + (", its MAC valid" if keyed else ""))
    anchors = sum(result.anchors for result in results.values())
    pinned = f"; {anchors} anchor(s) agree" if anchors else ""
    if set(results) == {""}:
        result = results[""]
        if result.intact:
            print(f"audit trail intact: {result.records} records, {checks}{pinned}")
        else:
            print(f"audit trail BROKEN at record {result.first_broken}: {result.reason}")
        return 0 if result.intact else 1
    broken = 0
    for chain, result in sorted(results.items()):
        if result.intact:
            print(f"chain {chain}: intact, {result.records} records")
        else:
            broken += 1
            print(f"chain {chain}: BROKEN at record {result.first_broken}: {result.reason}")
    total = sum(result.records for result in results.values())
    print(f"audit trail {'BROKEN' if broken else 'intact'}: {len(results)} chain(s), "
          f"{total} records" + (f", {broken} broken" if broken else f", {checks}{pinned}"))
    return broken


def _about(args: argparse.Namespace) -> frozenset[str]:
    """The pseudonyms of the people --id-number / --msisdn name."""
    if not (args.id_number or args.msisdn):
        return frozenset()
    key = _key(args.key)
    if key is None:
        raise SystemExit("dedup audit export: --id-number and --msisdn need --key FILE: the "
                         "trail holds pseudonyms made with it, not the values")
    return frozenset([*(key.pseudonym("id_number", value) for value in args.id_number),
                      *(key.pseudonym("msisdn", value) for value in args.msisdn)])


def audit_export_command(args: argparse.Namespace) -> int:
    from dedup.core.audit_chain import export

    about = _about(args)
    trail = _read_trail(args)
    records = [record for chain in trail.chains.values() for record in chain]
    lines = list(export(records, args.since, args.until, about))
    if trail.head is None:  # Milvus: the node chains interleaved by time
        lines.sort(key=lambda line: json.loads(line)["time"])
    text = "".join(line + "\n" for line in lines)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_private(args.out, text)  # mode 0600: callers, cases, pseudonyms
        print(f"wrote {len(lines)} audit records to {args.out}")
    return 0


def audit_anchor_command(args: argparse.Namespace) -> int:
    from dedup.core.audit_anchor import append_anchors, make_anchor

    key = _key(args.key)
    assert key is not None
    trail = _read_trail(args)
    if _report(_verify(trail, key, []), keyed=True):
        print("not anchored: a broken trail is not pinned")
        return 1
    heads = _heads(trail)
    anchors = [make_anchor(key, sequence, digest, chain)
               for chain, (sequence, digest) in sorted(heads.items()) if sequence]
    append_anchors(args.out, anchors)
    for anchor in anchors:
        print(anchor.line())
    print(f"appended {len(anchors)} anchor(s) to {args.out}")
    return 0


def _heads(trail: _Trail) -> dict[str, tuple[int, bytes]]:
    """Each chain's last (sequence, hash)."""
    if trail.head is not None:
        return {"": trail.head}
    return {chain: (records[-1][0], bytes.fromhex(json.loads(records[-1][1])["hash"]))
            for chain, records in trail.chains.items() if records}
