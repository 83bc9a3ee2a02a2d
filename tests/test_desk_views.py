"""What the registration role may learn (#13 finding 2): a verdict on a claimed ID number and
the evidence, with other people's ID numbers and phone numbers masked; only its own
enrolments by registration_id; checks rate limited per credential. Real TLS, keys from
`dedup keys`, both backends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, face, registration
from metrics import scrape, value
from secure import channel, secured, tokens

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.records import Registration
from dedup.core.settings import QueryLimits
from dedup.gallery.embedded.store_format import decode_registration, encode_registration

CASE = (("x-case-id", "CASE-9"), ("x-purpose", "duplicate review"))
# Someone else's registration, and the applicant's own earlier one.
OTHER = {"registration_id": "r-other", "id_number": "110101199003071234",
         "msisdn": "+8613800000001", "carrier": "CMCC", "region": "Beijing"}
OWN = {"registration_id": "r-own", "id_number": "220202198805055678",
       "msisdn": "+8613900000002", "carrier": "CU", "region": "Tianjin"}
NOISE = 0.3  # two captures of one person then score about 0.9


def stub(server, keys: Path, role: str, token: bool = False) -> pb_grpc.FaceDedupStub:
    """A FaceDedup stub of `role`: by its client certificate, or by its token."""
    if token:
        return pb_grpc.FaceDedupStub(channel(server.server.token_port, keys,
                                             token=tokens(keys)[role]))
    return pb_grpc.FaceDedupStub(channel(server.port, keys, role=role))


@pytest.fixture
def gallery(make_server, keys, faces):
    """A secured server holding OTHER and OWN, one person each, enrolled by the admin;
    returns the server and a fresh capture of each person."""
    server = secured(make_server, keys)
    other, own = faces.persons(2)
    admin = stub(server, keys, "admin")
    for fields, person in ((OTHER, other), (OWN, own)):
        admin.Enroll(pb.EnrollRequest(registration=pb.Registration(**fields),
                                      face=face(faces.capture(person, NOISE))), timeout=30)
    return server, faces.capture(other, NOISE), faces.capture(own, NOISE)


def refused(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30, **kwargs)
    return error.value


def test_registration_check_needs_a_claimed_id_number(gallery, keys):
    server, probe, _ = gallery
    error = refused(stub(server, keys, "registration").Check, pb.CheckRequest(face=face(probe)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claimed_id_number" in error.details()


def test_registration_check_masks_other_id_numbers_and_phones(gallery, keys):
    server, probe, _ = gallery
    reply = stub(server, keys, "registration").Check(
        pb.CheckRequest(face=face(probe), claimed_id_number=OWN["id_number"]), timeout=30)
    assert reply.verdict == pb.DUPLICATE_IDENTITY
    (match,) = [m for m in reply.matches if m.registration.registration_id == "r-other"]
    shown = match.registration
    assert shown.id_number == "*" * 14 + "1234"
    assert shown.msisdn == "*" * 10 + "0001"
    assert (shown.carrier, shown.region) == ("CMCC", "Beijing")
    assert shown.HasField("enrolled_at") and match.score >= 0.40
    assert shown.enrolled_by == ""
    serialized = reply.SerializeToString()
    assert OTHER["id_number"].encode() not in serialized
    assert OTHER["msisdn"].encode() not in serialized


def test_registration_check_shows_the_claimed_id_numbers_own_registrations(gallery, keys):
    server, _, own_face = gallery
    reply = stub(server, keys, "registration", token=True).Check(
        pb.CheckRequest(face=face(own_face), claimed_id_number=OWN["id_number"]), timeout=30)
    assert reply.verdict == pb.SAME_PERSON
    (match,) = reply.matches
    assert (match.registration.id_number, match.registration.msisdn) == (
        OWN["id_number"], OWN["msisdn"])


def test_investigators_and_admins_see_whole_records(gallery, keys):
    server, probe, _ = gallery
    for role in ("investigator", "admin"):
        reply = stub(server, keys, role).Check(
            pb.CheckRequest(face=face(probe), claimed_id_number=OWN["id_number"]),
            timeout=30, metadata=CASE)
        (match,) = [m for m in reply.matches if m.registration.registration_id == "r-other"]
        assert (match.registration.id_number, match.registration.msisdn) == (
            OTHER["id_number"], OTHER["msisdn"])
        assert match.registration.enrolled_by == "CN=admin-client"


def test_enrolment_evidence_is_masked_too(gallery, keys):
    server, probe, _ = gallery
    desk = stub(server, keys, "registration")
    single = desk.Enroll(pb.EnrollRequest(
        registration=registration("r-new", "330303197707079999"), face=face(probe),
        check_first=True), timeout=30)
    streamed = list(desk.EnrollStream(iter([pb.EnrollRequest(
        registration=registration("r-new2", "440404196606068888"), face=face(probe),
        check_first=True)]), timeout=30))
    for reply in (single, *streamed):
        assert not reply.enrolled and reply.check.verdict == pb.DUPLICATE_IDENTITY
        serialized = reply.SerializeToString()
        assert OTHER["id_number"].encode() not in serialized
        assert OTHER["msisdn"].encode() not in serialized
        assert "1234" in {m.registration.id_number[-4:] for m in reply.check.matches}


def test_get_registration_finds_only_the_callers_own_enrolments(gallery, keys, faces):
    server, _, _ = gallery
    desk_a, desk_b = stub(server, keys, "registration"), stub(server, keys, "registration",
                                                               token=True)
    desk_a.Enroll(pb.EnrollRequest(registration=registration("r-desk-a", "550505195505057777",
                                                             "+8613700000003"),
                                   face=face(faces.persons(1)[0])), timeout=30)
    mine = desk_a.GetRegistration(pb.GetRegistrationRequest(registration_id="r-desk-a"),
                                  timeout=30)
    assert (mine.id_number, mine.enrolled_by) == ("550505195505057777",
                                                  "CN=registration-client")
    missing = refused(desk_a.GetRegistration,
                      pb.GetRegistrationRequest(registration_id="r-nobody"))
    for someone_elses, desk in (("r-desk-a", desk_b), ("r-other", desk_a)):
        error = refused(desk.GetRegistration,
                        pb.GetRegistrationRequest(registration_id=someone_elses))
        assert error.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        # The same answer as for a registration that does not exist.
        assert error.details() == missing.details().replace("r-nobody", someone_elses)


def test_enrolling_principal_is_stored(gallery, keys, faces):
    server, _, _ = gallery
    stub(server, keys, "registration", token=True).Enroll(pb.EnrollRequest(
        registration=registration("r-tok", "660606194404046666"),
        face=face(faces.persons(1)[0])), timeout=30)
    server.restart()
    shown = stub(server, keys, "admin").GetRegistration(
        pb.GetRegistrationRequest(registration_id="r-tok"), timeout=30, metadata=CASE)
    assert shown.enrolled_by == "token:registration-token"


def test_checks_are_rate_limited_per_registration_credential(make_server, keys, faces):
    server = secured(make_server, keys, metrics_address="127.0.0.1:0",
                     queries=dataclasses.replace(DESKS_SEND_EMBEDDINGS, check_rate_per_caller=0.01,
                                                  check_burst_per_caller=3))
    request = pb.CheckRequest(face=face(faces.persons(1)[0]), claimed_id_number="ID1")
    desk = stub(server, keys, "registration")
    for _ in range(3):
        desk.Check(request, timeout=30)
    error = refused(desk.Check, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "CN=registration-client" in error.details()
    # Another desk's credential has its own budget; investigators are not limited.
    stub(server, keys, "registration", token=True).Check(request, timeout=30)
    for _ in range(4):
        stub(server, keys, "investigator").Check(request, timeout=30, metadata=CASE)
    refused(desk.Check, pb.CheckRequest(face=request.face))  # rate first: counted as such
    samples = scrape(server.server.metrics_port)
    assert value(samples, "dedup_check_refusals_total", reason="rate") == 2


def test_check_first_enrolments_are_charged_to_the_desk_check_rate(make_server, keys, faces):
    """An enrolment with check_first runs a check and answers its evidence: a desk's are
    charged to its check rate, unary or streamed (a stream item refused, the stream goes on)."""
    server = secured(make_server, keys, metrics_address="127.0.0.1:0",
                     queries=dataclasses.replace(DESKS_SEND_EMBEDDINGS, check_rate_per_caller=0.01,
                                                  check_burst_per_caller=2))
    person, other = faces.persons(2)
    desk = stub(server, keys, "registration")
    desk.Check(pb.CheckRequest(face=face(person), claimed_id_number="ID1"), timeout=30)
    desk.Enroll(checked_enrolment("r-1", person), timeout=30)  # the burst of 2 spent
    assert refused(desk.Enroll, checked_enrolment("r-2", person)).code() == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    unchecked = pb.EnrollRequest(registration=registration("r-4", "ID4"), face=face(other))
    first, second = desk.EnrollStream(iter([checked_enrolment("r-3", person), unchecked]),
                                      timeout=30)
    assert (first.enrolled, first.error.code) == (False, "RESOURCE_EXHAUSTED")
    assert "CN=registration-client" in first.error.message
    assert second.enrolled  # no check, no charge
    samples = scrape(server.server.metrics_port)
    assert value(samples, "dedup_check_refusals_total", reason="rate") == 2


def checked_enrolment(registration_id: str, person) -> pb.EnrollRequest:
    return pb.EnrollRequest(registration=registration(registration_id, "ID1"),
                            face=face(person), check_first=True)


def test_store_reads_records_written_before_enrolled_by():
    old = b'{"r":"r1","i":"ID1","m":"","c":"","g":"","t":5,"e":"m"}'
    assert decode_registration(old).enrolled_by == ""
    stored = Registration("r1", "ID1", enrolled_by="CN=desk")
    assert decode_registration(encode_registration(stored)) == stored


@pytest.mark.parametrize("backend", ["milvus"])
def test_milvus_collection_made_before_enrolled_by(make_server, keys, faces, tmp_path,
                                                    backend):
    """Milvus Lite cannot add a field: the node serves the old collection, records no
    enrolling principal, and a desk's GetRegistration finds nothing (fails closed)."""
    lite = tmp_path / "milvus.db"
    _make_legacy_registrations(lite)
    server = secured(make_server, keys)
    desk = stub(server, keys, "registration")
    person = faces.persons(1)[0]
    desk.Enroll(pb.EnrollRequest(registration=registration("r-old", "ID-OLD"),
                                 face=face(person)), timeout=30)
    reply = desk.Check(pb.CheckRequest(face=face(person), claimed_id_number="ID-OLD"),
                       timeout=30)
    assert reply.verdict == pb.SAME_PERSON
    error = refused(desk.GetRegistration, pb.GetRegistrationRequest(registration_id="r-old"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    shown = stub(server, keys, "admin").GetRegistration(
        pb.GetRegistrationRequest(registration_id="r-old"), timeout=30, metadata=CASE)
    assert (shown.id_number, shown.enrolled_by) == ("ID-OLD", "")


def _make_legacy_registrations(lite: Path) -> None:
    """The registrations collection as the release before enrolled_by made it."""
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=str(lite))
    schema = client.create_schema(auto_id=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    for name, size in {"registration_id": 512, "id_number": 256, "msisdn": 128,
                       "carrier": 256, "region": 256, "embedding_model": 256}.items():
        schema.add_field(name, DataType.VARCHAR, max_length=size)
    schema.add_field("enrolled_at_us", DataType.INT64)
    schema.add_field("state", DataType.INT8)
    schema.add_field("claimed_at_us", DataType.INT64)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=512)
    client.create_collection("dedup_registrations", schema=schema, consistency_level="Strong")
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="IP")
    client.create_index("dedup_registrations", index)
    client.close()


def test_desks_send_photos_and_enrol_checked_unless_allowed(make_server, keys, faces, crops):
    """A desk that embeds a blurred capture itself escapes the capture gate, and one that
    enrols without check_first stores a face unsearched (and uncharged): the outside check's
    blurred fraudster got CLEAR that way. By default both are PERMISSION_DENIED naming the
    field, nothing stored; photos with check_first and the admin's embeddings go on."""
    server = secured(make_server, keys, queries=QueryLimits())  # the defaults
    desk, admin = stub(server, keys, "registration"), stub(server, keys, "admin")
    embedding = face(faces.persons(1)[0])
    photo = pb.Face(image=crops["t1"][0].path.read_bytes())
    for call, request, field in (
            (desk.Check, pb.CheckRequest(face=embedding, claimed_id_number="ID-1"),
             "face.embedding"),
            (desk.Enroll, pb.EnrollRequest(registration=registration("d1", "ID-1"),
                                           face=embedding, check_first=True), "face.embedding"),
            (desk.Enroll, pb.EnrollRequest(registration=registration("d1", "ID-1"),
                                           face=photo), "check_first")):
        error = refused(call, request)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and field in error.details()
    streamed = list(desk.EnrollStream(iter([pb.EnrollRequest(
        registration=registration("d2", "ID-2"), face=photo)]), timeout=30))
    assert streamed[0].error.code == "PERMISSION_DENIED"
    assert desk.Enroll(pb.EnrollRequest(registration=registration("d1", "ID-1"), face=photo,
                                        check_first=True), timeout=30).enrolled
    assert admin.Enroll(pb.EnrollRequest(registration=registration("a1", "ID-A"),
                                         face=embedding), timeout=30).enrolled
    assert admin.Stats(pb.StatsRequest(), timeout=30).registrations == 2
