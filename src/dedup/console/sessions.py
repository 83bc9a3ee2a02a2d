"""Server-side sessions: the browser holds only a random session id (an HttpOnly cookie); the
investigator's bearer token, role, open case and CSRF token stay in this process's memory.

A session ends when signed out, after `idle_timeout_s` without a request the person made, or
`lifetime_s` after it began; signing in starts a new one (a new id), so an id seen before
sign-in is worth nothing after it."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dedup.console")

COOKIE = "dedup-console"
SECURE_COOKIE = "__Host-dedup-console"  # the prefix: Secure, Path=/, no Domain
SIGN_IN_COOKIE = "dedup-console-sign-in"  # the sign-in form's nonce (web._before_sign_in)
SECURE_SIGN_IN_COOKIE = "__Host-dedup-console-sign-in"


class SettledPairs:
    """Pairs this session settled in its case, so that its later results mark them (the
    server keeps the settlements; its Search does not say which pairs are settled). Never
    shared: another investigator, or another case, learns nothing of them here."""

    def __init__(self) -> None:
        self._pairs: dict[frozenset[str], str] = {}
        self._lock = threading.Lock()

    def add(self, first: str, second: str, decision: str) -> None:
        with self._lock:
            self._pairs[frozenset((first, second))] = decision

    def of(self, first: str, second: str) -> str:
        with self._lock:
            return self._pairs.get(frozenset((first, second)), "")


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
    settled: SettledPairs = field(default_factory=SettledPairs)

    @property
    def signed_in(self) -> bool:
        return self.role is not None

    def end_sweeps(self) -> None:
        """Cancels this session's sweeps and forgets them; one that fails to cancel is
        logged (the session, or its case, ends all the same)."""
        jobs, self.jobs = list(self.jobs.values()), {}
        for job in jobs:
            try:
                job.cancel()
            except Exception:
                log.exception("console: a sweep did not cancel")

    def form_token(self) -> str:
        """The CSRF token of the forms on the pages rendered now: the session's, and a tag
        of the case open (a form of a page shown under one case is refused once another
        is open, whichever tab opened it)."""
        return f"{self.csrf}.{self._case_tag()}"

    def csrf_matches(self, sent: str, case_bound: bool = True) -> bool:
        """Whether `sent` is this session's form token; `case_bound`: for the case open now
        (sign-out and the case form itself take a page of any case)."""
        token, _, tag = sent.partition(".")
        session_ok = bool(token) and hmac.compare_digest(self.csrf.encode(), token.encode())
        case_ok = hmac.compare_digest(self._case_tag().encode(), tag.encode())
        return session_ok and (case_ok or not case_bound)

    def _case_tag(self) -> str:
        if self.case is None:
            return ""
        opened = f"{self.case.case_id}\0{self.case.purpose}".encode()
        return hmac.new(self.csrf.encode(), opened, hashlib.sha256).hexdigest()[:24]


class SessionStore:
    """The sessions signed in (the sign-in page's own is kept nowhere: web._before_sign_in),
    at most SESSIONS_A_TOKEN a token. Expired sessions are ended, their token, photo and
    sweeps with them, by a thread every PURGE_EVERY_S, and when asked for."""

    PURGE_EVERY_S = 10.0
    # Sessions one token may hold at once (browsers signed in with it); signing in past it
    # ends that token's oldest. Each may hold a probe photo and cluster sweeps running on
    # the server, so a token signing in again and again must not add them without end.
    SESSIONS_A_TOKEN = 8

    def __init__(self, idle_timeout_s: float, lifetime_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.lifetime_s = lifetime_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._purging: threading.Thread | None = None

    def sign_in(self, token: str | None, role: str) -> Session:
        """A new session (a new id: one seen before sign-in is worthless), signed in."""
        now = time.monotonic()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now,
                          token=token, role=role)
        with self._lock:
            if token is not None:  # an unauthenticated server's sessions are everyone's
                self._end_oldest_beyond(token, self.SESSIONS_A_TOKEN - 1)
            self._sessions[session.id] = session
            if self._purging is None:
                self._purging = threading.Thread(target=_purge_every, args=(weakref.ref(self),),
                                                 daemon=True, name="dedup-console-sessions")
                self._purging.start()
        return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def purge(self) -> None:
        """Ends every expired session."""
        with self._lock:
            self._purge(time.monotonic())

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
        session.end_sweeps()

    def _end_oldest_beyond(self, token: str, kept: int) -> None:
        """Ends the oldest sessions of `token` beyond the newest `kept`."""
        same = sorted((s for s in self._sessions.values() if s.token == token),
                      key=lambda s: s.started)
        for session in same[:max(0, len(same) - kept)]:
            log.warning("console: a session ended: its token signed in %d times since",
                        self.SESSIONS_A_TOKEN)
            self._end(session)

    def _purge(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if self._expired(s, now)]:
            self._end(session)


def _purge_every(store: weakref.ReferenceType[SessionStore]) -> None:
    """The purging thread: until its store is gone; a failure is logged, never its end."""
    while (alive := store()) is not None:
        interval = alive.PURGE_EVERY_S
        del alive  # not kept alive by this thread while it sleeps
        time.sleep(interval)
        if (alive := store()) is None:
            return
        try:
            alive.purge()
        except Exception:
            log.exception("console: purging expired sessions failed")
