"""Every read by an investigator or an admin leaves an audit record, including refusals and
NOT_FOUND, and names a case and a purpose validated alike on every route (#13 finding 3).
Real TLS, keys from `dedup keys`, both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import face
from secure import channel, tokens
from trail import records

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

CASE = {"case_id": "CASE-11", "purpose": "ring review"}
CASE_METADATA = (("x-case-id", CASE["case_id"]), ("x-purpose", CASE["purpose"]))


def by(server, keys: Path, role: str) -> grpc.Channel:
    return channel(server.port, keys, role=role)


def refused(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30, **kwargs)
    return error.value


def trail_of(server) -> list[dict]:
    server.stop()
    return [record for record in records(server) if record["method"] != "FaceDedup.Delete"]


def test_admin_reads_are_audited(secure_server, keys, faces):
    with by(secure_server, keys, "admin") as ch:
        dedup = pb_grpc.FaceDedupStub(ch)
        reply = dedup.Check(pb.CheckRequest(face=face(faces.persons(1)[0])), timeout=30,
                            metadata=CASE_METADATA)
        dedup.GetRegistration(pb.GetRegistrationRequest(registration_id="r0"), timeout=30,
                              metadata=CASE_METADATA)
    check, get = trail_of(secure_server)
    for record, method in ((check, "FaceDedup.Check"), (get, "FaceDedup.GetRegistration")):
        assert (record["method"], record["caller"], record["role"], record["via"]) == (
            method, "CN=admin-client", "admin", "mtls")
        assert (record["case_id"], record["purpose"]) == (CASE["case_id"], CASE["purpose"])
    assert check["returned"] == [m.registration.registration_id for m in reply.matches]
    assert get["returned"] == ["r0"] and get["query"]["registration_id"] == "r0"


@pytest.mark.parametrize("role", ["investigator", "admin"])
def test_face_dedup_reads_need_a_case_and_purpose(secure_server, keys, faces, role):
    request = pb.CheckRequest(face=face(faces.persons(1)[0]))
    with by(secure_server, keys, role) as ch:
        dedup = pb_grpc.FaceDedupStub(ch)
        missing = refused(dedup.Check, request)
        no_purpose = refused(dedup.GetRegistration,
                             pb.GetRegistrationRequest(registration_id="r0"),
                             metadata=CASE_METADATA[:1])
    assert missing.code() == no_purpose.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-case-id" in missing.details() and "x-purpose" in no_purpose.details()
    # The refusals are recorded, and nothing was returned.
    trail = trail_of(secure_server)
    assert [(r["method"], r["returned"], r["query"].get("outcome")) for r in trail] == [
        ("FaceDedup.Check", [], "INVALID_ARGUMENT"),
        ("FaceDedup.GetRegistration", [], "INVALID_ARGUMENT")]
    assert trail[1]["case_id"] == ""  # the case is kept only once both are valid


def test_case_ids_are_validated_alike_on_every_route(secure_server, keys, faces):
    long_case = "C" * 6000
    probe = face(faces.persons(1)[0])
    with by(secure_server, keys, "investigator") as ch:
        dedup, investigate = pb_grpc.FaceDedupStub(ch), pb_grpc.InvestigateStub(ch)
        by_metadata = refused(dedup.Check, pb.CheckRequest(face=probe),
                              metadata=(("x-case-id", long_case), ("x-purpose", "p")))
        by_field = refused(investigate.Search, pb.SearchRequest(
            case_id=long_case, purpose="p", registration_id="r0"))
        spaced = refused(dedup.Check, pb.CheckRequest(face=probe),
                         metadata=(("x-case-id", "C-1"), ("x-purpose", " p")))
        spaced_field = refused(investigate.Links, pb.LinksRequest(
            case_id="C-1", purpose=" p", id_number="ID0"))
        control = refused(investigate.Links, pb.LinksRequest(
            case_id="C-1", purpose="p\x07", id_number="ID0"))
    for error in (by_metadata, by_field, spaced, spaced_field, control):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert by_metadata.details() == by_field.details().replace("case_id", "x-case-id")
    assert "at most 256" in by_field.details()
    assert spaced.details() == spaced_field.details().replace("purpose", "x-purpose")
    assert "control characters" in control.details()
    trail = trail_of(secure_server)
    assert len(trail) == 5 and all(r["query"]["outcome"] == "INVALID_ARGUMENT" for r in trail)
    assert long_case not in str(trail)


def test_not_found_lookups_are_audited(secure_server, keys):
    with by(secure_server, keys, "investigator") as ch:
        dedup, investigate = pb_grpc.FaceDedupStub(ch), pb_grpc.InvestigateStub(ch)
        misses = [
            refused(investigate.Links, pb.LinksRequest(**CASE, id_number="NOBODY-1")),
            refused(investigate.Search, pb.SearchRequest(**CASE, registration_id="r-none")),
            refused(dedup.GetRegistration, pb.GetRegistrationRequest(registration_id="r-gone"),
                    metadata=CASE_METADATA),
        ]
    assert {miss.code() for miss in misses} == {grpc.StatusCode.NOT_FOUND}
    links, search, get = trail_of(secure_server)
    assert (links["method"], search["method"], get["method"]) == (
        "Investigate.Links", "Investigate.Search", "FaceDedup.GetRegistration")
    for record in (links, search, get):
        assert record["query"]["outcome"] == "NOT_FOUND" and record["returned"] == []
        assert (record["case_id"], record["caller"]) == (CASE["case_id"],
                                                         "CN=investigator-client")
    assert "id_number" in links["query"]  # as a pseudonym where the trail keeps them so
    assert search["query"]["registration_id"] == "r-none"
    assert get["query"]["registration_id"] == "r-gone"


def test_adjudicate_refusals_and_not_found_are_audited(secure_server, keys):
    """Whether a registration_id exists shows in how Adjudicate refuses an application with no
    score (NOT_FOUND: no such matched registration; INVALID_ARGUMENT: it exists): both are
    recorded, as any read's refusal is."""
    def adjudicate(matched: str) -> grpc.RpcError:
        return refused(investigate.Adjudicate, pb.AdjudicateRequest(
            **CASE, registration_id="r-application", matched_registration_id=matched,
            decision=pb.DIFFERENT_PEOPLE))

    with by(secure_server, keys, "investigator") as ch:
        investigate = pb_grpc.InvestigateStub(ch)
        misses = [adjudicate("r-none"), adjudicate("r0")]
    assert [miss.code() for miss in misses] == [grpc.StatusCode.NOT_FOUND,
                                                grpc.StatusCode.INVALID_ARGUMENT]
    trail = trail_of(secure_server)
    assert [record["method"] for record in trail] == ["Investigate.Adjudicate"] * 2
    assert [record["query"]["outcome"] for record in trail] == ["NOT_FOUND",
                                                                "INVALID_ARGUMENT"]
    assert [record["query"]["matched_registration_id"] for record in trail] == ["r-none", "r0"]
    for record in trail:
        assert record["returned"] == [] and record["caller"] == "CN=investigator-client"
        assert record["query"]["registration_id"] == "r-application"


def test_token_callers_are_audited_too(secure_server, keys, faces):
    with channel(secure_server.server.token_port, keys, token=tokens(keys)["admin"]) as ch:
        pb_grpc.FaceDedupStub(ch).Check(pb.CheckRequest(face=face(faces.persons(1)[0])),
                                        timeout=30, metadata=CASE_METADATA)
    (record,) = trail_of(secure_server)
    assert (record["caller"], record["via"]) == ("token:admin-token", "token")


@pytest.mark.embedded_only(reason="the client command's metadata; the backend plays no part")
def test_client_commands_send_the_case(secure_server, keys):
    tls = ["--server", f"127.0.0.1:{secure_server.port}", "--ca", str(keys / "ca.crt"),
           "--cert", str(keys / "admin.crt"), "--key", str(keys / "admin.key")]
    without = dedup("get", "r0", *tls)
    assert without.returncode == 1 and "x-case-id" in without.stderr
    shown = dedup("get", "r0", *tls, "--case-id", CASE["case_id"], "--purpose", CASE["purpose"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["enrolled_by"] == "CN=admin-client"
    (refusal, answer) = trail_of(secure_server)
    assert (refusal["query"]["outcome"], answer["case_id"]) == ("INVALID_ARGUMENT",
                                                                CASE["case_id"])


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=120)
