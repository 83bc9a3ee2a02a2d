"""Enrolment across nodes without transactions: an enrolment claims, rechecks, then commits.

1. its row is inserted PENDING;
2. it looks at the other live rows: ACTIVE ones, and PENDING ones claimed less than
   claim_timeout_s ago. A row holding its registration_id or msisdn, or one that would turn
   its verdict into one that does not enrol (a duplicate, a review, the SIM limit), is a
   conflict;
3. against an ACTIVE conflict it loses. Between two PENDING claims the earlier
   (claimed_at_us, then key) wins: the later removes its row, waits until the earlier ones
   have resolved and judges again over the committed rows, so that its answer names only
   registrations that exist (if none of them committed it claims again; one still pending
   when its node's time to confirm it is over belongs to a dead node and holds the face
   until it expires, so the verdict counts it); the earlier waits
   until the later has resolved (removed itself, or committed because it never saw the
   earlier one: then the earlier loses to it) and looks again;
4. it commits (the row becomes ACTIVE) and only then is the call acknowledged.
A claim's first look reads at its stake's timestamp (Session): on a Milvus whose timestamps
follow the order writes are acknowledged in (ServerVersion.orders_writes_by_timestamp) it
sees every write acknowledged before the stake, on any node, and every stake older than its
own; elsewhere it is Strong. Each claim inserts before it looks, so of two concurrent claims
the later-stamped sees the earlier: at most one enrols. Every later look, after waiting for
other claims, is Strong: it sees every write acknowledged before it started. Waits only go
from earlier to later claims, so they end.
A node that dies mid-claim leaves a PENDING row, which others ignore after claim_timeout_s
and reap; a claim not confirmed within half of that is removed and answered UNAVAILABLE
(this assumes node clocks agree to well within half the timeout, as NTP keeps them).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dedup.core.errors import (
    AlreadyExists,
    BackendUnavailable,
    DedupError,
    msisdn_taken,
    registration_id_taken,
)
from dedup.core.policy import Scored
from dedup.core.records import CheckResult, Registration
from dedup.core.vectors import Vector
from dedup.gallery.base import EnrolmentCheck
from dedup.gallery.milvus.connection import milvus_errors, translated
from dedup.gallery.milvus.registrations import SESSION, STRONG, Registrations, nearest
from dedup.gallery.milvus.schema import ACTIVE, PENDING, Row, new_key, now_us

log = logging.getLogger("dedup.milvus")

POLL_S = 0.02
# A check_first claim asks for this many neighbours beyond its k, so that recent claims
# among them seldom leave fewer than k committed rows (then the committed are searched apart).
PENDING_SPARE = 16


def taken(row: Row, registration: Registration) -> AlreadyExists:
    """The error for `registration` whose registration_id or msisdn `row` holds."""
    if row.registration.registration_id == registration.registration_id:
        return registration_id_taken(registration.registration_id)
    return msisdn_taken(registration.msisdn)


def _holds_a_key_of(row: Row, registration: Registration) -> bool:
    held = row.registration
    return held.registration_id == registration.registration_id or bool(
        registration.msisdn and held.msisdn == registration.msisdn)


class Claims:
    """Enrolments into `rows` by claim, recheck and commit (see this module's docstring)."""

    def __init__(self, rows: Registrations, session_first_look: bool) -> None:
        self._rows = rows
        self._timeout_s = rows.config.claim_timeout_s
        self._first_look = SESSION if session_first_look else STRONG

    def ensure_unique(self, registration: Registration) -> None:
        """Raises ALREADY_EXISTS when an ACTIVE row holds its registration_id or msisdn."""
        for row in self._rows.holders(registration, pending=False, exclude=None):
            raise taken(row, registration)

    def enrol(self, registration: Registration, vector: Vector) -> Registration:
        """Stores the registration unless another holds its registration_id or msisdn."""
        outcome = self.enrol_each([(registration, vector)])[0]
        if isinstance(outcome, DedupError):
            raise outcome
        return outcome

    def enrol_each(self, batch: list[tuple[Registration, Vector]]
                   ) -> list[Registration | DedupError]:
        """`enrol` for a batch, with the round trips of one: one upsert stakes every claim,
        one query finds the rivals of all, one upsert commits the winners, one delete
        withdraws the losers. The batch's claims are stamped a microsecond apart and judged
        in that order, as if enrolled one after another: of two holding one key the earlier
        wins, and one that lost takes nothing from those after it. A claim waiting for
        other nodes' claims is judged again as soon as any of them resolves."""
        claims, started = self._stake_each(batch)
        vectors = {claim.key: vector for claim, (_, vector) in zip(claims, batch, strict=True)}
        outcomes: dict[int, Registration | DedupError] = {}
        contested, consistency = claims, self._first_look
        try:
            while contested:
                lost, waiting, won = self._judge_keys(contested, consistency)
                consistency = STRONG
                outcomes.update(lost)
                if lost:
                    self._rows.remove(list(lost))
                if won:
                    self._within_claim_time(started)
                    self._rows.upsert_each([(dataclasses.replace(claim, state=ACTIVE),
                                             vectors[claim.key]) for claim in won])
                    outcomes.update((claim.key, claim.registration) for claim in won)
                contested = [claim for claim in contested if claim.key in waiting]
                if contested and not lost and not won:
                    self._wait_for(set().union(*waiting.values()), started, any_one=True)
        except BaseException as error:
            undecided = [claim.key for claim in claims if claim.key not in outcomes]
            for key in undecided:
                self._remove_quietly(key)
            committed = sum(not isinstance(o, DedupError) for o in outcomes.values())
            if isinstance(error, milvus_errors()):
                error = translated(error)
            elif not isinstance(error, DedupError):
                if not committed:
                    raise
                log.exception("enrolment batch failed after %d of its claims committed",
                              committed)
                error = BackendUnavailable("milvus: the enrolment failed; nothing of this "
                                           "registration was stored, retry")
            # The committed ones stay committed: only the undecided get the error.
            outcomes.update((key, error) for key in undecided)
        return [outcomes[claim.key] for claim in claims]

    def _stake_each(self, batch: list[tuple[Registration, Vector]]) -> tuple[list[Row], float]:
        now = now_us()
        claims = [Row(new_key(), dataclasses.replace(registration,
                                                     embedding_model=self._rows.model_id,
                                                     enrolled_at_us=now + offset),
                      PENDING, now + offset)
                  for offset, (registration, _) in enumerate(batch)]
        started = time.monotonic()
        self._rows.upsert_each([(claim, vector) for claim, (_, vector) in
                                zip(claims, batch, strict=True)])
        return claims, started

    def _judge_keys(self, claims: list[Row], consistency: str
                    ) -> tuple[dict[int, DedupError], dict[int, set[int]], list[Row]]:
        """`_key_rivals` for each claim, in stamp order, from one query: the claims that lost
        (and why), those that wait (and for which rows), and those that won. Against a
        claim of the same batch: one that lost is no rival, one that won beats the later,
        one that waits makes the later wait too, and a later one never holds up an earlier
        (it loses to it, or waits for it, in this same pass)."""
        holders = self._rows.holders_of_each([claim.registration for claim in claims],
                                             consistency)
        ours = {claim.key for claim in claims}
        lost: dict[int, DedupError] = {}
        waiting: dict[int, set[int]] = {}
        won: list[Row] = []
        won_keys: set[int] = set()
        for claim in sorted(claims, key=lambda claim: (claim.claimed_at_us, claim.key)):
            rivals = [row for row in holders if row.key != claim.key and row.key not in lost
                      and _holds_a_key_of(row, claim.registration)]
            winner = next((row for row in rivals if row.state == ACTIVE or row.key in won_keys
                           or (row.key not in ours and row.before(claim))), None)
            if winner is not None:
                lost[claim.key] = taken(winner, claim.registration)
                continue
            blockers = {row.key for row in rivals if row.key in waiting or row.key not in ours}
            if blockers:
                waiting[claim.key] = blockers
            else:
                won.append(claim)
                won_keys.add(claim.key)
        return lost, waiting, won

    def enrol_checked(self, registration: Registration, vector: Vector,
                      check: EnrolmentCheck) -> tuple[CheckResult, Registration | None]:
        """The verdict, and the registration as stored when the verdict admits it."""
        claim, started = self._stake(registration, vector)
        with self._withdrawn_on_failure(claim):
            result, won = self._contest(claim, vector, check, started)
            if not won:
                self._rows.remove([claim.key])
                return result, None
            self._commit(claim, vector, started)
        return result, claim.registration

    def reap(self) -> None:
        """Removes the claims of nodes that died mid-enrolment, long ignored by then."""
        removed = self._rows.reap(now_us() - int(2 * self._timeout_s * 1e6))
        if removed:
            log.warning("removed %d abandoned enrolment claim(s)", removed)

    def _stake(self, registration: Registration, vector: Vector) -> tuple[Row, float]:
        """Inserts the enrolment as a PENDING claim; returns it and when it was staked."""
        claims, started = self._stake_each([(registration, vector)])
        return claims[0], started

    @contextmanager
    def _withdrawn_on_failure(self, claim: Row) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._remove_quietly(claim.key)
            raise

    def _remove_quietly(self, key: int) -> None:
        try:
            self._rows.remove([key])
        except Exception:  # the claim expires and is reaped: nobody counts it meanwhile
            log.exception("could not remove the abandoned claim %d", key)

    def _commit(self, claim: Row, vector: Vector, started: float) -> None:
        self._within_claim_time(started)
        self._rows.upsert(dataclasses.replace(claim, state=ACTIVE), vector)

    def _key_rivals(self, claim: Row, consistency: str) -> set[int]:
        """Later pending claims of its registration_id or msisdn, to wait for; a committed
        or earlier holder raises ALREADY_EXISTS."""
        waiting = set()
        for row in self._rows.holders(claim.registration, pending=True, exclude=claim.key,
                                      consistency=consistency):
            if row.state == ACTIVE or row.before(claim):
                raise taken(row, claim.registration)
            waiting.add(row.key)
        return waiting

    def _contest(self, claim: Row, vector: Vector, check: EnrolmentCheck, started: float
                 ) -> tuple[CheckResult, bool]:
        """Judges again until this claim has won (True) or lost, with the verdict."""
        consistency = self._first_look
        while True:
            self._within_claim_time(started)
            waiting = self._key_rivals(claim, consistency)
            result, with_pending, rivals = self._judge(claim, vector, check, consistency)
            consistency = STRONG  # what the rivals waited for did after the stake
            if not check.admits(result):
                return result, False
            if not check.admits(with_pending):
                if any(row.before(claim) for row in rivals):
                    final = self._after_earlier_claims(claim, vector, check, rivals,
                                                       with_pending)
                    if final is not None:
                        return final, False
                    continue  # none of them committed: claimed again, judged again
                waiting.update(row.key for row in rivals)
            if not waiting:
                return result, True
            self._wait_for(waiting, started)

    def _after_earlier_claims(self, claim: Row, vector: Vector, check: EnrolmentCheck,
                              rivals: list[Row], with_pending: CheckResult
                              ) -> CheckResult | None:
        """The verdict of a claim that lost to earlier pending claims, over the rows that
        committed once those resolved (a refusal names no claim that later withdrew); None
        if it now admits the enrolment, the claim staked again. An earlier claim still
        pending past the time its node had to confirm it (its node died) holds the face
        until it expires: then the verdict counts it (`with_pending`)."""
        earlier = [row for row in rivals if row.before(claim)]
        self._rows.remove([claim.key])  # the earlier claims may be waiting for it
        if not self._resolved(earlier):
            return with_pending
        result = self._judge(claim, vector, check, STRONG)[0]
        if not check.admits(result):
            return result
        self._rows.upsert(claim, vector)
        return None

    def _resolved(self, claims: list[Row]) -> bool:
        """Waits until none of `claims` is PENDING; False if one still is when its node's
        time to confirm it (half of claim_timeout_s from its claim) has passed."""
        keys = sorted(row.key for row in claims)
        deadline_us = max(row.claimed_at_us for row in claims) + int(self._timeout_s / 2 * 1e6)
        while True:
            where = f"key in {keys} and {self._rows.live(True)} and state == {PENDING}"
            if not self._rows.keys(where):
                return True
            if now_us() > deadline_us:
                return False
            time.sleep(POLL_S)

    def _judge(self, claim: Row, vector: Vector, check: EnrolmentCheck, consistency: str
               ) -> tuple[CheckResult, CheckResult, list[Row]]:
        """The verdict over the other committed rows, the verdict counting recent claims
        too, and the claims among the rows that one rests on: from one query and one search
        of the live rows (a second search when claims crowd the committed rows out)."""
        same_id = self._rows.same_id_rows(vector, check.claimed_id_number, True, claim.key,
                                          consistency)
        k = check.search_k + len(same_id)
        ranked = self._rows.search([vector.tolist()], k + PENDING_SPARE,
                                   self._rows.comparable(True, claim.key), consistency)[0]
        committed_same_id = [row for row in same_id if row.state == ACTIVE]
        committed_k = check.search_k + len(committed_same_id)
        committed = [row for row in ranked if row.state == ACTIVE]
        if self._crowded(ranked, committed, committed_k, k + PENDING_SPARE):
            committed = self._rows.search([vector.tolist()], committed_k,
                                          self._rows.comparable(False, claim.key),
                                          consistency)[0]
        candidates = nearest(ranked, k, check.floor)
        result = check.judge(_scored(nearest(committed, committed_k, check.floor)),
                             _scored(committed_same_id))
        with_pending = check.judge(_scored(candidates), _scored(same_id))
        claims = [row for row in candidates + same_id if row.state == PENDING]
        return result, with_pending, claims

    def _crowded(self, ranked: list[Row], committed: list[Row], committed_k: int,
                 asked: int) -> bool:
        """Whether pending claims among the live rows found may have kept committed rows out:
        an exact search was cut off short of committed_k of them; an approximate one found
        any claim (it re-scores its candidates, of which claims took some)."""
        if len(committed) == len(ranked):
            return False
        if not self._rows.config.exact:
            return True
        return len(committed) < committed_k and len(ranked) >= asked

    def _wait_for(self, keys: set[int], started: float, any_one: bool = False) -> None:
        """Until none of `keys` (with `any_one`: one of them) is a recent PENDING claim."""
        while True:
            where = f"key in {sorted(keys)} and {self._rows.live(True)} and state == {PENDING}"
            pending = len(self._rows.keys(where))
            resolved = pending < len(keys) if any_one else pending == 0
            if resolved:
                return
            self._within_claim_time(started)
            time.sleep(POLL_S)

    def _within_claim_time(self, started: float) -> None:
        # Others ignore a claim after claim_timeout_s; committing past half of it could
        # race one that already does.
        if time.monotonic() - started > self._timeout_s / 2:
            raise BackendUnavailable(
                "milvus: the enrolment could not be confirmed against concurrent enrolments "
                f"within {self._timeout_s / 2:.0f} s; nothing was stored, retry")


def _scored(rows: list[Row]) -> list[Scored]:
    return [row.scored() for row in rows]
