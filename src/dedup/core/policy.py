"""The verdict rules: a pure function of the scored candidates and the policy.

Rules, the first that applies wins:
1. a match >= match_threshold under an ID number other than the claimed one -> DUPLICATE_IDENTITY
2. the claimed ID number has registrations and none of them scores >= review_threshold
   against the probe (compared 1:1) -> ID_FACE_MISMATCH
3. the claimed ID number already has max_sims_per_id registrations -> SIM_LIMIT_EXCEEDED
4. a match >= match_threshold under the claimed ID number -> SAME_PERSON
5. the best score lies between the thresholds -> REVIEW
6. the probe is a photo whose unified quality is under review_quality (it passed the quality
   gate, but only just) and the best score reaches review_quality_floor -> REVIEW
7. otherwise -> CLEAR
Without a claimed ID number, rules 2-4 do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from dedup.core.records import CheckResult, Match, Registration, Verdict
from dedup.core.settings import Policy


@dataclass(frozen=True)
class Scored:
    """A candidate registration with its exact cosine score against the probe."""

    key: int
    registration: Registration
    score: float


def decide(
    policy: Policy,
    claimed_id_number: str,
    candidates: list[Scored],
    same_id: list[Scored],
    max_matches: int,
    settled_different: frozenset[int] = frozenset(),
    quality: float | None = None,
) -> CheckResult:
    """Applies the rules to index candidates and the claimed ID's own registrations.

    `same_id` holds every registration under the claimed ID number (empty without one),
    scored 1:1; `candidates` are the index's neighbours. Both are exact scores.
    `settled_different` holds the keys of registrations an investigator settled as a different
    person from the one checked: they are listed, but count for neither DUPLICATE_IDENTITY nor
    REVIEW. `quality` is the unified quality of a photo probe (None for an embedding).
    """
    merged = {scored.key: scored for scored in candidates}
    merged.update({scored.key: scored for scored in same_id})
    ranked = sorted(merged.values(), key=lambda scored: (-scored.score, scored.key))
    counted = [s for s in ranked if s.key not in settled_different]
    best = counted[0].score if counted else 0.0
    other_ids = {
        scored.registration.id_number
        for scored in counted
        if scored.score >= policy.match_threshold
        and scored.registration.id_number != claimed_id_number
    }
    verdict = _verdict(policy, claimed_id_number, best, other_ids, same_id)
    shown_from = policy.review_threshold
    if verdict is Verdict.CLEAR and _marginal(policy, quality) \
            and best >= policy.review_quality_floor:
        verdict, shown_from = Verdict.REVIEW, policy.review_quality_floor
    matches = [
        Match(scored.registration, scored.score,
              scored.key in settled_different)
        for scored in ranked[:max_matches]
        if scored.score >= shown_from
    ]
    return CheckResult(
        verdict=verdict,
        matches=matches,
        distinct_other_id_numbers=len(other_ids),
        same_id_registrations=len(same_id),
        best_score=ranked[0].score if ranked else 0.0,
    )


def _marginal(policy: Policy, quality: float | None) -> bool:
    return quality is not None and quality < policy.review_quality


def _verdict(
    policy: Policy, claimed_id_number: str, best: float, other_ids: set[str], same_id: list[Scored]
) -> Verdict:
    if other_ids:
        return Verdict.DUPLICATE_IDENTITY
    if claimed_id_number and same_id:
        best_same = max(scored.score for scored in same_id)
        if best_same < policy.review_threshold:
            return Verdict.ID_FACE_MISMATCH
        if len(same_id) >= policy.max_sims_per_id:
            return Verdict.SIM_LIMIT_EXCEEDED
        if best_same >= policy.match_threshold:
            return Verdict.SAME_PERSON
    if best >= policy.review_threshold:
        return Verdict.REVIEW
    return Verdict.CLEAR

