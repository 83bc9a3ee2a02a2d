"""The investigators' console in a real browser (headless Debian Chromium through Selenium)
against a real `dedup serve` with `dedup keys` credentials and a gallery of real faces with
planted duplicates; every step checked in the server's audit trail (`dedup audit export`).

Screenshots of each page go to a temporary directory, or to $DEDUP_CONSOLE_SCREENSHOTS
(`make console-screenshots` writes docs/screenshots/ that way)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import pytest
from console_fixtures import (
    CHROMEDRIVER,
    CHROMIUM,
    T1_SECOND,
    YAO_ID,
    YAO_SECOND,
    YAO_SECOND_ID,
    ConsoleProcess,
    Gallery,
    audit_records,
    plant_gallery,
    start_browser,
    token_port,
)
from photos import YAOMING, encode
from processes import ServerProcess
from secure import channel, tokens

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (.ci/run installs "
                       "them)"),
    pytest.mark.timeout(180),
]
CASE, PURPOSE = "CASE-2026-0417", "SIM ring review"
UPLOAD_LIMIT = 1_000_000


class PhotoServer:
    """The carrier's photo system: serves each registration's capture, and notes who asked."""

    def __init__(self, photos: dict[str, bytes]) -> None:
        asked = self.asked = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                asked.append((self.path, self.headers.get("User-Agent", "")))
                data = photos.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if data else 404)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@dataclass
class Stack:
    server: ServerProcess
    data_dir: Path
    gallery: Gallery
    console: ConsoleProcess
    photos: PhotoServer
    browser: Any
    tokens: dict[str, str]
    work: Path
    shots: Path

    def shot(self, name: str) -> None:
        """A screenshot of the page; a small palette copy for the docs when asked for."""
        path = self.shots / f"{name}.png"
        self.browser.save_screenshot(str(path))
        wanted = os.environ.get("DEDUP_CONSOLE_SCREENSHOTS")
        if wanted:
            from PIL import Image

            Path(wanted).mkdir(parents=True, exist_ok=True)
            with Image.open(path) as image:
                image.convert("RGB").quantize(colors=128).save(Path(wanted) / path.name,
                                                               optimize=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, keys, crops) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("console")
    server = ServerProcess(work / "data", "--security", str(keys / "security.toml"))
    browser = console = None
    try:
        gallery = plant_gallery(server.port, keys, crops)
        photos = PhotoServer(gallery.images)
        console = ConsoleProcess(
            "--server", f"127.0.0.1:{token_port(server.lines)}", "--ca", str(keys / "ca.crt"),
            "--photo-url-template", photos.origin + "/photos/{registration_id}",
            "--max-upload-bytes", str(UPLOAD_LIMIT), "--audit-data-dir", str(work / "data"),
            "--audit-key", str(keys / "audit.key"))
        browser = start_browser(work / "downloads")
        shots = work / "screenshots"
        shots.mkdir()
        yield Stack(server, work / "data", gallery, console, photos, browser, tokens(keys),
                    work, shots)
    finally:
        if browser is not None:
            browser.quit()
        if console is not None:
            console.stop()
        server.process.send_signal(signal.SIGTERM)
        server.wait()


def wait_for(browser: Any, condition: Any, timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def by_id(browser: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return wait_for(browser, lambda d: d.find_element(By.ID, element_id))


def css(browser: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def submit(browser: Any, button_id: str) -> None:
    """Clicks a form's button and waits for the page it leads to."""
    old = browser.find_element("tag name", "html")
    by_id(browser, button_id).click()
    wait_for(browser, lambda d: old != d.find_element("tag name", "html"))
    wait_for(browser, lambda d: d.execute_script("return document.readyState") == "complete")


def sign_in(stack: Stack, role: str) -> tuple[dict | None, dict | None]:
    """Signs in with the role's token; the session cookie before and after."""
    browser = stack.browser
    browser.delete_all_cookies()
    browser.get(stack.console.url + "/signin")
    before = browser.get_cookie("dedup-console")
    by_id(browser, "token").send_keys(stack.tokens[role])
    submit(browser, "signin")
    return before, browser.get_cookie("dedup-console")


def open_case(stack: Stack) -> None:
    browser = stack.browser
    by_id(browser, "case_id").clear()
    by_id(browser, "case_id").send_keys(CASE)
    by_id(browser, "purpose").clear()
    by_id(browser, "purpose").send_keys(PURPOSE)
    submit(browser, "open-case")
    assert browser.current_url.endswith("/search")


def result_rows(browser: Any) -> list[tuple[str, str, float]]:
    return [(row.get_attribute("data-registration-id"), row.get_attribute("data-id-number"),
             float(row.find_element("css selector", ".value").text))
            for row in css(browser, "tr.match")]


def records_of_case(stack: Stack) -> list[dict]:
    return [r for r in audit_records(stack.data_dir) if r["case_id"] == CASE]


def test_an_investigator_searches_links_sweeps_and_settles(stack: Stack) -> None:
    browser = stack.browser
    before, after = sign_in(stack, "investigator")
    # No session before sign-in (the sign-in page keeps none), one made at sign-in: an id
    # planted before it is worth nothing.
    assert before is None and after is not None and after["value"]
    assert after["httpOnly"] and after["sameSite"] == "Strict"
    assert after["httpOnly"] and after["sameSite"] == "Strict"
    assert stack.tokens["investigator"] not in browser.page_source
    stack.shot("case")
    open_case(stack)
    assert by_id(browser, "case-id").text == CASE
    search_by_photo(stack)
    follow_links(stack)
    sweep(stack)
    settle_yao(stack)
    assert by_id(browser, "settled").text.startswith(f"{YAO_SECOND} and {stack.gallery.yao}")
    stack.shot("settled")
    search_by_registration(stack, YAO_SECOND)
    first = css(browser, "tr.match")[0]
    assert first.get_attribute("data-registration-id") == stack.gallery.yao
    assert first.find_element("css selector", ".settled").text == "settled: same person"
    logged = [entry["message"] for entry in browser.get_log("browser")]
    assert not [line for line in logged if "Content Security Policy" in line
                or entry_is_error(line)], logged
    check_the_trail(stack)
    browser.get(f"{stack.console.url}/registrations/{stack.gallery.yao}")
    assert float(by_id(browser, "stored-quality").text.split(" / ")[0]) > 0


def search_by_photo(stack: Stack) -> None:
    """Yao Ming's portrait, mirrored (no registration holds it): the planted duplicate (his
    portrait under a second ID number) first, his own registration second."""
    browser = stack.browser
    probe = stack.work / "probe.jpg"
    probe.write_bytes(encode(cv2.flip(cv2.imread(str(YAOMING)), 1)))
    by_id(browser, "photo").send_keys(str(probe))
    submit(browser, "search")
    rows = result_rows(browser)
    assert [row[:2] for row in rows[:2]] == [(YAO_SECOND, YAO_SECOND_ID),
                                             (stack.gallery.yao, YAO_ID)]
    assert rows[1][2] >= 0.40 and all(score < 0.30 for _, _, score in rows[2:])
    assert [score for _, _, score in rows] == sorted((s for _, _, s in rows), reverse=True)
    assert float(by_id(browser, "quality-unified").text) > 50
    # The quality each matched registration was enrolled with (from its photo).
    assert all(float(cell.text) > 0 for cell in css(browser, "tr.match td.quality")[:2])
    assert css(browser, "#probe svg.face rect.facebox")
    assert wait_for(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('img.photo')].filter("
        "i => i.complete && i.naturalWidth > 0).length") >= 2)
    stack.shot("search")
    # The carrier's photos: fetched by the browser, never by the console.
    assert stack.photos.asked and all("Chrome" in agent for _, agent in stack.photos.asked)


def follow_links(stack: Stack) -> None:
    """Links of the planted duplicate's ID number, from its row: both ID numbers as nodes."""
    browser = stack.browser
    browser.find_element("link text", YAO_SECOND_ID).click()
    wait_for(browser, lambda d: d.execute_script("return !!window.dedupGraph"))
    nodes = browser.execute_script("return window.dedupGraph.nodes().map(n => n.id())")
    assert sorted(nodes) == sorted([YAO_SECOND_ID, YAO_ID])
    assert [row.get_attribute("data-id-number") for row in css(browser, "tr.link")] == [YAO_ID]
    stack.shot("links")


def sweep(stack: Stack) -> None:
    """The cluster sweep to its end: both planted clusters, listed live and downloaded."""
    browser = stack.browser
    browser.get(stack.console.url + "/clusters")
    submit(browser, "start-sweep")
    wait_for(browser, lambda d: by_id(d, "cluster-job").get_attribute("class") == "done")
    assert by_id(browser, "cluster-status").text.startswith("Done")
    clusters = [item.text for item in css(browser, "#cluster-list > li .ids")]
    assert f"{YAO_ID}, {YAO_SECOND_ID}" in clusters and len(clusters) == 2
    stack.shot("clusters")
    # The page's script lists clusters as they arrive: from an empty list, polling again.
    browser.execute_script("document.getElementById('cluster-list').replaceChildren();"
                           "const job = document.getElementById('cluster-job');"
                           "job.dataset.found = 0; job.className = 'running'; followSweep()")
    wait_for(browser, lambda d: len(css(d, "#cluster-list > li")) == 2
             and by_id(d, "cluster-job").get_attribute("class") == "done")
    assert sorted(item.text for item in css(browser, "#cluster-list > li .ids")) == sorted(
        clusters)
    job_path = browser.current_url.removeprefix(stack.console.url)
    jsonl = browser.execute_script(f"return fetch('{job_path}/clusters.jsonl').then(r => r.text())")
    csv = browser.execute_script(f"return fetch('{job_path}/clusters.csv').then(r => r.text())")
    assert len(jsonl.splitlines()) == 2 and T1_SECOND in jsonl
    assert csv.splitlines()[0].startswith("cluster,id_numbers") and len(csv.splitlines()) == 5


def check_the_trail(stack: Stack) -> None:
    """Each step's record, under the case, through `dedup audit export`."""
    methods = [r["method"] for r in records_of_case(stack) if r["role"] == "investigator"]
    assert methods == ["Investigate.Search", "Investigate.Links", "Investigate.FindClusters",
                       "Investigate.FindClusters", "Investigate.Search",
                       "Investigate.Adjudicate", "Investigate.Search"]
    search, links, _, swept, by_registration, settled, _ = records_of_case(stack)
    assert "embedding_sha256" in search["query"] and search["returned"][:2] == [
        YAO_SECOND, stack.gallery.yao]
    assert links["query"]["id_number"].startswith("hmac:")  # a pseudonym, never the value
    assert {YAO_SECOND, stack.gallery.yao, T1_SECOND} <= set(swept["returned"])
    assert by_registration["query"]["registration_id"] == YAO_SECOND
    assert settled["query"]["decision"] == "SAME_PERSON"
    assert all(r["purpose"] == PURPOSE and r["caller"] == "token:investigator-token"
               for r in records_of_case(stack))


def entry_is_error(line: str) -> bool:
    """A script error or a failed load of the console's own page (not a refused request)."""
    return "Uncaught" in line or "Failed to load resource" in line


def search_by_registration(stack: Stack, registration_id: str) -> None:
    stack.browser.get(stack.console.url + "/search")
    by_id(stack.browser, "registration_id").send_keys(registration_id)
    submit(stack.browser, "search")


def review_settlement(stack: Stack, registration_id: str, decision: str, note: str) -> None:
    """Settle… on the first result of a search by `registration_id`: the confirmation page."""
    from selenium.webdriver.support.ui import Select

    browser = stack.browser
    search_by_registration(stack, registration_id)
    form = css(browser, "tr.match form.settle")[0]
    Select(form.find_element("name", "decision")).select_by_value(decision)
    form.find_element("name", "note").send_keys(note)
    old = browser.find_element("tag name", "html")
    form.find_element("css selector", "button").click()
    wait_for(browser, lambda d: old != d.find_element("tag name", "html"))


def settle_yao(stack: Stack) -> None:
    review_settlement(stack, YAO_SECOND, "same", "same face, two ID cards")
    assert by_id(stack.browser, "decision").text == "same person"
    stack.shot("confirm")
    submit(stack.browser, "confirm")


def test_a_form_posted_without_its_csrf_token_is_refused(stack: Stack) -> None:
    browser = stack.browser
    sign_in(stack, "investigator")
    open_case(stack)
    review_settlement(stack, T1_SECOND, "different", "not the same")
    before = len(audit_records(stack.data_dir))
    confirm = by_id(browser, "confirm-form")
    browser.execute_script("arguments[0].querySelector('[name=csrf]').remove()", confirm)
    submit(browser, "confirm")
    assert "did not come from this console" in by_id(browser, "message").text
    assert len(audit_records(stack.data_dir)) == before  # no Adjudicate was sent
    review_settlement(stack, T1_SECOND, "different", "not the same")  # with its token
    submit(browser, "confirm")
    assert "different people" in by_id(browser, "settled").text
    assert audit_records(stack.data_dir)[-1]["method"] == "Investigate.Adjudicate"


def test_a_registration_desk_token_is_refused(stack: Stack) -> None:
    browser = stack.browser
    sign_in(stack, "registration")
    assert "registration role" in by_id(browser, "message").text
    stack.shot("refused")
    browser.get(stack.console.url + "/search")
    assert browser.current_url.endswith("/signin?ended=1") or "/signin" in browser.current_url


def test_server_refusals_and_large_uploads_are_messages(stack: Stack) -> None:
    browser = stack.browser
    sign_in(stack, "investigator")
    open_case(stack)
    search_by_registration(stack, "order-nobody")
    text = by_id(browser, "message").text
    assert "NOT_FOUND" in text and "order-nobody" in text and "Traceback" not in text
    big = stack.work / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(UPLOAD_LIMIT + 100_000))
    browser.get(stack.console.url + "/search")
    by_id(browser, "photo").send_keys(str(big))
    submit(browser, "search")
    assert f"at most {UPLOAD_LIMIT:,} bytes" in by_id(browser, "message").text


def test_admin_pages(stack: Stack, keys: Path) -> None:
    browser = stack.browser
    # The case's trail holds a settlement of its own, whichever tests ran before this one.
    with channel(stack.server.port, keys, role="investigator") as investigator:
        pb_grpc.InvestigateStub(investigator).Adjudicate(pb.AdjudicateRequest(
            case_id=CASE, purpose=PURPOSE, registration_id=T1_SECOND,
            matched_registration_id="order-t1-0", decision=pb.DIFFERENT_PEOPLE,
            note="settled for the admin's audit page"), timeout=60)
    sign_in(stack, "admin")
    open_case(stack)
    browser.get(stack.console.url + "/admin")
    stats = {row.find_element("tag name", "th").text: row.find_element("tag name", "td").text
             for row in css(browser, "#stats tr")}
    assert stats["registrations"] == str(len(stack.gallery.id_numbers))
    assert "Flat" in by_id(browser, "index-info").text
    stack.shot("admin")
    browser.get(stack.console.url + f"/admin/audit?case_id={CASE}&caller=investigator")
    assert by_id(browser, "verification").text.startswith("Intact")
    methods = [row.get_attribute("data-method") for row in css(browser, "#audit-records tbody tr")]
    assert methods and set(methods) <= {"Investigate.Search", "Investigate.Links",
                                        "Investigate.FindClusters", "Investigate.Adjudicate",
                                        "FaceDedup.GetRegistration"}  # a registration's page
    assert "Investigate.Adjudicate" in methods
    stack.shot("audit")


def test_search_by_photo_reports_the_face_it_used(stack: Stack, keys: Path) -> None:
    """SearchResponse.detected_face, which the console draws on the probe."""
    with channel(stack.server.port, keys, role="investigator") as investigator:
        reply = pb_grpc.InvestigateStub(investigator).Search(pb.SearchRequest(
            case_id="CASE-grpc", purpose="detected face", k=2,
            face=pb.Face(image=YAOMING.read_bytes())), timeout=60)
        by_registration = pb_grpc.InvestigateStub(investigator).Search(pb.SearchRequest(
            case_id="CASE-grpc", purpose="detected face", registration_id=YAO_SECOND),
            timeout=60)
    height, width = cv2.imread(str(YAOMING)).shape[:2]
    face = reply.detected_face
    assert face.faces_in_image == 1 and face.detection_score >= 0.6
    assert 0 <= face.x1 < face.x2 <= width and 0 <= face.y1 < face.y2 <= height
    assert reply.quality.unified > 0
    assert reply.matches[0].registration.registration_id == YAO_SECOND
    assert not by_registration.HasField("detected_face")
