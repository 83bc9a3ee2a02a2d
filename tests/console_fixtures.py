"""What the console's tests run against: a real `dedup serve` with `dedup keys` credentials
holding a small gallery of real faces (cut at test time from the photos packaged with
insightface) with planted duplicates, `dedup console` as a child process, headless Debian
Chromium driven by Selenium, and screenshots of the pages."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
from photos import YAO_IN_PLAYERS, YAOMING, Crop, encode
from secure import channel

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The planted duplicates: Yao Ming's face in players.jpg under his own ID number, and his
# portrait (yaoming.jpg) under a second one; one face of t1.jpg again, mirrored, under a
# second ID number.
YAO_ID, YAO_SECOND_ID, YAO_SECOND = "110101198009120011", "310104198009120022", "order-yao-2"
T1_SECOND_ID, T1_SECOND = "440301199001010033", "order-t1-0b"


def token_port(lines: list[str], timeout: float = 30) -> int:
    """The port of the server's token listener, from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if match := re.search(r"bearer tokens accepted over TLS on port (\d+)", line):
                return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError("no token listener in the server's log:\n" + "".join(lines))


@dataclass
class Gallery:
    """Who is enrolled: registration_id -> ID number, and the planted pairs."""

    id_numbers: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)  # what each was enrolled from
    yao: str = ""  # Yao Ming's registration from players.jpg

    def enroll(self, stub: pb_grpc.FaceDedupStub, registration_id: str, id_number: str,
               image: bytes, carrier: str = "CMCC", region: str = "Beijing") -> bool:
        msisdn = f"+86138{len(self.images) + 1:08d}"
        try:
            stub.Enroll(pb.EnrollRequest(
                registration=pb.Registration(registration_id=registration_id,
                                             id_number=id_number, msisdn=msisdn,
                                             carrier=carrier, region=region),
                face=pb.Face(image=image)), timeout=60)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            return False  # a crop the capture rules or the quality gate refuse
        self.id_numbers[registration_id] = id_number
        self.images[registration_id] = image
        return True


def plant_gallery(port: int, keys: Path, crops: dict[str, list[Crop]]) -> Gallery:
    """Every usable face of players.jpg and t1.jpg under its own ID number, and the planted
    duplicates; enrolled by the admin over mutual TLS."""
    gallery = Gallery()
    with channel(port, keys, role="admin") as admin:
        stub = pb_grpc.FaceDedupStub(admin)
        for i, crop in enumerate(crops["players"]):
            registration_id = f"order-p{i:02d}"
            id_number = YAO_ID if crop.contains(YAO_IN_PLAYERS) else f"1101011990010{i:05d}"
            if gallery.enroll(stub, registration_id, id_number, crop.path.read_bytes()) \
                    and id_number == YAO_ID:
                gallery.yao = registration_id
        for i, crop in enumerate(crops["t1"]):
            gallery.enroll(stub, f"order-t1-{i}", f"4403011985050{i:05d}",
                           crop.path.read_bytes(), carrier="CU", region="Shenzhen")
        assert gallery.yao, "Yao Ming's face in players.jpg must be enrolled"
        assert gallery.enroll(stub, YAO_SECOND, YAO_SECOND_ID, YAOMING.read_bytes(),
                              carrier="CT", region="Shanghai")
        mirrored = encode(cv2.flip(cv2.imread(str(crops["t1"][0].path)), 1))
        assert gallery.enroll(stub, T1_SECOND, T1_SECOND_ID, mirrored, carrier="CT")
    return gallery


class ConsoleProcess:
    """`dedup console` as a child process; `url` once it listens."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dedup", "console", "--address", "127.0.0.1:0", *args],
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = self._wait_for_url()
        threading.Thread(target=self._collect, daemon=True).start()

    def _wait_for_url(self) -> str:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := re.search(r"console on (https?://127\.0\.0\.1:\d+)/", line):
                return match.group(1)
        raise AssertionError(f"the console did not start (exit code {self.process.wait()}):\n"
                             + "".join(self.lines))

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def start_browser(downloads: Path):
    """Headless Debian Chromium through Debian's chromedriver (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1440,900", "--lang=en-US",
                     "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def audit_records(data_dir: Path) -> list[dict]:
    """The server's audit trail, through `dedup audit export` (beside the running server)."""
    import json

    done = subprocess.run([sys.executable, "-m", "dedup", "audit", "export", str(data_dir)],
                          capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]
