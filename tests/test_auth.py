"""Roles and both ways in: mutual TLS and bearer tokens, against a real TLS server."""

from __future__ import annotations

import functools
import hashlib
import itertools

import grpc
import pytest
from conftest import face, registration
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_certificate
from grpc_health.v1 import health_pb2, health_pb2_grpc
from secure import channel, tokens
from trail import records

from dedup import ServerConfig, StoreConfig, create_server
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import ConfigError
from dedup.core.security import load_security
from dedup.ops.keys import Issued, default_ca_dir, issue, make_ca, write_pair

OK = grpc.StatusCode.OK
SERIAL = itertools.count()


def outcome(call, request) -> grpc.StatusCode:
    try:
        response = call(request, timeout=30)
        if hasattr(response, "__iter__") and not isinstance(response, pb.Registration):
            list(response)
    except grpc.RpcError as error:
        return error.code()
    return OK


def calls(ch: grpc.Channel, faces) -> dict[str, grpc.StatusCode]:
    """One call of each kind; what each returned."""
    dedup, admin = pb_grpc.FaceDedupStub(ch), pb_grpc.IndexAdminStub(ch)
    investigate = pb_grpc.InvestigateStub(ch)
    probe = face(faces.persons(1)[0])
    case = (("x-case-id", "C-1"), ("x-purpose", "test"))  # needed by investigators and admins
    return {
        "Check": outcome(functools.partial(dedup.Check, metadata=case),
                         pb.CheckRequest(face=probe, claimed_id_number="IDN")),
        "Enroll": outcome(dedup.Enroll, pb.EnrollRequest(
            registration=registration(f"n{next(SERIAL)}", "IDN"), face=probe)),
        "GetRegistration": outcome(functools.partial(dedup.GetRegistration, metadata=case),
                                   pb.GetRegistrationRequest(registration_id="r0")),
        "Stats": outcome(dedup.Stats, pb.StatsRequest()),
        "Delete": outcome(dedup.Delete, pb.DeleteRequest(registration_id="nobody")),
        "GetIndexInfo": outcome(admin.GetIndexInfo, pb.GetIndexInfoRequest()),
        "Search": outcome(investigate.Search, pb.SearchRequest(
            case_id="C-1", purpose="test", registration_id="r0")),
    }


def refusal(ch: grpc.Channel, method: str, request) -> grpc.RpcError:
    with ch, pytest.raises(grpc.RpcError) as refused:
        getattr(pb_grpc.FaceDedupStub(ch), method)(request, timeout=30)
    return refused.value


DENIED = grpc.StatusCode.PERMISSION_DENIED
EXPECTED = {
    # r0 was enrolled by the admin: the registration role finds only its own enrolments.
    "registration": {"Check": OK, "Enroll": OK, "GetRegistration": grpc.StatusCode.NOT_FOUND,
                     "Stats": DENIED, "Delete": DENIED, "GetIndexInfo": DENIED,
                     "Search": DENIED},
    "investigator": {"Check": OK, "Enroll": DENIED, "GetRegistration": OK, "Stats": DENIED,
                     "Delete": DENIED, "GetIndexInfo": DENIED, "Search": OK},
    # Delete of an unknown key: admitted, then NOT_FOUND.
    "admin": {"Check": OK, "Enroll": OK, "GetRegistration": OK, "Stats": OK,
              "Delete": grpc.StatusCode.NOT_FOUND, "GetIndexInfo": OK, "Search": OK},
}


@pytest.mark.parametrize("role", list(EXPECTED))
def test_each_role_by_client_certificate(secure_server, keys, faces, role):
    with channel(secure_server.port, keys, role=role) as ch:
        assert calls(ch, faces) == EXPECTED[role]


@pytest.mark.parametrize("role", list(EXPECTED))
def test_each_role_by_token(secure_server, keys, faces, role):
    port = secure_server.server.token_port
    with channel(port, keys, token=tokens(keys)[role]) as ch:
        assert calls(ch, faces) == EXPECTED[role]


def test_no_credential_is_unauthenticated(secure_server, keys):
    refused = refusal(channel(secure_server.server.token_port, keys), "Check", pb.CheckRequest())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no credential" in refused.details()


def test_unknown_token_is_unauthenticated(secure_server, keys):
    ch = channel(secure_server.server.token_port, keys, token="not-a-token")
    refused = refusal(ch, "Check", pb.CheckRequest())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown token" in refused.details()


def test_expired_token_is_unauthenticated(make_server, keys, tmp_path):
    security = (keys / "security.toml").read_text().replace(
        'name = "investigator-token"', 'name = "investigator-token"\n# expired below')
    expired = "\n".join(
        line if not line.startswith("expires") else "expires = 2020-01-01T00:00:00Z"
        for line in security.splitlines())
    for name in ("server.crt", "server.key", "ca.crt", "audit.key"):
        (tmp_path / name).write_bytes((keys / name).read_bytes())
    (tmp_path / "security.toml").write_text(expired)
    server = make_server(security=load_security(tmp_path / "security.toml"))
    ch = channel(server.server.token_port, keys, token=tokens(keys)["investigator"])
    refused = refusal(ch, "Check", pb.CheckRequest())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in refused.details()


def test_certificate_of_another_ca_is_refused_at_the_handshake(secure_server, keys, tmp_path):
    rogue_ca = make_ca("rogue CA")
    write_pair(issue(rogue_ca, "admin-client", server=False), tmp_path, "admin")
    (tmp_path / "ca.crt").write_bytes((keys / "ca.crt").read_bytes())
    ch = channel(secure_server.port, tmp_path, role="admin")
    refused = refusal(ch, "Stats", pb.StatsRequest())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_no_client_certificate_on_the_mtls_port_is_refused(secure_server, keys):
    ch = channel(secure_server.port, keys, token=tokens(keys)["admin"])
    refused = refusal(ch, "Stats", pb.StatsRequest())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_with_unmapped_subject_is_unauthenticated(secure_server, keys, tmp_path):
    ca_key = default_ca_dir(keys) / "ca.key"
    ca = Issued(serialization.load_pem_private_key(ca_key.read_bytes(), None),
                load_pem_x509_certificate((keys / "ca.crt").read_bytes()))
    write_pair(issue(ca, "stranger", server=False), tmp_path, "stranger")
    (tmp_path / "ca.crt").write_bytes((keys / "ca.crt").read_bytes())
    ch = channel(secure_server.port, tmp_path, role="stranger")
    refused = refusal(ch, "Check", pb.CheckRequest())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "stranger" in refused.details()


def test_health_stays_open(secure_server, keys):
    with channel(secure_server.server.token_port, keys) as ch:  # no token
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_without_security_only_loopback(tmp_path):
    with pytest.raises(ConfigError, match="without a security file"):
        create_server(ServerConfig(store=StoreConfig(data_dir=tmp_path / "d")), "0.0.0.0:0")


def test_security_file_keeps_only_token_hashes(keys):
    text = (keys / "security.toml").read_text()
    for token in tokens(keys).values():
        assert token not in text
        assert hashlib.sha256(token.encode()).hexdigest() in text


def test_investigator_reads_are_audited_with_their_case(secure_server, keys, faces):
    probe = face(faces.persons(1)[0])
    with channel(secure_server.server.token_port, keys,
                 token=tokens(keys)["investigator"]) as ch:
        pb_grpc.FaceDedupStub(ch).Check(pb.CheckRequest(face=probe), timeout=30, metadata=(
            ("x-case-id", "C-5"), ("x-purpose", "lookup")))
    with channel(secure_server.port, keys, role="registration") as ch:
        pb_grpc.FaceDedupStub(ch).Check(pb.CheckRequest(face=probe, claimed_id_number="ID9"),
                                        timeout=30)
    secure_server.stop()
    (record,) = records(secure_server)  # the registration desk's check is not audited
    assert (record["method"], record["caller"], record["role"], record["via"]) == (
        "FaceDedup.Check", "token:investigator-token", "investigator", "token")
    assert (record["case_id"], record["purpose"]) == ("C-5", "lookup")
