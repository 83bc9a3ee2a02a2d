"""Kill -9 during enrolment: every acknowledged enrolment survives, nothing half-written appears."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import face, registration
from processes import ServerProcess

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api.face_dedup import ENROLL_BATCH

# 4 seeds in CI (even ones enrol by Enroll, odd ones by EnrollStream); soak.py runs 100.
SEEDS = int(os.environ.get("DEDUP_SOAK_SEEDS", "4"))
ATTEMPTS = 3000  # more than a kill within 0.6 s lets through: always mid-stream


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(SEEDS))
def test_kill_during_enrolment_loses_nothing_acknowledged(tmp_path, seed):
    rng = random.Random(seed)
    people = FaceGenerator(seed).persons(ATTEMPTS)
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir)
    process, port = server.process, server.port
    acknowledged: list[int] = []

    requests = [pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                 face=face(people[i])) for i in range(ATTEMPTS)]
    streamed = seed % 2 == 1  # stored in batches of the requests already read

    def enrol() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            try:
                if streamed:
                    for i, reply in enumerate(stub.EnrollStream(iter(requests), timeout=60)):
                        assert reply.enrolled and reply.registration.registration_id == f"r{i}"
                        acknowledged.append(i)
                    return
                for i, request in enumerate(requests):
                    stub.Enroll(request, timeout=10)
                    acknowledged.append(i)
            except grpc.RpcError:
                return  # the server is gone

    client = threading.Thread(target=enrol)
    client.start()
    time.sleep(rng.uniform(0.05, 0.6))
    process.send_signal(signal.SIGKILL)
    process.wait()
    client.join()
    assert acknowledged, "the server was killed before any enrolment was acknowledged"
    assert len(acknowledged) < ATTEMPTS, "the kill came after the last enrolment"

    server = ServerProcess(data_dir)
    process, port = server.process, server.port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            stats = stub.Stats(pb.StatsRequest())
            # At most what was in flight when the process died may have committed too: one
            # call, or one batch of a stream.
            in_flight = ENROLL_BATCH if streamed else 1
            assert len(acknowledged) <= stats.registrations <= len(acknowledged) + in_flight
            assert stats.index_vectors == stats.registrations
            for i in acknowledged:
                assert stub.GetRegistration(
                    pb.GetRegistrationRequest(registration_id=f"r{i}")).id_number == f"ID{i}"
                top = stub.Check(pb.CheckRequest(face=face(people[i]))).matches[0]
                assert top.registration.registration_id == f"r{i}" and top.score > 0.999
            unacknowledged = [i for i in range(ATTEMPTS) if i not in set(acknowledged)]
            stored_beyond = 0
            for i in unacknowledged:
                try:
                    stored = stub.GetRegistration(
                        pb.GetRegistrationRequest(registration_id=f"r{i}"))
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                    continue
                assert stored.id_number == f"ID{i}"  # whole, never half-written
                stored_beyond += 1
            assert len(acknowledged) + stored_beyond == stats.registrations  # no phantoms
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    # The vector file agrees with LMDB: every stored registration's slot a unit vector.
    doctor = subprocess.run([sys.executable, "-m", "dedup", "doctor", str(data_dir)],
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0 and "0 warning(s)" in doctor.stdout, doctor.stdout
