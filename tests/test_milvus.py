"""The Milvus backend across nodes: `dedup serve` processes on one Milvus, racing.

The Milvus is a Milvus Lite server in a process of its own (`python -m milvus_lite server`),
or the session's real Milvus server (tests/milvus_server.py), so the nodes share nothing but
Milvus, as behind a load balancer. The rest of the
service suite runs on Milvus through the `backend` parameter (see conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import check, drop_collections, enroll, milvus_on_server, release_milvus_lite
from milvus_server import drop_collections_of
from processes import ServerProcess
from test_bulk import write_batch
from test_settlements import legacy_settlements
from trail import records

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import BackendUnavailable, StoreError
from dedup.core.records import Registration
from dedup.core.settings import MilvusConfig
from dedup.gallery.milvus import MilvusGallery, connection, schema, status
from dedup.gallery.milvus.schema import (
    PENDING,
    Collections,
    _index_differences,
    _new_key,
    _now_us,
    _Row,
    open_collections,
)
from dedup.gallery.milvus.version import server_version

ROUNDS = 12


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def milvus_lite_server(tmp_path: Path):
    """A Milvus Lite server in a process of its own; its URI."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "lite"),
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("milvus_lite server did not start") from None
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


# Where the racing nodes' Milvus is and how many race: a Milvus Lite server (two nodes), or
# the session's real Milvus server (two nodes, three nodes).
NODES = [pytest.param(("lite", 2), id="lite-2"),
         pytest.param(("server", 2), id="server-2", marks=pytest.mark.milvus_server),
         pytest.param(("server", 3), id="server-3", marks=pytest.mark.milvus_server)]


def milvus_target(kind: str, request: pytest.FixtureRequest) -> tuple[list[str], Any]:
    """`dedup serve` options for one Milvus shared by nodes, and what to drop afterwards: a
    Milvus Lite server process (flushed by the nodes), or the session's real Milvus server in
    a collection prefix of its own."""
    if kind == "lite":
        return ["--milvus-uri", request.getfixturevalue("milvus_lite_server"),
                "--milvus-flush-interval", "0.5"], None
    config = milvus_on_server(request.getfixturevalue("milvus_server"))
    return ["--milvus-uri", config.uri, "--milvus-prefix", config.prefix], config


@pytest.fixture(params=NODES)
def nodes(request: pytest.FixtureRequest, tmp_path: Path):
    """Stubs of dedup nodes (`dedup serve` processes) on one Milvus, each with its own empty
    node directory."""
    kind, count = request.param
    target, on_server = milvus_target(kind, request)
    # Started at once, as a fleet is: every node opens (or creates) the collections together.
    with ThreadPoolExecutor(count) as pool:
        processes = list(pool.map(
            lambda n: ServerProcess(tmp_path / f"node{n}", "--backend", "milvus", *target),
            range(count)))
    channels = [grpc.insecure_channel(node.address) for node in processes]
    yield [pb_grpc.FaceDedupStub(channel) for channel in channels]
    for channel in channels:
        channel.close()
    for node in processes:
        node.process.terminate()
        assert node.wait() == 0
    if on_server is not None:
        drop_collections(on_server)


def _race(calls):
    """Runs the calls at the same moment on their own threads; their results or errors."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except grpc.RpcError as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_nodes_never_both_enrol_one_face(nodes, faces):
    """The same face under other ID numbers, on every node at once: exactly one enrols."""
    people = faces.persons(ROUNDS)
    for n, person in enumerate(people):
        results = _race([partial(enroll, stub, f"n{i}-{n}", f"ID{i}-{n}",
                                 faces.capture(person), check_first=True)
                         for i, stub in enumerate(nodes)])
        assert all(isinstance(r, pb.EnrollResponse) for r in results), results
        enrolled = [r for r in results if r.enrolled]
        refused = [r for r in results if not r.enrolled]
        assert len(enrolled) == 1 and len(refused) == len(nodes) - 1, results
        winner = enrolled[0].registration.registration_id
        for loser in refused:
            assert loser.check.verdict == pb.DUPLICATE_IDENTITY
            assert [m.registration.registration_id for m in loser.check.matches] == [winner]
        for stub in nodes:  # every node sees the one registration at once
            seen = check(stub, faces.capture(person))
            assert [m.registration.registration_id for m in seen.matches] == [winner]
    assert [stub.Stats(pb.StatsRequest()).registrations for stub in nodes] == \
        [ROUNDS] * len(nodes)


def test_a_checked_enrolment_sees_what_another_node_just_acknowledged(nodes, faces):
    """Its look after the stake reads at the stake's timestamp (Session), which is newer
    than every write acknowledged before it, here by another process."""
    for i, person in enumerate(faces.persons(5)):
        assert enroll(nodes[0], f"a{i}", f"IDA{i}", faces.capture(person)).enrolled
        second = enroll(nodes[-1], f"b{i}", f"IDB{i}", faces.capture(person), check_first=True)
        assert not second.enrolled and second.check.verdict == pb.DUPLICATE_IDENTITY
        assert [m.registration.registration_id for m in second.check.matches] == [f"a{i}"]


def test_nodes_never_both_take_one_key(nodes, faces):
    """One registration_id (or msisdn) enrolled on every node at once: one succeeds, the
    others get ALREADY_EXISTS naming the field."""
    for n in range(ROUNDS):
        people = faces.persons(len(nodes))
        msisdn = f"+86138{n:08d}"
        results = _race([partial(enroll, stub, f"same{n}" if n % 2 else f"other{i}-{n}",
                                 f"ID{i}-{n}", person, msisdn=msisdn)
                         for i, (stub, person) in enumerate(zip(nodes, people, strict=True))])
        errors = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(errors) == len(nodes) - 1, results
        for error in errors:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert ("registration_id" if n % 2 else "msisdn") in error.details()


def test_sim_limit_holds_across_nodes(nodes, faces):
    """Every node enrolling the last allowed SIM of one ID at once: only one gets it."""
    person = faces.persons(1)[0]
    for i in range(4):  # max_sims_per_id is 5
        assert enroll(nodes[0], f"s{i}", "ID-S", faces.capture(person), check_first=True).enrolled
    results = _race([partial(enroll, stub, f"s4-{i}", "ID-S", faces.capture(person),
                             check_first=True) for i, stub in enumerate(nodes)])
    assert sorted(r.enrolled for r in results) == [False] * (len(nodes) - 1) + [True], results
    assert check(nodes[-1], faces.capture(person), "ID-S").verdict == pb.SIM_LIMIT_EXCEEDED


def fresh_milvus(kind: str, prefix: str, request: pytest.FixtureRequest) -> MilvusConfig:
    """A prefix no node has opened, on a Milvus Lite server process or the session's server."""
    if kind == "lite":
        return MilvusConfig(uri=request.getfixturevalue("milvus_lite_server"), prefix=prefix)
    return MilvusConfig(uri=request.getfixturevalue("milvus_server").uri, prefix=prefix)


def open_as_a_node(config: MilvusConfig) -> Collections:
    client = connection.connect(config)
    try:
        names, _ = open_collections(client, config, 512, server_version(client))
        return names
    finally:
        client.close()


FRESH = ["lite", pytest.param("server", marks=pytest.mark.milvus_server)]
INDEXED = {"registrations": ["embedding", *schema.LOOKUP_FIELDS],
           "audit": ["placeholder"], "adjudications": ["placeholder", "first", "second"]}


def assert_indexed(config: MilvusConfig, names: Collections) -> None:
    client = connection.connect(config)
    try:
        for collection, fields in INDEXED.items():
            for field in fields:
                name = getattr(names, collection)
                assert client.list_indexes(name, field_name=field), (name, field)
    finally:
        client.close()


@pytest.mark.parametrize("kind", FRESH)
def test_nodes_started_together_on_an_empty_milvus_all_open_it(kind, request):
    """A fleet started at once: every node finds the collections missing and makes them. One
    node's creation failed another's start: Milvus Lite refuses the second creation of a
    collection ("File exists"), and a node that found a collection another had just created
    loaded it before its index existed."""
    def node(config: MilvusConfig, barrier: threading.Barrier) -> Collections:
        barrier.wait()
        return open_as_a_node(config)

    for attempt in range(4):
        config = fresh_milvus(kind, f"fleet{attempt}", request)
        barrier = threading.Barrier(3)
        try:
            with ThreadPoolExecutor(3) as pool:
                opening = [pool.submit(node, config, barrier) for _ in range(3)]
                opened = [future.result() for future in opening]
            assert opened == [Collections.named(config.prefix)] * 3
            assert_indexed(config, opened[0])
        finally:
            drop_collections(config)


@pytest.mark.parametrize("kind", FRESH)
def test_a_collection_left_without_its_index_gets_it_when_a_node_opens(kind, request):
    """A node that died between creating a collection and its indexes, or amid them, left a
    collection Milvus cannot load: the next node to open it builds the missing indexes
    instead of failing to start. One with its embedding index (made last) but no lookup
    indexes, as an older version made it, is served as it was made: no index built on every
    row at start."""
    from pymilvus import DataType

    halfmade = fresh_milvus(kind, "halfmade", request)
    partway = fresh_milvus(kind, "partway", request)  # its maker killed amid the lookups
    older = fresh_milvus(kind, "older", request)
    client = connection.connect(halfmade)
    try:
        for config in (halfmade, partway, older):
            client.create_collection(
                Collections.named(config.prefix).registrations, consistency_level="Strong",
                schema=schema._registration_schema(client, DataType, 512))
        for field in schema.LOOKUP_FIELDS[:2]:  # registration_id, id_number: VARCHAR
            schema._create_index(client, Collections.named(partway.prefix).registrations, field,
                                 {"index_type": server_version(client).scalar_index("VARCHAR")})
        older_registrations = Collections.named(older.prefix).registrations
        schema._create_index(client, older_registrations, "embedding",
                             {"index_type": "FLAT", "metric_type": "IP"})
        assert not client.list_indexes(Collections.named(halfmade.prefix).registrations)
        assert_indexed(halfmade, open_as_a_node(halfmade))
        assert_indexed(partway, open_as_a_node(partway))
        assert open_as_a_node(older) == Collections.named(older.prefix)
        for field in schema.LOOKUP_FIELDS:
            assert not client.list_indexes(older_registrations, field_name=field), field
    finally:
        client.close()
        for config in (halfmade, partway, older):
            drop_collections(config)


@pytest.mark.parametrize("kind", FRESH)
def test_a_refused_creation_no_node_makes_fails_the_start_after_its_wait(kind, request):
    """A refused creation is taken as another node's once the collection shows, within 5 s.
    One that never shows fails the start with Milvus's reason after that wait, and nothing is
    made. What each refuses at creation: Milvus Lite a name past 255 bytes (it takes any
    dimension), the server a dimension past 32,768 (it refuses such a name before, when
    asked whether the collection exists)."""
    prefix, dimension, reason = {"lite": ("r" * 250, 512, "max 255"),
                                 "server": ("refused", 100_000, "100000")}[kind]
    config = fresh_milvus(kind, prefix, request)
    client = connection.connect(config)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot create the collections") as refused:
            schema.create_collections(client, config, dimension, server_version(client))
        waited = time.monotonic() - started
        assert reason in str(refused.value) and waited >= 5.0, (refused.value, waited)
        assert not [name for name in client.list_collections() if name.startswith(prefix)]
    finally:
        client.close()
        drop_collections(config)


@pytest.mark.parametrize("kind", FRESH)
def test_settlements_another_node_moved_meanwhile_are_taken_as_moved(kind, request):
    """The nodes of an upgraded fleet start together, and each moves the older version's
    settlements (keyed by registration_id) into the collection keyed by registration, then
    drops the old one. A node still reading the old collection when another had dropped it
    failed to start ("collection not found"): it now takes the move as done."""
    from pymilvus.exceptions import MilvusException

    from dedup.gallery.milvus.adjudications import Adjudications

    config = fresh_milvus(kind, "upgraded", request)
    clients = []
    pairs = 1_100  # both orders stored: the move reads pages of 1,000, 1,000 and 200 rows
    try:
        names = open_as_a_node(config)
        legacy = names.legacy_adjudications
        clients += [connection.connect(config), connection.connect(config)]
        client, other = clients
        legacy_settlements(client, legacy, [(f"r{i}", f"m{i}") for i in range(pairs)])

        def key_of(registration_id: str) -> int:
            return int(registration_id[1:]) * 2 + (registration_id[0] == "m")

        moved_by_the_other: list[int] = []

        def key_of_while_the_other_moves(registration_id: str) -> int:
            if not moved_by_the_other:  # the other node moves every pair and drops it
                moved_by_the_other.append(
                    Adjudications(other, names.adjudications).convert_legacy(legacy, key_of))
            return key_of(registration_id)

        def key_of_while_milvus_fails(registration_id: str) -> int:
            raise MilvusException(message="a Milvus error while the collection is there")

        with pytest.raises(MilvusException, match="while the collection is there"):
            Adjudications(client, names.adjudications).convert_legacy(
                legacy, key_of_while_milvus_fails)
        assert client.has_collection(legacy)

        moved = Adjudications(client, names.adjudications).convert_legacy(
            legacy, key_of_while_the_other_moves)
        assert moved_by_the_other == [pairs] and moved == 0
        assert not client.has_collection(legacy)
        settled = Adjudications(client, names.adjudications)
        assert all(settled.settled(key_of(f"r{i}")).keys() == {key_of(f"m{i}")}
                   for i in (0, 999, pairs - 1))
        assert client.query(names.adjudications, filter="key >= 0", output_fields=["count(*)"],
                            consistency_level="Strong")[0]["count(*)"] == 2 * pairs
    finally:
        for opened in clients:
            opened.close()
        drop_collections(config)


@pytest.mark.parametrize("backend", ["milvus", "milvus-server"])
def test_a_checked_enrolment_waits_for_milvus_only_before_its_claim(make_server, faces):
    """A Strong read waits for Milvus's next time tick. A check_first enrolment makes three,
    before it stakes its claim (is the registration_id taken, is it enrolled, its
    settlements: the caller is trusted); its look at the gallery after the stake reads at
    the stake's own timestamp, which every write acknowledged before it precedes, and
    finds what a Strong read would: the duplicate, the enrolment acknowledged just before."""
    server = make_server()
    client = server.server.gallery._rows.client
    people = faces.persons(11)
    for i, person in enumerate(people[:10]):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    before = client.strong_reads
    fresh = enroll(server.stub, "fresh", "ID-F", faces.capture(people[10]), check_first=True)
    assert fresh.enrolled and fresh.check.verdict == pb.CLEAR
    duplicate = enroll(server.stub, "dup", "ID-D", faces.capture(people[3]), check_first=True)
    assert not duplicate.enrolled and duplicate.check.verdict == pb.DUPLICATE_IDENTITY
    assert [m.registration.registration_id for m in duplicate.check.matches] == ["r3"]
    again = enroll(server.stub, "again", "ID-A", faces.capture(people[10]), check_first=True)
    assert not again.enrolled  # the enrolment acknowledged just before is seen
    assert [m.registration.registration_id for m in again.check.matches] == ["fresh"]
    assert client.strong_reads - before == 3 * 3  # 22 for these three when all were Strong


@pytest.mark.parametrize("backend", ["milvus"])
def test_an_abandoned_claim_holds_until_it_expires(make_server, faces, tmp_path):
    """A node killed mid-enrolment leaves a PENDING row: as the earlier claim it wins, so
    its face and msisdn stay taken until claim_timeout_s; then others ignore it."""
    config = MilvusConfig(uri=str(tmp_path / "milvus.db"), flush_interval_s=0.5,
                          claim_timeout_s=3.0)
    server = make_server(milvus=config)
    person = faces.persons(1)[0]
    model_id = server.server.gallery.model_id
    dead = MilvusGallery(config, model_id, background=False)
    dead._upsert(_Row(_new_key(), Registration("ghost", "ID-G", "+8613800000000",
                                               embedding_model=model_id),
                      PENDING, _now_us()), faces.capture(person))
    same_face = enroll(server.stub, "fresh", "ID-F", faces.capture(person), check_first=True)
    assert not same_face.enrolled and same_face.check.verdict == pb.DUPLICATE_IDENTITY
    with pytest.raises(grpc.RpcError) as taken:
        enroll(server.stub, "other", "ID-O", faces.persons(1)[0], msisdn="+8613800000000")
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    time.sleep(3.2)  # the claim has expired: nobody counts it any more
    retried = enroll(server.stub, "fresh", "ID-F", faces.capture(person), check_first=True,
                     msisdn="+8613800000000")
    assert retried.enrolled and retried.check.verdict == pb.CLEAR
    with pytest.raises(grpc.RpcError) as missing:
        server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="ghost"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    dead.close(checkpoint=False)


def _migrate(source: Path, target: MilvusConfig, *options: str
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "migrate", "--from",
                           str(source), "--to", target.uri, "--milvus-prefix", target.prefix,
                           *options],
                          capture_output=True, text=True, timeout=300)


COPYING = ("--batch", "64", "--sample", "40")


def _ivf_options(nlist: int, nprobe: int) -> list[str]:
    return ["--milvus-index-type", "IVF_FLAT", "--milvus-index-params",
            json.dumps({"nlist": nlist}), "--milvus-search-params", json.dumps({"nprobe": nprobe})]


@contextmanager
def _unmade_target(tmp_path: Path, to: str, request: pytest.FixtureRequest
                   ) -> Iterator[MilvusConfig]:
    """A Milvus Lite file, or a prefix on the session server whose collections are not made
    ahead (so that migrate creates them with its index); released or dropped afterwards."""
    pooled = MilvusConfig(uri=str(tmp_path / "migrated.db"), flush_interval_s=0.5) \
        if to == "lite" else milvus_on_server(request.getfixturevalue("milvus_server"))
    target = dataclasses.replace(pooled, prefix=f"{pooled.prefix}ivf")
    try:
        yield target
    finally:
        if to == "lite":
            release_milvus_lite(Path(target.uri))
        else:
            drop_collections(target)
            drop_collections(pooled)


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("to", ["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def test_migrate_copies_verifies_and_resumes(make_server, faces, tmp_path, to, request):
    source = make_server()
    people = faces.persons(300)
    for i, person in enumerate(people):
        enroll(source.stub, f"r{i}", f"ID{i}", person, msisdn=f"+86139{i:08d}")
    enroll(source.stub, "r0-again", "ID-OTHER", faces.capture(people[0]))
    investigate = pb_grpc.InvestigateStub(source.channel)
    investigate.Search(pb.SearchRequest(case_id="C-1", purpose="migration test",
                                        registration_id="r0", k=3))
    probe = faces.capture(people[0])
    before = check(source.stub, probe, "ID0")
    source.stop()
    target = MilvusConfig(uri=str(tmp_path / "migrated.db"), flush_interval_s=0.5) \
        if to == "lite" else milvus_on_server(request.getfixturevalue("milvus_server"))
    try:
        _copy_resume_and_serve(make_server, source, target, probe, before)
        _copy_again_or_refuse(source.data_dir, target)
    finally:
        if to == "lite":
            release_milvus_lite(Path(target.uri))
        else:
            drop_collections(target)


def _copy_resume_and_serve(make_server, source, target: MilvusConfig, probe: np.ndarray,
                           before: pb.CheckResponse) -> None:
    first = _migrate(source.data_dir, target, *COPYING)
    assert first.returncode == 0, first.stderr
    assert "copied 301 registrations, 1 audit records" in first.stdout
    assert "store 301 registrations, Milvus 301; 40/40 sampled" in first.stdout
    state = source.data_dir / "milvus-migration.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps(saved | {"last_key": 150}))  # as if cut off after key 150
    resumed = _migrate(source.data_dir, target, *COPYING)
    assert resumed.returncode == 0, resumed.stderr
    assert "copied 151 registrations (resumed after key 150)" in resumed.stdout
    assert "Milvus 301" in resumed.stdout and "verified" in resumed.stdout

    migrated = make_server(milvus=target)
    after = check(migrated.stub, probe, "ID0")
    assert after.verdict == before.verdict == pb.DUPLICATE_IDENTITY
    assert [(m.registration.registration_id, round(m.score, 5)) for m in after.matches] == \
        [(m.registration.registration_id, round(m.score, 5)) for m in before.matches]
    assert migrated.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="r7")) \
        .msisdn == "+8613900000007"
    migrated.stop()
    assert [r["method"] for r in records(migrated)] == ["Investigate.Search"]


def _copy_again_or_refuse(data_dir: Path, target: MilvusConfig) -> None:
    """A target made anew since the state file was written is copied from the start (it
    failed verification on every run before); one missing part of the earlier copy (erased
    there since?) is refused, not copied back."""
    # As an operator starting the target over.
    _in_target(target, lambda client, _: drop_collections_of(client, target.prefix))
    again = _migrate(data_dir, target, *COPYING)
    assert again.returncode == 0, again.stderr
    assert "copied 301 registrations (from the start: the target holds nothing" in again.stdout
    assert "Milvus 301" in again.stdout and "verified" in again.stdout

    _in_target(target, lambda client, name: client.delete(name, ids=[5]))
    refused = _migrate(data_dir, target, *COPYING)
    assert refused.returncode == 1
    assert "the target holds 300 of the 301 registrations an earlier run copied" in \
        refused.stderr


@pytest.mark.parametrize("backend", ["embedded"])
def test_migrate_beside_a_server_is_refused_and_a_copy_differing_by_key_fails(
        make_server, faces, tmp_path):
    """A migration beside a running server (deletions copied back, enrolments missed) is
    refused. Between two runs the store erased r9 and the target lost r5's row: the counts
    agreed, so the copy was 'verified' with an erased person in Milvus and an enrolment
    missing. It is compared key by key now."""
    source = make_server()
    for i, person in enumerate(faces.persons(40)):
        enroll(source.stub, f"r{i}", f"ID{i}", person)
    target = MilvusConfig(uri=str(tmp_path / "migrated.db"), flush_interval_s=0.5)
    try:
        beside = _migrate(source.data_dir, target, *COPYING)
        assert beside.returncode == 1 and "in use by another dedup process" in beside.stderr
        source.stop()
        assert _migrate(source.data_dir, target, *COPYING).returncode == 0
        source.restart()
        source.stub.Delete(pb.DeleteRequest(registration_id="r9"))
        source.stop()
        _in_target(target, lambda client, name: client.delete(name, ids=[6]))  # r5's key
        state = source.data_dir / "milvus-migration.json"
        state.write_text(json.dumps(json.loads(state.read_text()) | {"last_key": 20}))
        differing = _migrate(source.data_dir, target, *COPYING)
        assert differing.returncode == 1, differing.stdout
        assert "store 39 registrations, Milvus 39 (1 of the store's missing, 1 not in the " \
            "store)" in differing.stdout
        assert "VERIFICATION FAILED" in differing.stderr
    finally:
        release_milvus_lite(Path(target.uri))


def _in_target(target: MilvusConfig, change: Callable[[Any, str], object]) -> None:
    """`change(client, collection)` on the target's registrations, as an operator would."""
    from pymilvus import MilvusClient

    lite = "://" not in target.uri
    if lite:
        release_milvus_lite(Path(target.uri))
    client = MilvusClient(uri=target.uri)
    try:
        name = f"{target.prefix}_registrations"
        client.load_collection(name)
        change(client, name)
    finally:
        client.close()
        if lite:
            release_milvus_lite(Path(target.uri))


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("to", ["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def test_migrate_builds_the_index_asked_and_nodes_of_another_are_refused(
        make_server, faces, tmp_path, to, request):
    """migrate takes the index parameters serve takes; a node configured for another index
    than its collection's would search with the wrong parameters, so it is refused."""
    source = make_server()
    for i, person in enumerate(faces.persons(40)):
        enroll(source.stub, f"r{i}", f"ID{i}", person)
    source.stop()
    ivf = {"index_type": "IVF_FLAT", "index_params": {"nlist": 16},
           "search_params": {"nprobe": 1}}
    refused = [("type IVF_FLAT (this node: FLAT)", {}),
               ("nlist 16 (this node: 32)", ivf | {"index_params": {"nlist": 32}})]
    with _unmade_target(tmp_path, to, request) as target:
        migrated = _migrate(source.data_dir, target, *_ivf_options(16, 1), "--sample", "10")
        assert migrated.returncode == 0, migrated.stderr
        assert "10/10 sampled searches found their own registration first (IVF_FLAT is " \
            "approximate" in migrated.stdout
        for message, index in refused:
            with pytest.raises(StoreError, match=re.escape(message)):
                MilvusGallery(dataclasses.replace(target, **index), "model-x",
                              background=False).close(checkpoint=False)
        # The same index, its type in any case and its parameters as strings or floats.
        same = ivf | {"index_type": "ivf_flat", "index_params": {"nlist": "16.0"}}
        gallery = MilvusGallery(dataclasses.replace(target, **same), "model-x",
                                background=False)
        assert gallery.stats().registrations == 40
        gallery.close(checkpoint=False)


@pytest.mark.parametrize("to", ["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def test_migrate_into_an_approximate_index_verifies_each_sample_finds_itself(
        tmp_path, to, request):
    """An approximate index's top-10 of unrelated registrations rightly differs from the exact
    one: the verification failed every migration into IVF at 1,000,000 registrations."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_batch(folder, "strangers", 0, 4000, seed=5)
    data_dir = tmp_path / "data"
    imported = subprocess.run([sys.executable, "-m", "dedup", "import",
                               str(folder / "strangers.npy"), "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    with _unmade_target(tmp_path, to, request) as target:
        migrated = _migrate(data_dir, target, *_ivf_options(64, 1), "--sample", "20")
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert "20/20 sampled searches found their own registration first" in migrated.stdout


def test_an_index_of_another_metric_or_parameters_is_named_and_autoindex_passes():
    config = MilvusConfig(uri="x.db", index_type="hnsw", index_params={"M": 16})
    assert _index_differences({"index_type": "HNSW", "metric_type": "IP",
                               "params": '{"M": "16"}'}, config) == []
    assert _index_differences({"index_type": "AUTOINDEX", "M": "16"}, config) == []
    assert _index_differences({"index_type": "HNSW", "metric_type": "L2", "M": 8},
                              config) == ["M 8 (this node: 16)", "metric L2 (dedup scores by IP)"]


def test_keys_with_quotes_and_backslashes_are_found_and_deleted(server, faces):
    """Milvus filters quote strings: a key that looks like filter syntax is just a key."""
    tricky = 'ID "7" \\ or id_number != ""'
    person = faces.persons(1)[0]
    assert enroll(server.stub, 'r"1\\', tricky, person, msisdn="+8613700000001").enrolled
    enroll(server.stub, "plain", "ID-PLAIN", faces.persons(1)[0])
    assert check(server.stub, faces.capture(person), tricky).verdict == pb.SAME_PERSON
    assert server.stub.GetRegistration(
        pb.GetRegistrationRequest(registration_id='r"1\\')).id_number == tricky
    deleted = server.stub.Delete(pb.DeleteRequest(id_number=tricky))
    assert list(deleted.registration_ids) == ['r"1\\']
    assert server.stub.Stats(pb.StatsRequest()).registrations == 1


def test_a_node_on_a_new_prefix_beside_filled_ones_is_warned(tmp_path, caplog):
    """A mistyped --milvus-prefix serves empty collections (CLEAR for everyone): the node
    creating them says which prefixes this Milvus holds registrations under."""
    lite = tmp_path / "milvus.db"
    warned: list[list[str]] = []
    try:
        for prefix in ("carrier", "carrier", "carier"):
            caplog.clear()
            gallery = MilvusGallery(MilvusConfig(uri=str(lite), prefix=prefix), "model-x",
                                    background=False)
            gallery.close(checkpoint=False)
            warned.append([r.getMessage() for r in caplog.records
                           if r.levelname == "WARNING" and r.name == "dedup.milvus"])
        assert warned[:2] == [[], []]  # the first prefix, made and opened again
        assert len(warned[2]) == 1
        assert "creating the empty collection carier_registrations" in warned[2][0]
        assert "the prefix(es) carrier:" in warned[2][0]
    finally:
        release_milvus_lite(lite)


def _stats_at_once(gallery: MilvusGallery, monkeypatch: pytest.MonkeyPatch, callers: int = 8
                   ) -> tuple[list[object], int]:
    """Stats from `callers` threads, all of them arrived while the first computation runs:
    each one's figures or error, and how many computations ran."""
    real, computations = status.gallery_stats, []
    first_may_end, arrived = threading.Event(), threading.Semaphore(0)

    def held(*args: Any) -> Any:
        computations.append(args)
        if len(computations) == 1:
            first_may_end.wait(30)
        return real(*args)

    def call() -> None:
        arrived.release()
        try:
            outcomes.append(gallery.stats())
        except Exception as error:
            outcomes.append(error)

    monkeypatch.setattr(status, "gallery_stats", held)
    outcomes: list[object] = []
    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for _ in threads:
        arrived.acquire(timeout=30)
    time.sleep(0.2)  # each is past its first line, waiting for the computation
    first_may_end.set()
    for thread in threads:
        thread.join(60)
    monkeypatch.setattr(status, "gallery_stats", real)
    return outcomes, len(computations)


def test_stats_at_once_share_computations_and_failures(tmp_path, faces, monkeypatch):
    """Stats counts distinct ID numbers by a scan of the collection: callers at once share
    computations, and their failures (eight at once on 100,000 rows of Milvus Lite each ran
    past the call's time limit; a failure each waiter then repeated would queue them). And
    a call past its time limit is UNAVAILABLE, not an internal error: pymilvus lets grpc's
    DEADLINE_EXCEEDED out as it is."""
    lite = tmp_path / "milvus.db"
    gallery = MilvusGallery(MilvusConfig(uri=str(lite)), "model-x", background=False)
    again = None
    try:
        gallery.insert_rows([(i + 1, Registration(f"r{i}", f"ID{i % 900}",
                                                  embedding_model="model-x"), vector)
                             for i, vector in enumerate(faces.persons(1_000))])
        client = gallery._rows.client
        before = client.calls_made
        assert gallery.stats().distinct_id_numbers == 900
        scanned_once, before = client.calls_made - before, client.calls_made
        assert gallery.stats().distinct_id_numbers == 900
        cached = client.calls_made - before

        again = MilvusGallery(MilvusConfig(uri=str(lite)), "model-x", background=False)
        before = again._rows.client.calls_made
        outcomes, computations = _stats_at_once(again, monkeypatch)
        assert [getattr(o, "distinct_id_numbers", o) for o in outcomes] == [900] * 8
        # The first caller's, and one for the seven that arrived while it ran.
        assert computations == 2
        assert again._rows.client.calls_made - before == scanned_once + cached

        monkeypatch.setattr(connection, "CALL_TIMEOUT_S", 1e-6)
        with pytest.raises(BackendUnavailable, match="DEADLINE_EXCEEDED"):
            again.comparable_count()
        outcomes, computations = _stats_at_once(again, monkeypatch)
        assert computations == 2
        assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
    finally:
        if again is not None:
            again.close(checkpoint=False)
        gallery.close(checkpoint=False)
        release_milvus_lite(lite)


def test_iteration_covers_every_registration_in_key_order(tmp_path, faces):
    """Pages of a Milvus query with a limit are any matching rows, not the first ones:
    iteration (FindClusters, Stats) must still see every registration once, in key order."""
    lite = tmp_path / "milvus.db"
    gallery = MilvusGallery(MilvusConfig(uri=str(lite)), "model-x", background=False)
    try:
        vectors = faces.persons(700)
        keys = [int(key) for key in np.random.default_rng(3).choice(2**62, 700, replace=False)]
        by_key = dict(zip(keys, vectors, strict=True))
        gallery.insert_rows([
            (key, Registration(f"r{i}", f"ID{i % 350}", embedding_model="model-x"), vector)
            for i, (key, vector) in enumerate(by_key.items())])
        seen: list[int] = []
        for page_keys, matrix in gallery.iter_vectors(100):
            seen += page_keys
            assert np.allclose(matrix, np.vstack([by_key[key] for key in page_keys]))
        assert seen == sorted(keys)
        assert gallery.stats().distinct_id_numbers == 350
    finally:
        gallery.close(checkpoint=False)
        release_milvus_lite(lite)


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "audit", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("backend", ["milvus"])
def test_milvus_audit_chains_verify_export_and_show_an_edit(make_server, faces, tmp_path):
    server = make_server()
    enroll(server.stub, "r0", "ID0", faces.persons(1)[0])
    case = {"case_id": "C-9", "purpose": "chain test"}
    for _ in range(2):  # two node processes' lifetimes: two chains
        investigate = pb_grpc.InvestigateStub(server.channel)
        for _ in range(3):
            investigate.Search(pb.SearchRequest(**case, registration_id="r0", k=1))
        server.restart()
    server.stop()
    uri = server.config.milvus.uri
    release_milvus_lite(Path(uri))

    intact = _audit("verify", "--milvus-uri", uri)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "audit trail intact: 2 chain(s), 6 records" in intact.stdout
    exported = _audit("export", "--milvus-uri", uri)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["case_id"] for line in lines] == ["C-9"] * 6
    assert [line["time"] for line in lines] == sorted(line["time"] for line in lines)

    _edit_second_record(uri)
    broken = _audit("verify", "--milvus-uri", uri)
    assert broken.returncode == 1
    assert "BROKEN at record 2: record 2 was edited" in broken.stdout
    assert "1 broken" in broken.stdout


def _edit_second_record(uri: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        client.load_collection("dedup_audit")
        (row,) = client.query("dedup_audit", filter="seq == 2", limit=1,
                              output_fields=["key", "chain", "seq", "record", "placeholder"])
        record = json.loads(row["record"])
        record["purpose"] = "something else"
        client.upsert("dedup_audit", [dict(row) | {"record": json.dumps(record)}])
    finally:
        client.close()
    release_milvus_lite(Path(uri))


WHOLE_VECTOR_INDEXES = [
    ("lite", "IVF_FLAT", {"nlist": 4}, {"nprobe": 4}),
    pytest.param("server", "IVF_FLAT", {"nlist": 4}, {"nprobe": 4},
                 marks=pytest.mark.milvus_server),
    pytest.param("server", "HNSW", {"M": 8, "efConstruction": 64}, {"ef": 64},
                 marks=pytest.mark.milvus_server),
]


@pytest.mark.parametrize(("where", "kind", "build", "search"), WHOLE_VECTOR_INDEXES)
def test_an_index_that_keeps_vectors_whole_answers_exact_scores(
        tmp_path, faces, request, where, kind, build, search):
    """IVF_FLAT and HNSW keep the float32 vectors whole: the scores Milvus returns are the
    exact ones, so dedup takes them without fetching the candidates' embeddings to re-score."""
    base = MilvusConfig(uri=str(tmp_path / "whole.db"), flush_interval_s=0.5) \
        if where == "lite" else milvus_on_server(request.getfixturevalue("milvus_server"))
    config = dataclasses.replace(base, prefix=f"{base.prefix}whole", index_type=kind,
                                 index_params=build, search_params=search)
    assert config.scores_exact and not config.exact
    people = faces.persons(120)
    gallery = MilvusGallery(config, "model-x", background=False)
    client = gallery._rows.client
    real_search, asked = client.search, []

    def search(*args: Any, **kwargs: Any) -> Any:  # the real search, its fields noted
        asked.append(list(kwargs.get("output_fields", [])))
        return real_search(*args, **kwargs)

    try:
        gallery.insert_each([(Registration(f"r{i}", f"ID{i}"), person)
                             for i, person in enumerate(people)])
        probe = faces.capture(people[7])
        client.search = search
        found = gallery.neighbours(probe, 5, 0.0)
        assert asked and not any("embedding" in fields for fields in asked)
        exact = people @ probe
        assert found[0].registration.registration_id == "r7"
        for scored in found:
            index = int(scored.registration.registration_id[1:])
            assert scored.score == pytest.approx(float(exact[index]), abs=1e-5)
    finally:
        gallery.close(checkpoint=False)
        if where == "lite":
            release_milvus_lite(Path(config.uri))
        else:
            drop_collections(config)
            drop_collections(base)


def test_a_collection_whose_index_milvus_chose_is_searched_as_approximate():
    """AUTOINDEX (a managed service's) may quantise and is never complete: a node started
    with FLAT or IVF_FLAT took its scores as exact."""
    for kind in ("FLAT", "IVF_FLAT", "HNSW"):
        served = schema.as_served(MilvusConfig(uri="x.db", index_type=kind), "AUTOINDEX")
        assert (served.index_type, served.exact, served.scores_exact) == \
            ("AUTOINDEX", False, False)
        assert schema.as_served(MilvusConfig(uri="x.db", index_type=kind), kind).index_type \
            == kind
