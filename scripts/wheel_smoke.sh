#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it with plain pip into a fresh
# virtual environment, run `dedup --help`, start `dedup serve` from that install and make a
# call against it (health, Enroll and Check with an embedding, Stats). Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/dedup-*.whl)
echo "wheel-smoke: built $(basename "$wheel")"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade pip
"$work/venv/bin/pip" install --quiet "$wheel"
dedup="$work/venv/bin/dedup"
"$dedup" --help > /dev/null
echo "wheel-smoke: dedup --help works from the installed wheel"

port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cd "$work"  # nothing of the checkout on the path: only the installed package
"$dedup" serve --data-dir "$work/data" --address "127.0.0.1:$port" > "$work/serve.log" 2>&1 &
server_pid=$!
"$work/venv/bin/python" - "$port" <<'PYEOF'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import dedup
from dedup._proto.dedup.v1 import dedup_pb2 as pb, dedup_pb2_grpc

channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
grpc.channel_ready_future(channel).result(timeout=120)
health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
assert health.status == health_pb2.HealthCheckResponse.SERVING, health
stub = dedup_pb2_grpc.FaceDedupStub(channel)
face = dedup.FaceGenerator(seed=1).persons(1)[0]
enrolled = stub.Enroll(pb.EnrollRequest(
    registration=pb.Registration(registration_id="smoke-1", id_number="ID-1"),
    face=pb.Face(embedding=pb.Embedding(values=face.tolist())), check_first=True), timeout=30)
assert enrolled.enrolled, enrolled
check = stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(values=face.tolist())),
                                   claimed_id_number="ID-2"), timeout=30)
assert check.verdict == pb.DUPLICATE_IDENTITY, check
stats = stub.Stats(pb.StatsRequest(), timeout=30)
assert stats.registrations == 1, stats
print(f"wheel-smoke: a server started from the wheel answered: Enroll enrolled, Check "
      f"{pb.Verdict.Name(check.verdict)}, Stats {stats.registrations} registration")
PYEOF
