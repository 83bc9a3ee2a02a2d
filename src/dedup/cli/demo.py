"""`dedup demo`: a server on the default data directory, a synthetic population, a verdict table.

The population is deterministic, so a second run finds it already enrolled and only
runs the checks (which are read-only).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.records import Verdict
from dedup.core.settings import ServerConfig, StoreConfig
from dedup.core.synthetic import FaceGenerator
from dedup.core.vectors import Vector
from dedup.server import create_server

PERSONS = 1500
PROBES_PER_SCENARIO = 40
SEED = 2019_12_01


@dataclass(frozen=True)
class Person:
    index: int
    id_numbers: list[str]
    registrations: int  # under the first ID number

    @property
    def own_id(self) -> str:
        return self.id_numbers[0]


def population() -> list[Person]:
    """Who is enrolled: most people 1-3 SIMs, some at the SIM limit, some under a second ID."""
    persons = []
    for index in range(PERSONS):
        registrations = 5 if index % 50 == 1 else 1 + index % 3
        ids = [f"ID{index:08d}"]
        if index % 20 == 0:
            ids.append(f"ID{index + 5_000_000:08d}")  # a borrowed or forged second ID number
        persons.append(Person(index, ids, registrations))
    return persons


def face(vector: Vector) -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=vector.tolist()))


def enrolment_requests(people: list[Person], generator: FaceGenerator,
                       vectors: np.ndarray) -> Iterator[pb.EnrollRequest]:
    for person in people:
        slots = [person.own_id] * person.registrations + person.id_numbers[1:]
        for slot, id_number in enumerate(slots):
            yield pb.EnrollRequest(
                registration=pb.Registration(
                    registration_id=f"demo-{person.index:05d}-{slot}",
                    id_number=id_number,
                    msisdn=f"+86139{person.index:05d}{slot:01d}",
                    carrier="demo-mobile",
                    region=f"region-{person.index % 31:02d}",
                ),
                face=face(generator.capture(vectors[person.index])),
            )


def seed(stub: pb_grpc.FaceDedupStub, requests: list[pb.EnrollRequest]) -> int:
    last = requests[-1].registration.registration_id
    try:
        stub.GetRegistration(pb.GetRegistrationRequest(registration_id=last))
        return 0  # enrolled by an earlier run
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise

    def enroll(request: pb.EnrollRequest) -> None:
        try:
            stub.Enroll(request)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    with ThreadPoolExecutor(8) as pool:
        list(tqdm(pool.map(enroll, requests), total=len(requests), desc="enrolling", unit="reg"))
    return len(requests)


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: Verdict
    probe: Callable[[int], pb.CheckRequest]


def scenarios(people: list[Person], vectors: np.ndarray,
              enrolled: dict[str, pb.EnrollRequest]) -> list[Scenario]:
    generator = FaceGenerator(SEED + 2)
    newcomers = FaceGenerator(SEED + 3).persons(PROBES_PER_SCENARIO)
    regular = [p for p in people if p.registrations < 5 and len(p.id_numbers) == 1]
    at_limit = [p for p in people if p.registrations == 5 and len(p.id_numbers) == 1]

    def enrolled_capture(person: Person) -> Vector:
        request = enrolled[f"demo-{person.index:05d}-0"]
        return np.asarray(request.face.embedding.values, np.float32)

    def check(vector: Vector, claimed: str) -> pb.CheckRequest:
        return pb.CheckRequest(face=face(vector), claimed_id_number=claimed)

    return [
        Scenario("returning customer, own ID", Verdict.SAME_PERSON,
                 lambda i: check(generator.capture(vectors[regular[i].index]), regular[i].own_id)),
        Scenario("new customer, new ID", Verdict.CLEAR,
                 lambda i: check(newcomers[i], f"NEW{i:08d}")),
        Scenario("enrolled face, another new ID", Verdict.DUPLICATE_IDENTITY,
                 lambda i: check(generator.capture(vectors[regular[i].index]), f"FAKE{i:07d}")),
        Scenario("someone else's enrolled ID", Verdict.ID_FACE_MISMATCH,
                 lambda i: check(newcomers[i], regular[i].own_id)),
        Scenario("own ID at the SIM limit", Verdict.SIM_LIMIT_EXCEEDED,
                 lambda i: check(generator.capture(vectors[at_limit[i % len(at_limit)].index]),
                                 at_limit[i % len(at_limit)].own_id)),
        Scenario("blurred capture of an enrolled face", Verdict.REVIEW,
                 lambda i: check(generator.at_similarity(enrolled_capture(regular[i]), 0.35),
                                 f"BLUR{i:07d}")),
    ]


def run_scenario(stub: pb_grpc.FaceDedupStub, scenario: Scenario) -> tuple[Counter[str], float]:
    verdicts: Counter[str] = Counter()
    latencies = []
    for i in range(PROBES_PER_SCENARIO):
        request = scenario.probe(i)
        started = time.perf_counter()
        response = stub.Check(request)
        latencies.append(time.perf_counter() - started)
        verdicts[pb.Verdict.Name(response.verdict)] += 1
    return verdicts, statistics.median(latencies) * 1000


def run_demo(data_dir: Path) -> int:
    # The demo prints its own table; a line per call would bury it.
    logging.getLogger("dedup.access").setLevel(logging.WARNING)
    config = ServerConfig(store=StoreConfig(data_dir=data_dir))
    server, port = create_server(config, "127.0.0.1:0")
    server.start()
    print(f"dedup server on 127.0.0.1:{port}, data directory {data_dir.resolve()}")
    failures = 0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            people = population()
            vectors = FaceGenerator(SEED).persons(PERSONS)
            requests = list(enrolment_requests(people, FaceGenerator(SEED + 1), vectors))
            added = seed(stub, requests)
            stats = stub.Stats(pb.StatsRequest())
            print(f"enrolled {added} new registration(s); gallery holds {stats.registrations} "
                  f"registrations under {stats.distinct_id_numbers} ID numbers "
                  f"({stats.index_type} index, {stats.index_vectors} vectors)\n")
            header = f"{'scenario':38} {'expected':20} {'verdicts returned':34} {'p50 ms':>7}"
            print(header)
            print("-" * len(header))
            by_id = {request.registration.registration_id: request for request in requests}
            for scenario in scenarios(people, vectors, by_id):
                verdicts, p50 = run_scenario(stub, scenario)
                got = ", ".join(f"{name} {count}" for name, count in verdicts.most_common())
                failures += PROBES_PER_SCENARIO - verdicts[scenario.expected.name]
                print(f"{scenario.name:38} {scenario.expected.name:20} {got:34} {p50:7.2f}")
    finally:
        server.stop()
    print(f"\n{failures} probe(s) got a verdict other than expected; the server stopped cleanly.")
    return 1 if failures else 0
