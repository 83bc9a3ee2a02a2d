"""Server-side sessions: the browser holds only a random session id (an HttpOnly cookie); the
investigator's bearer token, role, open case and CSRF token stay in this process's memory.

A session ends when signed out, after `idle_timeout_s` without a request the person made, or
`lifetime_s` after it began; signing in starts a new one (a new id), so an id seen before
sign-in is worth nothing after it."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

COOKIE = "dedup-console"
SECURE_COOKIE = "__Host-dedup-console"  # the prefix: Secure, Path=/, no Domain


@dataclass
class Case:
    case_id: str
    purpose: str


@dataclass
class Session:
    id: str
    csrf: str
    started: float
    last_seen: float
    token: str | None = None
    role: str | None = None
    case: Case | None = None
    # The photo of the last search by photo, to show beside its results (never written out).
    probe: bytes | None = None
    probe_type: str = "image/jpeg"
    # Cluster jobs this session started, by job id (console.clusters.ClusterJob).
    jobs: dict[str, Any] = field(default_factory=dict)

    @property
    def signed_in(self) -> bool:
        return self.role is not None

    def csrf_matches(self, sent: str) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), sent.encode())


class SessionStore:
    def __init__(self, idle_timeout_s: float, lifetime_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.lifetime_s = lifetime_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._purge(now)
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str, touch: bool = True) -> Session | None:
        """The live session of this id; `touch`: the person made this request (it resets the
        idle clock; a page's own polling does not)."""
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if self._expired(session, now):
                self._end(session)
                return None
            if touch:
                session.last_seen = now
            return session

    def end(self, session: Session) -> None:
        with self._lock:
            self._end(session)

    def _expired(self, session: Session, now: float) -> bool:
        return (now - session.last_seen > self.idle_timeout_s
                or now - session.started > self.lifetime_s)

    def _end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        session.token = None
        session.probe = None
        for job in session.jobs.values():
            job.cancel()

    def _purge(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if self._expired(s, now)]:
            self._end(session)
