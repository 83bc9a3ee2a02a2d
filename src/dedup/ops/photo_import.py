"""`dedup import-photos`: enrol a folder of captures listed in a CSV manifest.

Each row is one Enroll call with the photo. A registration_id already enrolled counts as
done, so an interrupted import is resumed by running it again. Rejected rows are
summarised by reason.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.files import open_private

REQUIRED_COLUMNS = ("file", "registration_id", "id_number")
RETRIES = 5


@dataclass
class ImportSummary:
    enrolled: int = 0
    already_enrolled: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # check_first verdicts
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def report(self) -> str:
        lines = [f"enrolled {self.enrolled}, already enrolled {self.already_enrolled}, "
                 f"refused by the check {sum(self.refused.values())}, "
                 f"rejected {len(self.rejected)}"]
        lines += [f"  refused {verdict}: {count}" for verdict, count in self.refused.items()]
        reasons = Counter(re.sub(r"\d+(\.\d+)?", "N", reason) for _, reason in self.rejected)
        lines += [f"  rejected {count} x {reason}" for reason, count in reasons.most_common()]
        return "\n".join(lines)

    def write_rejects(self, path: Path) -> None:
        """Mode 0600: a reason can name a phone number or registration ID."""
        with open_private(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "reason"])
            writer.writerows(self.rejected)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: the manifest lacks the column(s) {', '.join(missing)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def import_photos(stub: pb_grpc.FaceDedupStub, directory: Path, manifest: Path,
                  check_first: bool = False, largest_face: bool = False, parallel: int = 4,
                  timeout: float = 30.0) -> ImportSummary:
    rows = read_manifest(manifest)
    summary = ImportSummary()

    def enrol(row: dict[str, str]) -> tuple[dict[str, str], str, pb.EnrollResponse | None]:
        path = directory / row["file"]
        try:
            image = path.read_bytes()
        except OSError as error:
            return row, f"cannot read the file ({error.strerror})", None
        request = pb.EnrollRequest(
            registration=pb.Registration(
                registration_id=row["registration_id"], id_number=row["id_number"],
                msisdn=row.get("msisdn", ""), carrier=row.get("carrier", ""),
                region=row.get("region", "")),
            face=pb.Face(image=image, use_largest_face=largest_face),
            check_first=check_first,
        )
        return _call_with_retries(stub, request, row, timeout)

    with ThreadPoolExecutor(parallel) as pool:
        for row, outcome, response in tqdm(pool.map(enrol, rows), total=len(rows),
                                           desc="importing photos", unit="photo"):
            if outcome == "enrolled":
                summary.enrolled += 1
            elif outcome == "already":
                summary.already_enrolled += 1
            elif response is not None and not response.enrolled:
                summary.refused[pb.Verdict.Name(response.check.verdict)] += 1
            else:
                summary.rejected.append((row["file"], outcome))
    return summary


def _call_with_retries(stub: pb_grpc.FaceDedupStub, request: pb.EnrollRequest,
                       row: dict[str, str], timeout: float
                       ) -> tuple[dict[str, str], str, pb.EnrollResponse | None]:
    for attempt in range(RETRIES):
        try:
            response = stub.Enroll(request, timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.ALREADY_EXISTS and "registration_id" in error.details():
                return row, "already", None
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) \
                    and attempt + 1 < RETRIES:
                time.sleep(0.2 * 2**attempt)  # the photo queue is full: back off
                continue
            return row, f"{code.name}: {error.details()}", None
        return row, "enrolled" if response.enrolled else "refused", response
    return row, "retries exhausted", None
