"""Replies of the server as the templates show them: plain dicts of strings and numbers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.console.sessions import SettledPairs
from dedup.console.settings import ConsoleSettings

QUALITY_COMPONENTS = ("face_size", "inter_eye", "exposure", "contrast", "uniformity",
                      "sharpness", "compression", "roll", "yaw", "pitch", "detection",
                      "embedding_norm")


def enrolled_at(registration: pb.Registration) -> str:
    if not registration.HasField("enrolled_at"):
        return ""
    moment = registration.enrolled_at.ToDatetime(tzinfo=UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def registration_view(registration: pb.Registration, settings: ConsoleSettings
                      ) -> dict[str, Any]:
    return {"registration_id": registration.registration_id,
            "id_number": registration.id_number, "msisdn": registration.msisdn,
            "carrier": registration.carrier, "region": registration.region,
            "enrolled_at": enrolled_at(registration),
            "embedding_model": registration.embedding_model,
            "enrolled_by": registration.enrolled_by,
            "quality": _stored_quality(registration, "quality"),
            "client_quality": _stored_quality(registration, "client_quality"),
            "photo_url": settings.photo_url(registration.registration_id)}


def _stored_quality(registration: pb.Registration,
                    field: Literal["quality", "client_quality"]) -> str:
    """The unified quality stored with a registration (`quality`: measured by the server on
    its photo; `client_quality`: the client's word), or "" when there is none."""
    return f"{getattr(registration, field):.1f}" if registration.HasField(field) else ""


def match_rows(matches: Any, checked: str, settings: ConsoleSettings,
               settled: SettledPairs) -> list[dict[str, Any]]:
    """Search results, best first, each with its score as a bar's width (0-100) and whether
    the pair (checked, match) is settled."""
    rows = []
    for rank, match in enumerate(matches, start=1):
        row = registration_view(match.registration, settings)
        row.update(rank=rank, score=f"{match.score:.4f}", score_value=match.score,
                   bar=max(0.0, min(100.0, match.score * 100)))
        label = settled.of(checked, row["registration_id"]) if checked else ""
        if match.settled_different:
            label = label or "different people"
        row["settled"] = label
        rows.append(row)
    return rows


def quality_view(quality: pb.Quality) -> dict[str, Any]:
    return {"unified": f"{quality.unified:.1f}",
            "components": [(name.replace("_", " "), f"{getattr(quality, name):.1f}")
                           for name in QUALITY_COMPONENTS]}


def detected_view(face: pb.DetectedFace) -> dict[str, Any]:
    width, height = face.x2 - face.x1, face.y2 - face.y1
    margin = 0.35 * max(width, height)
    return {"box": (f"{face.x1:.0f}", f"{face.y1:.0f}", f"{width:.0f}", f"{height:.0f}"),
            "view": " ".join(f"{v:.0f}" for v in (face.x1 - margin, face.y1 - margin,
                                                   width + 2 * margin, height + 2 * margin)),
            "detection_score": f"{face.detection_score:.3f}",
            "faces_in_image": face.faces_in_image}


def links_view(reply: pb.LinksResponse, asked: str, settings: ConsoleSettings,
               settled: SettledPairs) -> dict[str, Any]:
    """The asked ID number's registrations, the linked ID numbers (best first) and the graph
    (cytoscape elements: a node per ID number with its registration count, an edge per link
    with its best score)."""
    linked = sorted(reply.linked, key=lambda link: -link.best_score)
    nodes = [{"data": {"id": asked, "label": f"{asked}\n{len(reply.registrations)} reg.",
                       "asked": 1}}]
    edges = []
    rows = []
    for link in linked:
        count = len(link.registrations)
        nodes.append({"data": {"id": link.id_number, "label": f"{link.id_number}\n{count} reg.",
                               "asked": 0}})
        edges.append({"data": {"id": f"{asked}--{link.id_number}", "source": asked,
                               "target": link.id_number, "label": f"{link.best_score:.3f}",
                               "score": round(link.best_score, 4)}})
        rows.append({"id_number": link.id_number, "best_score": f"{link.best_score:.4f}",
                     "bar": max(0.0, min(100.0, link.best_score * 100)),
                     "registration_id": link.registration_id,
                     "matched_registration_id": link.matched_registration_id,
                     "settled": settled.of(link.registration_id, link.matched_registration_id),
                     "registrations": [registration_view(r, settings)
                                       for r in link.registrations]})
    return {"registrations": [registration_view(r, settings) for r in reply.registrations],
            "linked": rows, "graph": {"nodes": nodes, "edges": edges},
            "audit_record_hash": reply.audit_record_hash}


def stats_view(stats: pb.StatsResponse) -> list[tuple[str, str]]:
    policy = stats.policy
    rows = [("registrations", f"{stats.registrations:,}"),
            ("distinct ID numbers", f"{stats.distinct_id_numbers:,}"),
            ("index", f"{stats.index_type} ({stats.index_vectors:,} vectors, "
                      f"{stats.dimension}-d)"),
            ("data directory", stats.data_dir),
            ("match threshold", f"{policy.match_threshold:.2f}"),
            ("review threshold", f"{policy.review_threshold:.2f}"),
            ("SIMs per ID number", str(policy.max_sims_per_id)),
            ("store sequence / checkpoint", f"{stats.store_sequence:,} / "
                                            f"{stats.checkpoint_sequence:,}"),
            ("face model", stats.model.model_id)]
    rows += [(f"registrations of model {model}", f"{count:,}")
             for model, count in sorted(stats.registrations_by_model.items())]
    if stats.calibration.recorded:
        rows.append(("FPIR at the match threshold",
                     f"{stats.calibration.fpir_at_match_threshold:.2e}"))
    return rows


def index_view(info: pb.IndexInfo) -> list[tuple[str, str]]:
    return [("index type", info.index_type),
            ("configured / wanted", f"{info.configured_index_type} / {info.wanted_index_type}"),
            ("vectors", f"{info.vectors:,}"),
            ("exact scores", "yes" if info.exact else
             f"no: {info.rerank_candidates} candidates re-ranked"),
            ("search parameters", info.search_parameters or "-"),
            ("bytes per vector", f"{info.bytes_per_vector:,.0f}"),
            ("rebuilding", "yes" if info.rebuilding else "no"),
            ("store / checkpoint sequence", f"{info.store_sequence:,} / "
                                            f"{info.checkpoint_sequence:,}")]


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
