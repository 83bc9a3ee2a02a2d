"""Concurrency stress: 16 searching threads while others enrol and delete, over gRPC.

Every search result must agree with the store at the time: a registration whose delete was
acknowledged before a search began is never returned, and a registration acknowledged before
a search began is found by its own embedding unless a delete of it was under way.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
from conftest import face, registration

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core.settings import IndexConfig

SEARCHERS = 16
SECONDS = float(os.environ.get("DEDUP_STRESS_SECONDS", "6"))  # benchmarks/soak.py: 60


@dataclass
class Ledger:
    """What the writers had acknowledged, and when (time.monotonic())."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    enrolled: dict[str, float] = field(default_factory=dict)
    delete_sent: dict[str, float] = field(default_factory=dict)
    delete_acked: dict[str, float] = field(default_factory=dict)

    def live_before(self, moment: float) -> list[str]:
        with self.lock:
            return [r for r, at in self.enrolled.items()
                    if at < moment and r not in self.delete_sent]


@pytest.mark.timeout(SECONDS * 3 + 120)
@pytest.mark.parametrize("kind", ["Flat", "BinarySign512"])
def test_searches_stay_consistent_while_enrolling_and_deleting(make_server, backend, kind):
    if backend != "embedded" and kind != "Flat":
        pytest.skip("the FAISS index type is the embedded backend's: on Milvus this would "
                    "repeat the Flat case")
    server = make_server(index=IndexConfig(index_factory=kind))
    generator = FaceGenerator(11)
    people = generator.persons(4000)
    vector_of = {f"r{i}": people[i] for i in range(len(people))}
    ledger = Ledger()
    begin = [pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"), face=face(people[i]))
             for i in range(300)]  # a gallery to begin with
    assert all(response.enrolled for response in server.stub.EnrollStream(iter(begin)))
    ledger.enrolled.update((request.registration.registration_id, time.monotonic())
                           for request in begin)
    stop_at = time.monotonic() + SECONDS
    errors: list[str] = []
    violations: list[str] = []
    searches = [0]
    next_person = iter(range(300, len(people)))
    next_lock = threading.Lock()

    def enroller() -> None:
        while time.monotonic() < stop_at:
            with next_lock:
                i = next(next_person, None)
            if i is None:
                return
            server.stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                                face=face(people[i])), timeout=30)
            with ledger.lock:
                ledger.enrolled[f"r{i}"] = time.monotonic()

    def deleter(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            candidates = ledger.live_before(time.monotonic())
            victim = rng.choice(candidates)
            with ledger.lock:
                if victim in ledger.delete_sent:
                    continue
                ledger.delete_sent[victim] = time.monotonic()
            server.stub.Delete(pb.DeleteRequest(registration_id=victim), timeout=30)
            with ledger.lock:
                ledger.delete_acked[victim] = time.monotonic()
            time.sleep(0.005)

    def searcher(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            began = time.monotonic()
            target = rng.choice(ledger.live_before(began))
            response = server.stub.Check(pb.CheckRequest(face=face(vector_of[target])),
                                         timeout=30)
            ended = time.monotonic()
            searches[0] += 1
            returned = [m.registration.registration_id for m in response.matches]
            with ledger.lock:
                for found in returned:
                    if ledger.delete_acked.get(found, ended) < began:
                        violations.append(f"{found} returned after its delete was acknowledged")
                deleting = ledger.delete_sent.get(target, ended + 1) <= ended
            if not deleting and (not returned or returned[0] != target):
                violations.append(f"{target} not found by its own embedding: {returned[:3]}")

    def guarded(work, *args) -> threading.Thread:
        def run() -> None:
            try:
                work(*args)
            except grpc.RpcError as error:
                errors.append(f"{work.__name__}: {error.code()}: {error.details()}")
            except Exception as error:
                errors.append(f"{work.__name__}: {error!r}")
        return threading.Thread(target=run)

    threads = ([guarded(searcher, s) for s in range(SEARCHERS)]
               + [guarded(enroller) for _ in range(2)] + [guarded(deleter, 99)])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert violations == []
    assert searches[0] > SEARCHERS and ledger.delete_acked, "the stress did not run"
    stats = server.stub.Stats(pb.StatsRequest())
    assert stats.registrations == len(ledger.enrolled) - len(ledger.delete_acked)
    assert stats.index_vectors == stats.registrations
