"""`dedup serve --processes N`: one embedded data directory served by N processes, so that
checks use more than the one core a Python process's GIL lets them use.

The primary is the server of one process (dedup.server.create_server) and the only writer
of the store. The N - 1 read replicas are started with multiprocessing's spawn (never fork:
an open LMDB environment does not survive one), each its own gRPC server on the same address
with SO_REUSEPORT, so the kernel spreads client connections over the processes. A replica
answers unaudited Checks from its own index and relays every other call to the primary over
a Unix socket in the data directory (api/forward.py); before every Check it replays the
changes it has not seen, so it never misses an enrolment acknowledged before the Check
began (gallery/embedded/replica.py).

Each replica has a pipe to the primary, which tells it when to open its store and when to
close it (`release`: before a compaction swaps the store's file, see
lmdb_env.LmdbEnv.others_released) and when to stop; a replica whose pipe ends (the primary
died) stops too. The replicas report the change their index covers in shared memory; the
primary keeps its change log from the oldest (Store.replica_floor).

A replica that could not open the store (it forwards every call meanwhile) is asked again
every 2 s. A replica that dies is started again (after 1 s, then up to 30 s between attempts
while it keeps dying within a minute); meanwhile the other processes serve. Stopping the
primary stops the replicas first (gracefully: their relayed calls still reach the primary),
then the primary; nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dedup.core.errors import ConfigError, StartupError
from dedup.core.logs import JsonFormatter, configure_logging
from dedup.core.settings import ServerConfig
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.layout import CHECK_RATES_FILE, FORWARD_SOCKET, REPLICA_METRICS_DIR
from dedup.server import DedupServer, Forwarding, create_replica_server, create_server

log = logging.getLogger("dedup.server")

READY_TIMEOUT_S = 300.0  # a replica loads the face model before it answers
RELEASE_TIMEOUT_S = 30.0  # beyond, a replica that keeps the store open is killed
_WATCH_S = 0.5
_RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
_STABLE_S = 60.0  # a replica up this long starts the delays over when it dies
_REOPEN_S = 2.0  # after a replica could not open the store, it is asked again this much later
_NO_PIN = -1


def create_servers(config: ServerConfig, address: str, processes: int
                   ) -> tuple[DedupServer | MultiProcessServer, int]:
    """`dedup serve`'s server: the server of one process, or (`processes` > 1) a primary
    with `processes` - 1 read replicas. Not started; returns it and its port."""
    if processes == 1:
        return create_server(config, address)
    if processes < 1:
        raise ConfigError(f"--processes {processes}: at least 1")
    if config.milvus is not None:
        raise ConfigError("--processes serves one embedded data directory from several "
                          "processes; Milvus nodes scale by running more nodes")
    if address.startswith("unix:"):
        raise ConfigError("--processes needs a TCP address: the processes share its port")
    _refuse_a_taken_port(address)
    if config.security is not None and config.security.token_address is not None:
        _refuse_a_taken_port(config.security.token_address)
    data_dir = Path(config.store.data_dir).resolve()
    forwarding = Forwarding(data_dir / FORWARD_SOCKET, secrets.token_hex(32),
                            data_dir / CHECK_RATES_FILE, data_dir / REPLICA_METRICS_DIR)
    primary, port = create_server(config, address, forwarding)
    try:
        _empty_metrics_dir(forwarding.metrics)  # the data directory is the primary's now
    except BaseException:
        primary.stop(0)
        raise
    primary.metrics.add_replicas(forwarding.metrics)
    gallery = primary.gallery
    assert isinstance(gallery, EmbeddedGallery)
    replicas = ReplicaSet(_replica_config(config, primary.token_port),
                          f"{_host(address)}:{port}", forwarding, processes - 1, gallery)
    return MultiProcessServer(primary, replicas), port


def _empty_metrics_dir(directory: Path) -> None:
    """The replicas' metrics files start anew with the server (a replica started again
    keeps the files of the one before: its counts are not lost)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700)


def _refuse_a_taken_port(address: str) -> None:
    """SO_REUSEPORT lets every socket of this user bind the port: another server's too,
    which would split the clients between two galleries. So the port is bound once without
    it first (SO_REUSEADDR only: a listener refuses it, a closed connection's TIME_WAIT
    does not)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            raise ConfigError(f"{address}: cannot listen ({error.strerror}): another server "
                              "holds the port") from error


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _replica_config(config: ServerConfig, token_port: int | None) -> ServerConfig:
    """The primary's configuration, with the token listener's actual port."""
    security = config.security
    if security is None or security.token_address is None or token_port is None:
        return config
    token_address = f"{_host(security.token_address)}:{token_port}"
    return dataclasses.replace(
        config, security=dataclasses.replace(security, token_address=token_address))


class MultiProcessServer:
    """The primary and its replicas, started and stopped as one server."""

    def __init__(self, primary: DedupServer, replicas: ReplicaSet) -> None:
        self.primary = primary
        self.replicas = replicas
        self.gallery = primary.gallery
        self.config = primary.config

    @property
    def token_port(self) -> int | None:
        return self.primary.token_port

    @property
    def metrics_port(self) -> int | None:
        return self.primary.metrics_port

    def start(self) -> None:
        self.primary.start()
        try:
            self.replicas.start()
        except BaseException:
            self.replicas.stop(0)
            self.primary.stop(0)
            raise

    def stop(self, grace: float | None = None) -> None:
        """The replicas first (their relayed calls finish on the primary), then the primary."""
        self.replicas.stop(self.config.shutdown_grace_s if grace is None else grace)
        self.primary.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.primary.wait_for_termination(timeout)


@dataclass(frozen=True)
class ReplicaArgs:
    """What a replica process is started with (pickled by spawn)."""

    number: int  # 1..N-1
    config: ServerConfig
    address: str  # the primary's, with its actual port
    forwarding: Forwarding
    log_level: str
    json_lines: bool
    pins: Any  # shared int64 per replica: the change its index covers, or -1


class ReplicaSet:
    """The primary's replicas: started, opened, released around a compaction's swap,
    started again when one dies, and stopped."""

    def __init__(self, config: ServerConfig, address: str, forwarding: Forwarding, count: int,
                 gallery: EmbeddedGallery) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._pins = self._context.RawArray(ctypes.c_int64, count)
        for slot in range(count):
            self._pins[slot] = _NO_PIN
        level, json_lines = _log_setup()
        self._replicas = [
            _Replica(self._context, ReplicaArgs(number, config, address, forwarding, level,
                                                json_lines, self._pins))
            for number in range(1, count + 1)]
        self._gallery = gallery
        # Held from a release to the reopening: no replica opens the store meanwhile.
        self._store_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="dedup-replicas",
                                         daemon=True)
        gallery.share_with_replicas(self.released, self.floor)

    @property
    def pids(self) -> list[int]:
        return [replica.pid for replica in self._replicas if replica.pid is not None]

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Starts every replica and waits until each serves from its own index;
        StartupError if one cannot."""
        for replica in self._replicas:
            replica.spawn()
        deadline = time.monotonic() + timeout
        for replica in self._replicas:
            if not replica.wait_ready(deadline - time.monotonic()):
                raise StartupError(f"replica {replica.number} did not start: "
                                   f"{replica.failure or 'no answer in time'}")
            self._open(replica)
        for replica in self._replicas:
            if not replica.wait_opened(deadline - time.monotonic()):
                raise StartupError(f"replica {replica.number} could not open the store: "
                                   f"{replica.open_failure or 'no answer in time'}")
        self._watcher.start()

    def stop(self, grace: float) -> None:
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for replica in self._replicas:
            replica.send("stop", grace)
        deadline = time.monotonic() + grace + 15.0
        for replica in self._replicas:
            replica.end(deadline - time.monotonic())

    def wait_opened(self, timeout: float) -> bool:
        """Until every replica serves from the store again (a release's reopening is only
        asked for); False when one does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        return all(replica.wait_opened(deadline - time.monotonic())
                   for replica in self._replicas)

    def floor(self) -> int | None:
        """The oldest change a replica's index has yet to replay after."""
        pins = [pin for pin in self._pins if pin != _NO_PIN]
        return min(pins) if pins else None

    @contextmanager
    def released(self) -> Iterator[None]:
        """Every replica's store closed (a replica that does not close it in time is killed
        and started again later); reopened afterwards."""
        with self._store_lock:
            for replica in self._replicas:
                replica.release(RELEASE_TIMEOUT_S)
            try:
                yield
            finally:
                for replica in self._replicas:
                    if replica.ready.is_set() and replica.alive:
                        replica.open()

    def _open(self, replica: _Replica) -> None:
        with self._store_lock:
            replica.open()

    def _watch(self) -> None:
        while not self._stopping.wait(_WATCH_S):
            for replica in self._replicas:
                try:
                    self._tend(replica)
                except Exception:
                    log.exception("replica %d: supervision failed", replica.number)

    def _tend(self, replica: _Replica) -> None:
        if replica.alive:
            if replica.wants_opening() and self._store_lock.acquire(blocking=False):
                try:
                    replica.open()
                finally:
                    self._store_lock.release()
            return
        if replica.restart_at is None:
            self._buried(replica)
        elif time.monotonic() >= replica.restart_at and not self._stopping.is_set():
            with self._store_lock:
                replica.spawn()

    def _buried(self, replica: _Replica) -> None:
        """A replica died: its pin and LMDB reader slots go, and its restart is planned."""
        replica.end(5.0)
        self._pins[replica.number - 1] = _NO_PIN
        cleared = self._gallery.clear_stale_readers()
        delay = replica.next_delay()
        log.error("replica %d (pid %s) exited with code %s; %d stale LMDB reader slot(s) "
                  "cleared; starting it again in %g s", replica.number, replica.pid,
                  replica.exitcode, cleared, delay)
        replica.restart_at = time.monotonic() + delay


class _Replica:
    """The primary's end of one replica process."""

    def __init__(self, context: Any, args: ReplicaArgs) -> None:
        self._context = context
        self.args = args
        self.number = args.number
        self.process: Any = None
        self._connection: Connection | None = None
        self._send_lock = threading.Lock()
        # The replica's answers, counted by the pipe's reader: an open or a release is
        # answered once, in the order asked.
        self._answered = threading.Condition()
        self._opens_unanswered = 0
        self._releases_unanswered = 0
        self._gone = False
        self.ready = threading.Event()
        self.failure = ""
        self.holds_store = False  # asked to open it, not released since: a release is due
        self.serving = False  # it said it opened the store (and has not released it since)
        self.open_failure = ""
        self._open_failed_at: float | None = None
        self.restart_at: float | None = None
        self._started_at = 0.0
        self._failures = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else int(self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and bool(self.process.is_alive())

    @property
    def exitcode(self) -> int | None:
        return None if self.process is None else self.process.exitcode

    def spawn(self) -> None:
        ours, theirs = self._context.Pipe()
        self.ready.clear()
        self.failure, self.holds_store, self.restart_at = "", False, None
        with self._answered:
            self._opens_unanswered = self._releases_unanswered = 0
            self._gone = self.serving = False
            self.open_failure, self._open_failed_at = "", None
        self.process = self._context.Process(target=replica_main, args=(self.args, theirs),
                                             name=f"dedup-replica-{self.number}")
        self.process.start()
        theirs.close()
        self._connection = ours
        self._started_at = time.monotonic()
        threading.Thread(target=self._read, args=(ours,), daemon=True,
                         name=f"dedup-replica-{self.number}-pipe").start()

    def next_delay(self) -> float:
        if time.monotonic() - self._started_at >= _STABLE_S:
            self._failures = 0
        delay = _RESTART_DELAYS_S[min(self._failures, len(_RESTART_DELAYS_S) - 1)]
        self._failures += 1
        return delay

    def _read(self, connection: Connection) -> None:
        try:
            while True:
                message = connection.recv()
                if message[0] == "ready":
                    self.ready.set()
                elif message[0] == "failed":
                    self.failure = str(message[1])
                else:
                    self._answer(message)
        except (EOFError, OSError):
            with self._answered:
                self._gone = True
                self._answered.notify_all()

    def _answer(self, message: tuple[Any, ...]) -> None:
        with self._answered:
            if message[0] == "opened":
                self._opens_unanswered -= 1
                self.serving, self.open_failure, self._open_failed_at = True, "", None
                log.info("replica %d (pid %s) serves from the store (its index covers change "
                         "%d)", self.number, self.pid, message[1])
            elif message[0] == "open_failed":
                self._opens_unanswered -= 1
                self.serving, self.open_failure = False, str(message[1])
                self._open_failed_at = time.monotonic()
                log.error("replica %d could not open the store (asked again in %g s): %s",
                          self.number, _REOPEN_S, message[1])
            elif message[0] == "released":
                self._releases_unanswered -= 1
                self.serving = False
            self._answered.notify_all()

    def wants_opening(self) -> bool:
        """Whether the replica is up and should be asked to open the store: never asked
        since it started or released it, or its last attempt failed a while ago."""
        if not self.ready.is_set():
            return False
        if not self.holds_store:
            return True
        with self._answered:
            return (self._opens_unanswered == 0 and self._open_failed_at is not None
                    and time.monotonic() - self._open_failed_at >= _REOPEN_S)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while not self.ready.wait(0.1):
            if not self.alive or self.failure or time.monotonic() >= deadline:
                return False
        return True

    def send(self, *message: Any) -> bool:
        connection = self._connection
        if connection is None:
            return False
        with self._send_lock:
            try:
                connection.send(message)
            except (OSError, ValueError):  # the replica is gone
                return False
        return True

    def open(self) -> None:
        with self._answered:
            self._opens_unanswered += 1
            self._open_failed_at = None
        if self.send("open"):
            self.holds_store = True
        else:
            with self._answered:
                self._opens_unanswered -= 1

    def release(self, timeout: float) -> None:
        """Returns once this replica has closed its store (or is dead). An open still
        under way (a large index loading) is waited for first, up to READY_TIMEOUT_S:
        only then does the replica read its pipe again."""
        if not self.holds_store:
            return
        if self._await(lambda: self._opens_unanswered == 0, READY_TIMEOUT_S):
            with self._answered:
                self._releases_unanswered += 1
            if self.send("release") and self._await(
                    lambda: self._releases_unanswered == 0, timeout):
                self.holds_store = False
                return
        if self.alive:
            log.error("replica %d did not close the store in time: killing it", self.number)
            self.process.kill()
        self.process.join(10)
        self.holds_store = False

    def wait_opened(self, timeout: float) -> bool:
        """Whether the replica opened the store (see open_failure if not)."""
        if not self._await(lambda: self._opens_unanswered == 0, timeout):
            self.open_failure = self.open_failure or (
                "no answer in time" if self.alive else f"it exited ({self.exitcode})")
        return self.serving

    def _await(self, answered: Callable[[], bool], timeout: float) -> bool:
        """Whether `answered` came true in time (False once the replica is gone)."""
        with self._answered:
            self._answered.wait_for(lambda: answered() or self._gone, max(0.0, timeout))
            return answered() and not self._gone

    def end(self, timeout: float) -> None:
        """Waits for the process to exit (terminated, then killed, when it does not)."""
        if self.process is None:
            return
        self.process.join(max(0.0, timeout))
        for ending in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                break
            log.warning("replica %d did not stop in time: %s", self.number, ending.__name__)
            ending()
            self.process.join(5.0)
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.holds_store = self.serving = False


def _log_setup() -> tuple[str, bool]:
    """The primary's log level and format, for its replicas."""
    root = logging.getLogger()
    json_lines = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    return logging.getLevelName(root.getEffectiveLevel()), json_lines


# -- in the replica process ----------------------------------------------------------


def replica_main(args: ReplicaArgs, connection: Connection) -> None:
    """A replica process: serves until the primary says stop, or its pipe ends."""
    stopping = threading.Event()
    os.umask(0o077)  # what it writes in the data directory (its metrics) is private
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the primary's
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    configure_logging(args.log_level, args.json_lines)
    _name_log_lines(f"replica-{args.number}")
    pins = args.pins

    def pin(covered: int) -> None:
        pins[args.number - 1] = covered

    try:
        server, gallery, _ = create_replica_server(args.config, args.address, args.forwarding,
                                                   args.number, pin)
        server.start()
    except BaseException as error:
        log.exception("replica %d could not start", args.number)
        _tell(connection, "failed", f"{type(error).__name__}: {error}")
        raise SystemExit(1) from None
    log.info("replica %d (pid %d) serving on %s", args.number, os.getpid(), args.address)
    _tell(connection, "ready", os.getpid())
    grace = _obey(connection, gallery, stopping)
    server.stop(grace)
    log.info("replica %d stopped", args.number)


def _obey(connection: Connection, gallery: Any, stopping: threading.Event) -> float | None:
    """Carries out the primary's requests until it says stop (returns the grace it gives),
    or its pipe ends, or SIGTERM."""
    while not stopping.is_set():
        try:
            if not connection.poll(0.2):
                continue
            request = connection.recv()
        except (EOFError, OSError):
            log.warning("the primary process is gone: stopping")
            return None
        if request[0] == "stop":
            return float(request[1])
        if request[0] == "open":
            try:
                _tell(connection, "opened", gallery.open())
            except Exception as error:
                log.exception("could not open the store")
                _tell(connection, "open_failed", f"{type(error).__name__}: {error}")
        elif request[0] == "release":
            gallery.release()
            _tell(connection, "released")
    return None


def _tell(connection: Connection, *message: Any) -> None:
    with contextlib.suppress(OSError, ValueError):  # the primary is gone: the loop notices
        connection.send(message)


def _name_log_lines(process: str) -> None:
    """Tags every log line of this process with its name (the logger's name)."""
    def tag(record: logging.LogRecord) -> bool:
        record.name = f"{record.name}[{process}]"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
