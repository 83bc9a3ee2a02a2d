"""Fixtures: real servers on loopback port 0, over real channels, on temporary data directories."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import processes
import pytest

from dedup import FaceGenerator, ServerConfig, StoreConfig, create_server
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.settings import MilvusConfig, QueryLimits


class RunningServer:
    """A started server with a channel and stub; `restart()` reopens the same data directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._start()

    def _start(self) -> None:
        self.server, self.port = create_server(self.config, "127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.FaceDedupStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=1.0)

    def crash(self) -> None:
        """Stops without the shutdown checkpoint, as after a kill: the change log must cover it."""
        self.channel.close()
        self.server.grpc_server.stop(0).wait()
        if self.server.audit is not None:
            # Its thread would outlive the store it reads (a kill would end it).
            self.server.audit.close()
        self.server.gallery.close(checkpoint=False)

    def restart(self, crash: bool = False) -> None:
        self.crash() if crash else self.stop()
        self._start()

    @property
    def data_dir(self) -> Path:
        return Path(self.config.store.data_dir)


BACKENDS = ("embedded", "milvus", "milvus-server")
# The tests' servers take desks' embeddings and unchecked enrolments (refused by default:
# test_desk_views checks that), so that desks' checks can be tested with synthetic faces.
DESKS_SEND_EMBEDDINGS = QueryLimits(desk_embeddings=True, desk_unchecked_enrolments=True)
# Tests on a real Milvus server (marked milvus_server: the `milvus-server` backend, and the
# real-server tests of test_milvus.py and test_milvus_server.py) that `make test` runs, by
# node id prefix; `make test-milvus` (DEDUP_MILVUS_SERVER=all) runs every one of them. See
# docs/milvus.md for which are where and how long they take.
MILVUS_SERVER_SUBSET = (
    "tests/test_verdicts.py", "tests/test_settlements.py", "tests/test_server.py",
    "tests/test_stress.py", "tests/test_enroll_stream.py",
    "tests/test_milvus.py::test_nodes_never_both_enrol_one_face",
    "tests/test_milvus.py::test_a_checked_enrolment_sees_what_another_node_just_acknowledged",
    "tests/test_milvus.py::test_a_checked_enrolment_waits_for_milvus_only_before_its_claim",
    "tests/test_milvus.py::test_a_collection_left_without_its_index_gets_it_when_a_node_opens",
    "tests/test_milvus_server.py::test_the_server_dies_with_the_process_that_started_it",
    "tests/test_milvus_server.py::test_a_first_start_whose_port_was_taken_meanwhile_starts_on_new_ones",
    "tests/test_milvus_server.py::test_collections_are_built_with_the_indexes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "embedded_only(reason): shows what only the embedded backend has "
        "(LMDB files, index checkpoints, FAISS index types); the reason says why")
    config.addinivalue_line(
        "markers", "one_backend(reason): what the test shows lives above the gallery (a "
        "stream's end at a stop, a CLI's output), so it runs on the embedded "
        "backend alone; the reason says why the backend plays no part")
    config.addinivalue_line(
        "markers", "milvus_server: runs on a real Milvus server (`make test-milvus` runs all)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the `milvus-server` backend's tests milvus_server; without
    DEDUP_MILVUS_SERVER=all, leaves out those not in MILVUS_SERVER_SUBSET."""
    everywhere = os.environ.get("DEDUP_MILVUS_SERVER") == "all"
    kept, left_out = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "milvus-server":
            item.add_marker(pytest.mark.milvus_server)
        on_server = item.get_closest_marker("milvus_server") is not None
        if on_server and not everywhere and not item.nodeid.startswith(MILVUS_SERVER_SUBSET):
            left_out.append(item)
        else:
            kept.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on a server runs against every backend, unless marked embedded_only or
    one_backend."""
    if "backend" not in metafunc.fixturenames:
        return
    if any(marker.args and marker.args[0] == "backend"
           for marker in metafunc.definition.iter_markers("parametrize")):
        return  # the test names its backend itself
    only = [marker for name in ("embedded_only", "one_backend")
            if (marker := metafunc.definition.get_closest_marker(name)) is not None]
    for marker in only:
        if not marker.kwargs.get("reason"):
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: {marker.name} needs a "
                                    "reason")
    metafunc.parametrize("backend", ["embedded"] if only else list(BACKENDS))


def milvus_lite(path: Path) -> MilvusConfig:
    # Milvus Lite searches unflushed rows by brute force: flush soon after writes.
    return MilvusConfig(uri=str(path), flush_interval_s=0.5)


def release_milvus_lite(path: Path) -> None:
    """Stops the in-process Milvus Lite server of `path` (it would live until exit)."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(path))


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Milvus server (2.3.5 standalone, tests/milvus_server.py) for the session."""
    from milvus_server import MilvusServer, ReadyPrefixes, alive

    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"))
    server.start()
    pid = server.pid
    server.prefixes = ReadyPrefixes(server.uri)
    yield server
    server.prefixes.close()
    server.stop()
    assert pid is not None and not alive(pid), "the Milvus server outlived the session"


def milvus_on_server(server: Any) -> MilvusConfig:
    """A configuration on the session's Milvus server in a collection prefix of its own
    (its collections made and loaded ahead)."""
    return MilvusConfig(uri=server.uri, prefix=server.prefixes.take())


def drop_collections(config: MilvusConfig) -> None:
    """Drops the collections under `config.prefix` (a test's, on the session server)."""
    from milvus_server import drop_prefix

    drop_prefix(config.uri, config.prefix)


@pytest.fixture
def make_server(tmp_path: Path, backend: str, request: pytest.FixtureRequest
                ) -> Iterator[Any]:
    started: list[RunningServer] = []
    lite = tmp_path / "milvus.db"
    on_server = None
    if backend == "milvus-server":
        on_server = milvus_on_server(request.getfixturevalue("milvus_server"))

    def make(**overrides: Any) -> RunningServer:
        store_fields = {f.name for f in dataclasses.fields(StoreConfig)}
        store_args = {k: v for k, v in overrides.items() if k in store_fields}
        server_args = {k: v for k, v in overrides.items() if k not in store_fields}
        store_args.setdefault("data_dir", tmp_path / "data")
        if backend == "milvus":
            server_args.setdefault("milvus", milvus_lite(lite))
        elif on_server is not None:
            server_args.setdefault("milvus", on_server)
        server_args.setdefault("queries", DESKS_SEND_EMBEDDINGS)
        config = ServerConfig(store=StoreConfig(**store_args), **server_args)
        server = RunningServer(config)
        started.append(server)
        return server

    yield make
    for server in started:
        if not server.server._stopped.is_set():
            server.stop()
    if backend == "milvus":
        release_milvus_lite(lite)
    elif on_server is not None:
        drop_collections(on_server)


@pytest.fixture
def server(make_server: Any) -> RunningServer:
    return make_server()  # type: ignore[no-any-return]


@pytest.fixture
def faces() -> FaceGenerator:
    return FaceGenerator(seed=7)


def face(vector: np.ndarray) -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=[float(v) for v in vector]))


def registration(registration_id: str, id_number: str, msisdn: str = "", **extra: str
                 ) -> pb.Registration:
    return pb.Registration(registration_id=registration_id, id_number=id_number, msisdn=msisdn,
                           **extra)


def enroll(stub: pb_grpc.FaceDedupStub, registration_id: str, id_number: str,
           vector: np.ndarray, check_first: bool = False, msisdn: str = "") -> pb.EnrollResponse:
    return stub.Enroll(pb.EnrollRequest(
        registration=registration(registration_id, id_number, msisdn),
        face=face(vector), check_first=check_first,
    ))


def check(stub: pb_grpc.FaceDedupStub, vector: np.ndarray, claimed: str = "",
          max_candidates: int = 0) -> pb.CheckResponse:
    return stub.Check(pb.CheckRequest(face=face(vector), claimed_id_number=claimed,
                                      max_candidates=max_candidates))


@pytest.fixture(scope="session")
def detect():
    """insightface's own SCRFD detector on the default pack: boxes of faces scoring >= 0.5."""
    from insightface.app import FaceAnalysis

    from dedup.face.model_pack import default_pack_dir

    analyzer = FaceAnalysis(name=str(default_pack_dir()), allowed_modules=["detection"],
                            providers=["CPUExecutionProvider"])
    analyzer.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    return lambda image: analyzer.det_model.detect(image, max_num=0)


@pytest.fixture(scope="session")
def crops(tmp_path_factory, detect):
    from photos import PLAYERS, T1, cut_single_faces

    out = tmp_path_factory.mktemp("crops")
    return {"players": cut_single_faces(PLAYERS, out, detect),
            "t1": cut_single_faces(T1, out, detect)}


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Path:
    """Test credentials made once per session by `dedup keys`' code (the CA key beside them
    in keys-ca/)."""
    from dedup.ops.keys import make_keys

    out = tmp_path_factory.mktemp("credentials") / "keys"
    make_keys(out, token_address="127.0.0.1:0")
    return out


@pytest.fixture
def secure_server(make_server, keys, faces):
    """A secured server holding r0 (ID0), enrolled by the admin."""
    from secure import channel, secured

    server = secured(make_server, keys)
    with channel(server.port, keys, role="admin") as admin:
        pb_grpc.FaceDedupStub(admin).Enroll(pb.EnrollRequest(
            registration=registration("r0", "ID0"), face=face(faces.persons(1)[0])), timeout=30)
    return server


@pytest.fixture(autouse=True)
def no_server_process_outlives_its_test() -> Iterator[None]:
    """A test that fails before stopping its `dedup serve` processes leaves them running
    (a failed Milvus node test left one retrying against a stopped server for the rest of
    the session): they are killed when the test ends. Servers of wider-scoped fixtures,
    started before this mark, are theirs to stop."""
    mark = len(processes.STARTED)
    yield
    processes.kill_leftovers(mark)
