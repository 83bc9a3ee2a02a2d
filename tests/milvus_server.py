"""A real Milvus server for tests and benchmarks: the `milvus` package's Milvus 2.3.5
standalone (`milvus run standalone`, with its embedded etcd, local object storage and
rocksmq WAL) as a child process on free ports (Milvus 2.3.5 binds its gRPC ports on every
interface, its etcd on loopback: `ss -ltn` while one runs).

The package's own `start()` leaves the server running when its Python parent is killed, so
the server is started here instead, from the package's binaries and config template: in a
process group of its own (stop and kill take the whole group), with the kernel told to
SIGKILL it when its parent dies however it dies (PR_SET_PDEATHSIG), and stopped at exit.
TEST_SETTINGS make a test server answer Strong reads sooner and drop compacted-away segment
files within seconds; they go to Milvus as environment variables (ROCKSMQ_TIMTICKERINTERVAL for
rocksmq.timtickerInterval), which it reads over its milvus.yaml.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

# Milvus's own settings for a test server (dotted paths into its milvus.yaml).
TEST_SETTINGS: dict[str, object] = {
    # Loading a collection: the query coordinator looks every 100 ms, not every second.
    "queryCoord.checkInterval": 100,
    "queryCoord.distPullInterval": 100,
    # A Strong read waits for the next time tick: every 20 ms, not 200 ms (its cost: about
    # 12% of a core while idle with three collections loaded, measured here).
    "proxy.timeTickInterval": 20,
    # Erasure within a minute. Segment files a compaction replaced are deleted 1 s after
    # they are dropped, looked for every 2 s (defaults: after 3 h, every hour). Not
    # dataCoord.gc.missingTolerance (files no segment names yet, default 1 h): at 1 s the
    # collector deleted a compaction's new segment before its metadata was saved, and
    # with it every registration (seen here).
    "dataCoord.gc.interval": 2,
    "dataCoord.gc.dropTolerance": 1,
    # Warnings and errors only, in logs/ of the base directory.
    "log.level": "warn",
}
# A write-ahead log (rocksmq, data/rocksmq) that forgets within a minute: consumed messages
# are dropped after 30 s (default 3 days), by whole pages of 64 KiB (default 64 MiB),
# checked every second (default every 10 minutes), and rocksdb compacts them out of its
# files every 3 s (default daily). NOT SAFE: "consumed" means read by Milvus's nodes, not
# written to a segment, and with it a SIGKILL of the server lost every enrolment of the
# last minutes for good, even with the data node syncing every 2 s and dedup flushing every
# 2 s (seen here). Only tests/test_milvus_server.py's erasure test uses it, to show where
# an erased registration lives longest.
FORGETFUL_WAL_SETTINGS: dict[str, object] = TEST_SETTINGS | {
    "rocksmq.retentionTimeInMinutes": 0.5,
    "rocksmq.rocksmqPageSize": 65_536,
    "rocksmq.timtickerInterval": 1,
    "rocksmq.compactionInterval": 3,
}
# Its listen ports, as the package's config template names them.
_PORT_KEYS = ("proxy_port", "proxy_internal_port", "etcd_port", "root_coord_port",
              "query_coord_port", "query_node_port", "index_coord_port", "index_node_port",
              "data_coord_port", "data_node_port")
_PR_SET_PDEATHSIG = 1
_started: list[MilvusServer] = []
_FIRST_START_ATTEMPTS = 3


class _PortTaken(RuntimeError):
    """Milvus exited at start because one of its ports was taken."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (thread) ends."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def drop_prefix(uri: str, prefix: str) -> None:
    """Drops the collections under `prefix` on the Milvus at `uri`."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        drop_collections_of(client, prefix)
    finally:
        client.close()


def drop_collections_of(client: Any, prefix: str) -> None:
    """Drops the collections under `prefix`, through `client`."""
    for name in client.list_collections():
        if name.startswith(f"{prefix}_"):
            client.drop_collection(name)


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class MilvusServer:
    """A Milvus 2.3.5 standalone server in `base_dir`; `start`, `stop`, `kill`, and `start`
    again on the same directory (same ports, same data)."""

    def __init__(self, base_dir: Path, settings: dict[str, object] | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.settings = TEST_SETTINGS if settings is None else settings
        self.process: subprocess.Popen[bytes] | None = None
        self._has_run = False  # started healthy once: its clients know its ports
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.ports = {key: free_port() for key in _PORT_KEYS}
        self.metrics_port, self.etcd_peer_port = free_port(), free_port()
        self._configure()

    @property
    def port(self) -> int:
        return self.ports["proxy_port"]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _configure(self) -> None:
        """Writes configs/milvus.yaml and configs/embedEtcd.yaml, unpacks the binaries."""
        from milvus import MilvusServerConfig, _initialize_data_files

        config = MilvusServerConfig(data_dir=str(self.base_dir), **self.ports)
        config.resolve()
        etcd = f"http://127.0.0.1:{self.ports['etcd_port']}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        (self.base_dir / "configs" / "embedEtcd.yaml").write_text(
            f"listen-client-urls: {etcd}\nadvertise-client-urls: {etcd}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n")
        _initialize_data_files(str(self.base_dir))

    def start(self, timeout: float = 120) -> None:
        """Starts it and waits until it is healthy. A first start whose ports another
        process took since they were chosen free (CI once met "bind: address already in
        use") is tried again on new ones; a restart keeps its ports, as its clients know them."""
        attempts = 1 if self._has_run else _FIRST_START_ATTEMPTS
        fresh = not (self.base_dir / "data").exists()
        for attempt in range(1, attempts + 1):
            try:
                self._start(timeout)
                self._has_run = True
                return
            except _PortTaken:
                if attempt == attempts:
                    raise
                self._signal_group(signal.SIGKILL)  # whatever of it is left
                if fresh:  # its etcd would keep the failed attempt's members and ports
                    shutil.rmtree(self.base_dir / "data", ignore_errors=True)
                self._choose_ports()

    def _start(self, timeout: float) -> None:
        binary = self.base_dir / "bin" / "milvus"
        env = os.environ | {
            "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.metrics_port),
            "MILVUS_RUN_DIR": str(self.base_dir / "run"),
            "ETCD_CONFIG_PATH": str(self.base_dir / "configs" / "embedEtcd.yaml"),
            "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
            # Milvus reads a setting from the variable named by its dotted path.
            **{key.upper().replace(".", "_"): str(value)
               for key, value in self.settings.items()}}
        logs = self.base_dir / "logs"
        self._logs_from = {name: (logs / name).stat().st_size if (logs / name).exists() else 0
                           for name in ("milvus-stdout.log", "milvus-stderr.log")}
        with open(logs / "milvus-stdout.log", "ab") as out, \
                open(logs / "milvus-stderr.log", "ab") as err:
            self.process = subprocess.Popen(
                [str(binary), "run", "standalone"], cwd=self.base_dir, env=env, stdout=out,
                stderr=err, start_new_session=True, preexec_fn=_die_with_parent)
        if self not in _started:
            _started.append(self)
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                failure = _PortTaken if self._port_was_taken() else RuntimeError
                raise failure(f"milvus exited with {self.process.returncode}; see "
                              f"{self.base_dir / 'logs'}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if b"OK" in response.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"milvus did not become healthy in {timeout:.0f} s")

    def _port_was_taken(self) -> bool:
        """Whether this start's part of its logs (appended to) says a port was taken."""
        for name, start in self._logs_from.items():
            with open(self.base_dir / "logs" / name, "rb") as log:
                log.seek(start)
                if b"address already in use" in log.read():
                    return True
        return False

    def _signal_group(self, signum: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 2) -> None:
        """SIGTERM to the server's process group, then SIGKILL if it has not ended within
        `timeout` (Milvus 2.3.5 standalone often hangs in its shutdown, retrying to reach
        its own root coordinator: a test server's data survives a kill as a crash)."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL to the server's process group, as a crash."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(30)
        self.process = None


class ReadyPrefixes:
    """Collection prefixes on a Milvus server whose collections (as a node with the default
    settings makes them) are created and loaded ahead, a batch at a time on a thread: a test
    takes a fresh prefix at once instead of waiting ~3 s for Milvus to load three
    collections. At most `ready` prefixes wait (each loaded collection costs the server some
    CPU while idle)."""

    def __init__(self, uri: str, ready: int = 4) -> None:
        self.uri = uri
        self._ready: queue.Queue[str] = queue.Queue()
        self._wanted = ready
        self._failure: BaseException | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="milvus-prefixes", daemon=True)
        self._thread.start()

    def take(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._failure is not None:
                raise RuntimeError("preparing collections failed") from self._failure
            try:
                return self._ready.get(timeout=0.1)
            except queue.Empty:
                pass
        raise TimeoutError(f"no prepared collection prefix within {timeout:.0f} s")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=60)

    def _fill(self) -> None:
        from pymilvus import MilvusClient

        from dedup.core.settings import DIMENSION, MilvusConfig
        from dedup.gallery.milvus.schema import create_collections, load_collections
        from dedup.gallery.milvus.version import server_version

        client = MilvusClient(uri=self.uri)
        try:
            version = server_version(client)
            while not self._closed.is_set():
                missing = self._wanted - self._ready.qsize()
                if missing <= 0:
                    self._closed.wait(0.05)
                    continue
                prefixes = [f"t{secrets.token_hex(6)}" for _ in range(missing)]
                names = [name for prefix in prefixes for name in create_collections(
                    client, MilvusConfig(uri=self.uri, prefix=prefix), DIMENSION, version).all]
                load_collections(client, names)
                for prefix in prefixes:
                    self._ready.put(prefix)
        except BaseException as error:  # reported by take()
            self._failure = error
        finally:
            client.close()


@atexit.register
def _stop_all() -> None:
    for server in _started:
        server.kill()
