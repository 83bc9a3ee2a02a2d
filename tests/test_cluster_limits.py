"""FindClusters cannot be driven quadratic (#13 finding 7): min_score at or above the review
threshold, caps on pairs per registration and on cluster size (a cut-off cluster says so),
one job per caller and a few in all. Real TLS, keys from `dedup keys`, both backends."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, face
from secure import channel, tokens
from trail import records

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.security import load_security
from dedup.core.settings import QueryLimits

CASE = {"case_id": "CASE-12", "purpose": "ring sweep"}
# Rings whose cluster messages add up to ~200 KB: more than a client's receive window and
# the server's write buffer, so that a job stops at a stream its client does not read.
RINGS, RING_MEMBERS = 40, 20


def secured(make_server, keys: Path, **limits: int):
    return make_server(security=load_security(keys / "security.toml"),
                       queries=dataclasses.replace(DESKS_SEND_EMBEDDINGS, **limits))


def plant(server, keys: Path, faces, members: int, rings: int = 1,
          long_fields: bool = False) -> None:
    """`rings` people, each enrolled under `members` ID numbers, and some strangers."""
    pad = "x" * 50 if long_fields else ""
    requests = [pb.EnrollRequest(
        registration=pb.Registration(registration_id=f"ring-{r}-{i}",
                                     id_number=f"ID-{r}-{i}-{pad}", carrier=pad, region=pad),
        face=face(faces.capture(person, 0.3)))
        for r, person in enumerate(faces.persons(rings)) for i in range(members)]
    requests += [pb.EnrollRequest(registration=pb.Registration(
        registration_id=f"stranger-{i}", id_number=f"S-{i}"), face=face(vector))
        for i, vector in enumerate(faces.persons(20))]
    with channel(server.port, keys, role="admin") as ch:
        replies = list(pb_grpc.FaceDedupStub(ch).EnrollStream(iter(requests), timeout=120))
    assert all(reply.enrolled for reply in replies)


def investigate(server, keys: Path, role: str = "investigator", token: bool = False,
                slow: bool = False) -> pb_grpc.InvestigateStub:
    """By the role's client certificate, or its token; `slow`: a client whose receive
    window stays at gRPC's initial 64 KiB (no BDP probing), so that a stream it does not
    read holds the server at the first message past that."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(keys / "ca.crt").read_bytes(),
        private_key=None if token else (keys / f"{role}.key").read_bytes(),
        certificate_chain=None if token else (keys / f"{role}.crt").read_bytes())
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(tokens(keys)[role]))
    port = server.server.token_port if token else server.port
    options = [("grpc.http2.bdp_probe", 0)] if slow else []
    return pb_grpc.InvestigateStub(
        grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options))


def clusters(stub: pb_grpc.InvestigateStub, **request) -> list[pb.Cluster]:
    updates = stub.FindClusters(pb.FindClustersRequest(**CASE, **request), timeout=120)
    return [update.cluster for update in updates if update.HasField("cluster")]


def refused(stub: pb_grpc.InvestigateStub, **request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        clusters(stub, **request)
    return error.value


def test_min_score_below_the_review_threshold_is_refused(make_server, keys, faces):
    server = secured(make_server, keys)
    plant(server, keys, faces, 3)
    stub = investigate(server, keys)
    for low in (-1.0, 0.29):
        error = refused(stub, min_score=low)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_score" in error.details() and "review threshold" in error.details()
    (ring,) = clusters(stub, min_score=0.30)
    assert len(ring.registrations) == 3 and not ring.truncated
    server.stop()
    refusals = [r for r in records(server) if r["method"] == "Investigate.FindClusters"][:2]
    assert [r["query"]["outcome"] for r in refusals] == ["INVALID_ARGUMENT"] * 2


def test_cluster_size_cap_cuts_a_ring_and_says_so(make_server, keys, faces):
    server = secured(make_server, keys, max_cluster_size=10)
    plant(server, keys, faces, 25)
    found = clusters(investigate(server, keys))
    members = [r.registration_id for cluster in found for r in cluster.registrations]
    assert len(members) == len(set(members)) == 25  # each reported once
    for cluster in found:
        assert len(cluster.registrations) <= 10
        assert cluster.truncated and list(cluster.truncated_by) == ["max_cluster_size"]


def test_pairs_cap_cuts_a_ring_and_says_so(make_server, keys, faces):
    server = secured(make_server, keys, max_pairs_per_registration=3)
    plant(server, keys, faces, 25)
    found = clusters(investigate(server, keys))
    members = [r.registration_id for cluster in found for r in cluster.registrations]
    assert len(members) == len(set(members))
    assert found and all(c.truncated and "max_pairs_per_registration" in c.truncated_by
                         for c in found)


def test_one_job_per_caller_and_a_global_limit(make_server, keys, faces):
    server = secured(make_server, keys, cluster_jobs=2)
    plant(server, keys, faces, RING_MEMBERS, RINGS, long_fields=True)
    first = investigate(server, keys, slow=True)
    # Not read: the job stops once its messages fill the window and the write buffer.
    running = first.FindClusters(pb.FindClustersRequest(**CASE), timeout=120)
    time.sleep(1.0)
    second = refused(first)
    assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "CN=investigator-client" in second.details()
    # Another caller may run one, up to the global limit of two.
    other = investigate(server, keys, token=True, slow=True)
    also = other.FindClusters(pb.FindClustersRequest(**CASE), timeout=120)
    time.sleep(1.0)
    third = refused(investigate(server, keys, role="admin"))
    assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 jobs" in third.details()
    # Jobs read to their end, or cancelled, give their slots back.
    assert len([u for u in also if u.HasField("cluster")]) == RINGS
    running.cancel()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert len(clusters(first)) == RINGS
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled job kept its slot"
            time.sleep(0.2)


@pytest.mark.parametrize("field", ["cluster_jobs", "max_cluster_size", "cluster_job_threads"])
def test_query_limits_out_of_range_are_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=field):
        QueryLimits(**{field: -1})
