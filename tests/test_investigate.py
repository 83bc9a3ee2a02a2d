"""Investigate: Search, Links and FindClusters on a gallery with planted fraud clusters."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import RunningServer, face

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.settings import IndexConfig

BACKGROUND = 1500
# Planted: one person under several ID numbers (the fraud), 1-2 captures under each.
FRAUD_IDS = [2, 3, 2, 4, 2, 3, 2, 2]
SAME_ID_GROUPS = 5  # one person, three captures, one ID number: never a cluster


class EmbeddedGallery:
    def __init__(self, server: RunningServer) -> None:
        generator = FaceGenerator(21)
        self.server = server
        self.stub = pb_grpc.InvestigateStub(server.channel)
        self.requests: list[pb.EnrollRequest] = []
        self.vectors: dict[str, np.ndarray] = {}
        self.clusters: list[set[str]] = []
        self.person_of_cluster: list[np.ndarray] = []
        for i, person in enumerate(generator.persons(BACKGROUND)):
            self._add(f"bg{i}", f"BG{i}", person, carrier="A" if i % 2 else "B")
        for c, (ids, person) in enumerate(zip(FRAUD_IDS, generator.persons(len(FRAUD_IDS)),
                                              strict=True)):
            members = set()
            for j in range(ids):
                for n in range(1 + (j + c) % 2):
                    registration_id = f"fr{c}-{j}-{n}"
                    self._add(registration_id, f"FR{c}-{j}", generator.capture(person),
                              carrier="A" if n else "C")
                    members.add(registration_id)
            self.clusters.append(members)
            self.person_of_cluster.append(person)
        for g, person in enumerate(generator.persons(SAME_ID_GROUPS)):
            for n in range(3):
                self._add(f"same{g}-{n}", f"SAME{g}", generator.capture(person))
        replies = list(server.stub.EnrollStream(iter(self.requests)))
        assert all(reply.enrolled for reply in replies)

    def _add(self, registration_id: str, id_number: str, vector: np.ndarray,
             carrier: str = "") -> None:
        self.vectors[registration_id] = vector
        self.requests.append(pb.EnrollRequest(
            registration=pb.Registration(registration_id=registration_id, id_number=id_number,
                                         carrier=carrier, region="north"),
            face=face(vector)))


@pytest.fixture(scope="module", params=["Flat", "BinarySign512"])
def gallery(tmp_path_factory, request):
    """Flat: clusters from the exact index; BinarySign512: from sign-code candidates."""
    server = RunningServer(ServerConfig(
        store=StoreConfig(data_dir=tmp_path_factory.mktemp("investigate") / "data"),
        index=IndexConfig(index_factory=request.param)))
    yield EmbeddedGallery(server)
    server.stop()


CASE = {"case_id": "CASE-2026-0042", "purpose": "SIM fraud ring review"}


def clusters_of(gallery: EmbeddedGallery, **request
                ) -> tuple[list[pb.Cluster], list[pb.ClusterProgress]]:
    updates = list(gallery.stub.FindClusters(pb.FindClustersRequest(**CASE, **request)))
    return ([u.cluster for u in updates if u.HasField("cluster")],
            [u.progress for u in updates if u.HasField("progress")])


def test_find_clusters_finds_every_planted_cluster_and_nothing_else(gallery):
    clusters, progress = clusters_of(gallery)
    found = [{r.registration_id for r in cluster.registrations} for cluster in clusters]
    assert sorted(map(sorted, found)) == sorted(map(sorted, gallery.clusters))
    for cluster in clusters:
        assert len(cluster.id_numbers) >= 2 and cluster.min_link_score >= 0.40
    total = BACKGROUND + sum(len(c) for c in gallery.clusters) + 3 * SAME_ID_GROUPS
    assert progress[-1].searched == progress[-1].total == total
    assert progress[-1].clusters == len(gallery.clusters)
    assert [p.searched for p in progress] == sorted(p.searched for p in progress)


def test_find_clusters_min_distinct_id_numbers(gallery):
    clusters, _ = clusters_of(gallery, min_distinct_id_numbers=3)
    assert sorted(len(c.id_numbers) for c in clusters) == sorted(n for n in FRAUD_IDS if n >= 3)


def test_links_of_a_planted_id_number(gallery):
    reply = gallery.stub.Links(pb.LinksRequest(**CASE, id_number="FR3-0"))
    assert {r.registration_id for r in reply.registrations} == {
        r for r in gallery.clusters[3] if r.startswith("fr3-0-")}
    assert {link.id_number for link in reply.linked} == {f"FR3-{j}" for j in range(1, 4)}
    for link in reply.linked:
        assert link.best_score >= 0.40
        assert link.registration_id in gallery.clusters[3]
        assert link.matched_registration_id.startswith("fr3-0-")
        expected = float(gallery.vectors[link.registration_id]
                         @ gallery.vectors[link.matched_registration_id])
        assert link.best_score == pytest.approx(expected, abs=1e-4)
    assert [link.best_score for link in reply.linked] == sorted(
        (link.best_score for link in reply.linked), reverse=True)


def test_links_of_an_honest_id_number_and_an_unknown_one(gallery):
    assert list(gallery.stub.Links(pb.LinksRequest(**CASE, id_number="BG7")).linked) == []
    assert list(gallery.stub.Links(pb.LinksRequest(**CASE, id_number="SAME1")).linked) == []
    with pytest.raises(grpc.RpcError) as missing:
        gallery.stub.Links(pb.LinksRequest(**CASE, id_number="NOBODY"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def search(gallery: EmbeddedGallery, **request) -> list[pb.Match]:
    return list(gallery.stub.Search(pb.SearchRequest(**CASE, **request)).matches)


def test_search_by_face_top_k_and_min_score(gallery):
    person = gallery.person_of_cluster[3]
    probe = face(FaceGenerator(99).capture(person))
    assert len(search(gallery, face=probe, k=2)) == 2
    above = search(gallery, face=probe, k=100, min_score=0.40)
    assert {m.registration.registration_id for m in above} == gallery.clusters[3]
    scores = [m.score for m in search(gallery, face=probe, k=50)]
    assert scores == sorted(scores, reverse=True) and len(scores) == 50


def test_search_by_registration_id_leaves_it_out(gallery):
    found = search(gallery, registration_id="fr1-0-0", k=100, min_score=0.40)
    assert {m.registration.registration_id for m in found} == gallery.clusters[1] - {"fr1-0-0"}


def test_search_filters(gallery):
    probe = face(gallery.person_of_cluster[3])
    only_c = search(gallery, face=probe, k=100, min_score=0.40, carrier="C")
    assert only_c and all(m.registration.carrier == "C" for m in only_c)
    assert {m.registration.registration_id for m in only_c} == {
        r for r in gallery.clusters[3] if r.endswith("-0")}
    assert search(gallery, face=probe, k=100, min_score=0.40, region="south") == []
    # Enrolment times: everything enrolled before the planted cluster 3's first registration.
    first = min(gallery.server.stub.GetRegistration(pb.GetRegistrationRequest(
        registration_id=r)).enrolled_at.ToMicroseconds() for r in gallery.clusters[3])
    until = pb.SearchRequest().enrolled_until
    until.FromMicroseconds(first)
    assert search(gallery, face=probe, k=100, min_score=0.40, enrolled_until=until) == []
    start = pb.SearchRequest().enrolled_from
    start.FromMicroseconds(first)
    assert len(search(gallery, face=probe, k=100, min_score=0.40, enrolled_from=start)) == len(
        gallery.clusters[3])


@pytest.mark.parametrize("request_fields, field", [
    ({"purpose": "p", "registration_id": "bg1"}, "case_id"),
    ({"case_id": "c", "registration_id": "bg1"}, "purpose"),
    ({**CASE}, "probe"),
    ({**CASE, "registration_id": "bg1", "k": 1001}, "k"),
    ({**CASE, "registration_id": "bg1", "min_score": float("nan")}, "min_score"),
    ({**CASE, "registration_id": "bg1", "min_score": 2.0}, "min_score"),
    ({**CASE, "registration_id": "bg1", "carrier": "A\n"}, "carrier"),
])
def test_search_bad_input(gallery, request_fields, field):
    with pytest.raises(grpc.RpcError) as refused:
        gallery.stub.Search(pb.SearchRequest(**request_fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(field)


def test_search_unknown_registration_is_not_found(gallery):
    with pytest.raises(grpc.RpcError) as missing:
        search(gallery, registration_id="nobody")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
