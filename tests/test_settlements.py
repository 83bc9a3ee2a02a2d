"""Settled pairs cannot switch the duplicate check off: a settlement is keyed by the stored
registrations (not by the registration_id a caller names), applies to a registration-role
check only when the probe is the named registration's own stored face, and is erased with
either registration. On a real TLS server with `dedup keys` credentials, on both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from conftest import face, registration
from secure import channel

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.security import load_security

CASE = {"case_id": "CASE-6", "purpose": "settlement test"}


class Desk:
    """The three roles' stubs on one secured server."""

    def __init__(self, server, keys: Path) -> None:
        self.channels = {role: channel(server.port, keys, role=role)
                         for role in ("registration", "investigator", "admin")}
        self.desk = pb_grpc.FaceDedupStub(self.channels["registration"])
        self.admin = pb_grpc.FaceDedupStub(self.channels["admin"])
        self.investigate = pb_grpc.InvestigateStub(self.channels["investigator"])

    def enrol(self, registration_id: str, id_number: str, vector: np.ndarray) -> None:
        assert self.admin.Enroll(pb.EnrollRequest(
            registration=registration(registration_id, id_number), face=face(vector))).enrolled

    def settle_different(self, first: str, second: str, score: float | None = None) -> None:
        self.investigate.Adjudicate(pb.AdjudicateRequest(
            **CASE, registration_id=first, matched_registration_id=second,
            decision=pb.DIFFERENT_PEOPLE, note="documents checked", score=score))

    def check(self, vector: np.ndarray, claimed: str, registration_id: str,
              role: str = "registration") -> pb.CheckResponse:
        metadata = None if role == "registration" else \
            (("x-case-id", CASE["case_id"]), ("x-purpose", CASE["purpose"]))
        return pb_grpc.FaceDedupStub(self.channels[role]).Check(pb.CheckRequest(
            face=face(vector), claimed_id_number=claimed, registration_id=registration_id),
            metadata=metadata)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()


@pytest.fixture
def desk(make_server, keys):
    server = make_server(security=load_security(keys / "security.toml"))
    roles = Desk(server, keys)
    yield server, roles
    roles.close()


def test_naming_a_settled_registration_does_not_clear_another_face(desk, faces):
    """The review's first attack: A and B settled as different people; a desk names A in a
    check of B's face under a new ID number."""
    _, roles = desk
    a, b = faces.persons(2)
    roles.enrol("A", "ID-A", a)
    roles.enrol("B", "ID-B", b)
    roles.settle_different("A", "B")

    attack = roles.check(faces.capture(b), "ID-NEW", "A")
    assert attack.verdict == pb.DUPLICATE_IDENTITY
    assert [m.registration.registration_id for m in attack.matches] == ["B"]
    assert not attack.matches[0].settled_different
    # A's own face naming A: the settlement stands.
    own = roles.check(a, "ID-A", "A")
    assert own.verdict == pb.SAME_PERSON
    assert [(m.registration.registration_id, m.settled_different) for m in own.matches] == \
        [("A", False)]
    # An investigator's check applies the settlement of the registration it names.
    trusted = roles.check(faces.capture(b), "ID-NEW", "A", role="investigator")
    assert trusted.verdict == pb.CLEAR and trusted.matches[0].settled_different


def test_a_deleted_registrations_settlements_go_with_it(desk, faces):
    """The review's second attack: after A is deleted, an enrolment reusing A's
    registration_id with B's face under a new ID number."""
    server, roles = desk
    a, b = faces.persons(2)
    roles.enrol("A", "ID-A", a)
    roles.enrol("B", "ID-B", b)
    roles.settle_different("A", "B")
    roles.admin.Delete(pb.DeleteRequest(registration_id="A"))

    for stub in (roles.desk, roles.admin):
        reused = stub.Enroll(pb.EnrollRequest(registration=registration("A", "ID-NEW"),
                                              face=face(faces.capture(b)), check_first=True))
        assert reused.check.verdict == pb.DUPLICATE_IDENTITY and not reused.enrolled
    fresh = roles.desk.Enroll(pb.EnrollRequest(registration=registration("C", "ID-NEW"),
                                               face=face(faces.capture(b)), check_first=True))
    assert fresh.check.verdict == pb.DUPLICATE_IDENTITY
    # No adjudication names the erased registration.
    assert server.server.gallery.settled(server.server.gallery.stored_face("B")[0]) == {}


def test_a_refused_application_settled_is_cleared_only_by_a_trusted_enrolment(desk, faces):
    """An application refused as a duplicate (never enrolled) and settled as a different
    person: a desk naming it gets no exemption; an admin's enrolment applies the settlement;
    then the desk's checks of that registration's own face do too."""
    server, roles = desk
    person = faces.persons(1)[0]
    lookalike = faces.at_similarity(person, 0.55)
    roles.enrol("a", "ID-A", person)
    application = pb.EnrollRequest(registration=registration("b", "ID-B"),
                                   face=face(lookalike), check_first=True)
    refused = roles.desk.Enroll(application)
    assert refused.check.verdict == pb.DUPLICATE_IDENTITY and not refused.enrolled
    roles.settle_different("b", "a", score=refused.check.matches[0].score)

    assert roles.check(lookalike, "ID-B", "b").verdict == pb.DUPLICATE_IDENTITY
    assert roles.check(person, "ID-NEW", "b").verdict == pb.DUPLICATE_IDENTITY
    assert not roles.desk.Enroll(application).enrolled
    enrolled = roles.admin.Enroll(application)
    assert enrolled.enrolled and enrolled.check.verdict == pb.CLEAR
    again = roles.check(lookalike, "ID-B", "b")
    assert again.verdict == pb.SAME_PERSON
    assert {m.registration.registration_id: m.settled_different
            for m in again.matches} == {"b": False, "a": True}
    roles.admin.Delete(pb.DeleteRequest(registration_id="b"))
    assert server.server.gallery.settled("b") == {}


@pytest.mark.embedded_only(reason="writes adjudications in the LMDB layout of earlier versions")
def test_settlements_of_an_older_store_are_keyed_when_it_opens(make_server, faces):
    server = make_server()
    person = faces.persons(1)[0]
    stub = server.stub
    for registration_id, id_number, vector in (("a", "ID-A", person),
                                               ("b", "ID-B", faces.at_similarity(person, 0.55))):
        stub.Enroll(pb.EnrollRequest(registration=registration(registration_id, id_number),
                                     face=face(vector)))
    server.stop()
    _plant_legacy_settlements(server.data_dir)
    server.restart()
    gallery = server.server.gallery
    a_key, b_key = gallery.stored_face("a")[0], gallery.stored_face("b")[0]
    assert list(gallery.settled(a_key)) == [b_key]
    assert list(gallery.settled("x")) == [a_key]  # an application, never enrolled
    assert gallery.settled(b_key).keys() == {a_key}  # ("b", "gone") was dropped
    check = server.stub.Check(pb.CheckRequest(face=face(person), registration_id="a",
                                              claimed_id_number="ID-A"))
    assert check.verdict == pb.SAME_PERSON


def _plant_legacy_settlements(data_dir: Path) -> None:
    """Adjudications as earlier versions kept them: "<registration_id>\\0<other>" keys."""
    from dedup.core.adjudication import Adjudication

    env = lmdb.open(str(data_dir / "store"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            meta, db = env.open_db(b"meta", txn=txn), env.open_db(b"adjudications", txn=txn)
            txn.delete(b"settlements_by_key", db=meta)
            for first, second in (("a", "b"), ("x", "a"), ("b", "gone")):
                record = Adjudication.now(first, second, "DIFFERENT_PEOPLE", 0.5, "C-1", "",
                                          "CN=old").encode()
                txn.put(f"{first}\0{second}".encode(), record, db=db)
                txn.put(f"{second}\0{first}".encode(), record, db=db)
    finally:
        env.close()


def legacy_settlements(client: Any, name: str, pairs: list[tuple[str, str]]) -> None:
    """An older version's settlements collection `name` in Milvus, keyed by registration_id
    strings, holding each settled pair under both orders."""
    from pymilvus import DataType

    from dedup.core.adjudication import Adjudication
    from dedup.gallery.milvus import schema

    schema._create(client, name, schema._adjudication_schema(client, DataType), "placeholder",
                   "FLAT", {}, ["first"])
    rows = []
    for first, second in pairs:
        record = Adjudication.now(first, second, "DIFFERENT_PEOPLE", 0.5, "C-1", "",
                                  "CN=old").encode().decode()
        rows += [{"key": schema.stable_key(one, other), "first": one, "second": other,
                  "record": record, "placeholder": schema.PLACEHOLDER}
                 for one, other in ((first, second), (second, first))]
    for start in range(0, len(rows), 500):
        client.upsert(name, rows[start:start + 500])


@pytest.mark.parametrize("backend", ["milvus"])
def test_settlements_of_an_older_milvus_collection_are_moved_when_a_node_opens(make_server,
                                                                             faces):
    from pymilvus import MilvusClient

    server = make_server()
    person = faces.persons(1)[0]
    for registration_id, id_number, vector in (("a", "ID-A", person),
                                               ("b", "ID-B", faces.at_similarity(person, 0.55))):
        server.stub.Enroll(pb.EnrollRequest(
            registration=registration(registration_id, id_number), face=face(vector)))
    server.stop()
    client = MilvusClient(uri=server.config.milvus.uri)
    try:
        legacy_settlements(client, "dedup_adjudications",
                           [("a", "b"), ("x", "a"), ("b", "gone")])
    finally:
        client.close()
    server.restart()
    gallery = server.server.gallery
    a_key, b_key = gallery.stored_face("a")[0], gallery.stored_face("b")[0]
    assert gallery.settled(a_key).keys() == {b_key} and gallery.settled(b_key).keys() == {a_key}
    assert gallery.settled("x").keys() == {a_key}
    assert not gallery._client.has_collection("dedup_adjudications")


@pytest.mark.parametrize("backend", ["embedded"])
def test_migration_keeps_settlements_by_key(make_server, faces, tmp_path):
    import subprocess
    import sys

    from conftest import release_milvus_lite

    from dedup.core.settings import MilvusConfig
    from dedup.gallery.milvus import MilvusGallery

    source = make_server()
    person = faces.persons(1)[0]
    for registration_id, id_number, vector in (("a", "ID-A", person),
                                               ("b", "ID-B", faces.at_similarity(person, 0.55))):
        source.stub.Enroll(pb.EnrollRequest(
            registration=registration(registration_id, id_number), face=face(vector)))
    pb_grpc.InvestigateStub(source.channel).Adjudicate(pb.AdjudicateRequest(
        **CASE, registration_id="b", matched_registration_id="a", decision=pb.DIFFERENT_PEOPLE))
    gallery = source.server.gallery
    a_key, b_key, model_id = gallery.stored_face("a")[0], gallery.stored_face("b")[0], \
        gallery.model_id
    source.stop()
    target = tmp_path / "migrated.db"
    migrated = subprocess.run([sys.executable, "-m", "dedup", "migrate", "--from",
                               str(source.data_dir), "--to", str(target), "--sample", "2"],
                              capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stderr
    milvus = MilvusGallery(MilvusConfig(uri=str(target)), model_id, background=False)
    try:
        assert milvus.settled(b_key).keys() == {a_key}
        assert milvus.settled(a_key).keys() == {b_key}
    finally:
        milvus.close(checkpoint=False)
        release_milvus_lite(target)
