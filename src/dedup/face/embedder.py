"""Photo -> 512-d ArcFace embedding, with insightface on onnxruntime, on the CPU, offline.

A bounded pool of worker threads (one per core by default) does the work, so that photo
calls never occupy the gRPC threads that serve embedding-only calls beyond a fixed share:
each worker owns its own detector and recogniser sessions (one onnxruntime thread each),
takes every photo waiting in the queue (up to a batch), detects the face in each, and
runs recognition once for the whole batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dedup.core.errors import (
    DeadlineExceeded,
    DedupError,
    InvalidArgument,
    ModelError,
    Stopping,
)
from dedup.core.records import DetectedFace
from dedup.core.settings import CaptureRules
from dedup.core.vectors import Vector
from dedup.core.work_queue import take_batch
from dedup.face.image import Pixels, check_image, decode_checked
from dedup.face.model_pack import ModelPack, check_model_dir, describe_pack
from dedup.face.photo_slots import PhotoSlots, SlotRefused
from dedup.face.quality import Quality, assess, refusal

log = logging.getLogger("dedup.embedder")


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class _LabelledCounter(Protocol):
    def labels(self, *values: str) -> _Counter: ...


class EmbeddingMetrics(Protocol):
    """What the embedder counts (the server's Prometheus metrics have these)."""

    @property
    def photos_abandoned(self) -> _Counter: ...
    @property
    def photos_refused(self) -> _LabelledCounter: ...
    @property
    def embedding(self) -> _Histogram: ...
    @property
    def embedded(self) -> _Counter: ...


@dataclass(frozen=True)
class EmbeddedFace:
    vector: Vector
    face: DetectedFace
    quality: Quality


@dataclass(frozen=True)
class _Detected:
    """What recognition and the quality assessment need of one detected face."""

    job: _Job
    face: DetectedFace
    box: np.ndarray
    landmarks: np.ndarray
    crop: Pixels


@dataclass
class _Slot:
    """A photo's slot: given back once, when the photo is answered or dropped."""

    holder: str | None
    released: bool = False


@dataclass
class _Job:
    pixels: Pixels
    use_largest: bool
    field: str
    future: Future[EmbeddedFace]
    slot: _Slot


def choose_face(boxes: np.ndarray, rules: CaptureRules, use_largest: bool, field: str
                ) -> tuple[int, DetectedFace]:
    """Applies the capture rules to the detector's boxes (x1, y1, x2, y2, score)."""
    found = [i for i in range(len(boxes)) if boxes[i, 4] >= rules.detection_threshold]
    if not found:
        raise InvalidArgument(field, "no face detected")
    if len(found) > 1 and not use_largest:
        raise InvalidArgument(
            field, f"{len(found)} faces detected, a capture must show one "
            "(or set face.use_largest_face)")
    area = (boxes[found, 2] - boxes[found, 0]) * (boxes[found, 3] - boxes[found, 1])
    chosen = found[int(np.argmax(area))]
    x1, y1, x2, y2, score = (float(v) for v in boxes[chosen, :5])
    face = DetectedFace((x1, y1, x2, y2), score, len(found))
    if face.size < rules.min_face_pixels:
        raise InvalidArgument(
            field, f"face is {face.size:.0f} px, below the minimum {rules.min_face_pixels} px "
            f"by {rules.min_face_pixels - face.size:.0f} px")
    if score < rules.min_detection_score:
        raise InvalidArgument(
            field, f"face detection score {score:.2f} is below the minimum "
            f"{rules.min_detection_score:.2f} by {rules.min_detection_score - score:.2f}")
    return chosen, face


class FaceEmbedder:
    def __init__(self, model_dir: Path, rules: CaptureRules | None = None, workers: int = 2,
                 max_batch: int = 8, max_pending: int = 16,
                 metrics: EmbeddingMetrics | None = None,
                 max_pending_per_holder: int | None = None) -> None:
        check_model_dir(model_dir)
        self.metrics = metrics
        self.rules = rules or CaptureRules()
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self.slots = PhotoSlots(max_pending, max_pending_per_holder)
        self._releasing = threading.Lock()
        self._closing = threading.Lock()
        self._closed = False
        analyzers = [self._load(model_dir) for _ in range(workers)]
        detector, recogniser = analyzers[0].models["detection"], analyzers[0].models["recognition"]
        self.pack: ModelPack = describe_pack(
            model_dir, Path(detector.model_file), Path(recogniser.model_file))
        self._workers = [
            threading.Thread(target=self._work, args=(analyzer,), daemon=True,
                             name=f"dedup-embed-{i}")
            for i, analyzer in enumerate(analyzers)
        ]
        for worker in self._workers:
            worker.start()
        log.info("face model %s from %s, %d worker(s)", self.pack.model_id, model_dir, workers)

    @property
    def model_id(self) -> str:
        return self.pack.model_id

    def _load(self, model_dir: Path) -> Any:
        import onnxruntime
        from insightface.app import FaceAnalysis

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # one worker per core; each session single-threaded
        options.inter_op_num_threads = 1
        try:
            analyzer = FaceAnalysis(
                name=str(model_dir.resolve()), allowed_modules=["detection", "recognition"],
                providers=["CPUExecutionProvider"], sess_options=options,
            )
        except Exception as error:  # insightface raises bare assertions and ORT errors
            raise ModelError(f"model directory {model_dir}: cannot load the face models "
                             f"({type(error).__name__}: {error})") from error
        if "recognition" not in analyzer.models:
            raise ModelError(f"model directory {model_dir} holds no ArcFace recogniser")
        size = self.rules.detector_size
        analyzer.prepare(ctx_id=-1, det_thresh=self.rules.detection_threshold,
                         det_size=(size, size))
        # insightface 2.1 calls a scikit-image API deprecated in 0.26 on every alignment.
        warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")
        return analyzer

    def embed(self, data: bytes, use_largest: bool, field: str,
              timeout: float | None = None, holder: str | None = None) -> EmbeddedFace:
        """Blocks the caller until its photo is embedded; the work runs in the pool. Its size,
        format and header are checked first (a bad photo is INVALID_ARGUMENT, whatever the
        load); then it is admitted before its pixels are decoded (up to 25 megapixels, 75 MB):
        one refused for want of a slot costs nothing more. `holder` (the caller) is held to
        its own share of the slots where the embedder has one. The slot is held until the
        photo is answered: a photo whose caller's deadline passed keeps it until a worker
        drops the photo from the queue."""
        kind = check_image(data, field, self.rules.max_image_bytes, self.rules.max_pixels)
        try:
            self.slots.take(holder, field)
        except SlotRefused as refused:
            if self.metrics is not None:
                self.metrics.photos_refused.labels(refused.reason).inc()
            raise
        slot = _Slot(holder)
        try:
            pixels = decode_checked(data, field, kind)
        except BaseException:
            self._release(slot)
            raise
        job = _Job(pixels, use_largest, field, Future(), slot)
        # Not the job: a callback holding it would keep its pixels in a reference cycle.
        job.future.add_done_callback(lambda done: self._answered(done, slot))
        with self._closing:
            if self._closed:  # no worker would take it
                self._release(slot)
                raise Stopping(f"{field}: the server is stopping; retry")
            self._queue.put(job)
        try:
            return job.future.result(timeout)
        except FutureTimeout as error:
            job.future.cancel()
            raise DeadlineExceeded(f"{field}: the deadline passed while the photo "
                                   "waited to be embedded") from error
        finally:
            if job.future.done() and not job.future.cancelled():
                self._release(slot)  # before the answer leaves: the callback may come later

    def _answered(self, future: Future[EmbeddedFace], slot: _Slot) -> None:
        # A cancelled job is still queued: the worker that drops it gives its slot back.
        if not future.cancelled():
            self._release(slot)

    def _release(self, slot: _Slot) -> None:
        with self._releasing:
            if slot.released:
                return
            slot.released = True
        self.slots.give_back(slot.holder)

    def _work(self, analyzer: Any) -> None:
        while (jobs := take_batch(self._queue, self.max_batch)) is not None:
            try:
                self._run_batch(analyzer, jobs)
            except Exception:  # a dead worker would leave its callers and slots waiting
                log.exception("embedding worker: a batch failed")
            del jobs  # an idle worker holds no photo

    def _run_batch(self, analyzer: Any, jobs: list[_Job]) -> None:
        # A job whose caller gave up (deadline) was cancelled: skip it.
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        for dropped in (job for job in jobs if job.future.cancelled()):
            self._release(dropped.slot)
        started = time.perf_counter()
        try:
            self._embed_batch(analyzer, live)
        except Exception as error:  # never a caller (and its slot) left waiting
            log.exception("embedding failed")
            for job in live:
                if not job.future.done():
                    job.future.set_exception(error)
        if self.metrics is not None:
            self.metrics.photos_abandoned.inc(len(jobs) - len(live))
            if live:
                self.metrics.embedding.observe(time.perf_counter() - started)
                self.metrics.embedded.inc(len(live))

    def _embed_batch(self, analyzer: Any, jobs: list[_Job]) -> None:
        from insightface.utils import face_align

        if not jobs:  # every caller of the batch gave up
            return
        recogniser = analyzer.models["recognition"]
        ready: list[_Detected] = []
        for job in jobs:
            try:
                boxes, landmarks = analyzer.det_model.detect(job.pixels, max_num=0)
                index, face = choose_face(boxes, self.rules, job.use_largest, job.field)
                crop = face_align.norm_crop(job.pixels, landmark=landmarks[index],
                                            image_size=recogniser.input_size[0])
                ready.append(_Detected(job, face, boxes[index], landmarks[index], crop))
            except DedupError as error:
                job.future.set_exception(error)
            except Exception as error:
                log.exception("face detection failed")
                job.future.set_exception(error)
        if not ready:
            return
        try:
            features = np.asarray(recogniser.get_feat([d.crop for d in ready]),
                                  dtype=np.float32)
        except Exception as error:
            log.exception("face recognition failed")
            for detected in ready:
                detected.job.future.set_exception(error)
            return
        norms = np.linalg.norm(features, axis=1)  # a quality signal: taken before normalising
        features /= norms[:, None]
        for detected, vector, norm in zip(ready, features, norms, strict=True):
            self._finish(detected, vector, float(norm))

    def _finish(self, detected: _Detected, vector: Vector, norm: float) -> None:
        """Assesses the capture's quality and refuses it under the gate (photos only)."""
        job = detected.job
        try:
            quality = assess(job.pixels, detected.box[:4], detected.face.score,
                             detected.landmarks, detected.crop, norm)
        except Exception as error:
            log.exception("face quality assessment failed")
            job.future.set_exception(error)
            return
        gate = self.rules.quality_gate
        message = None if gate is None else refusal(gate, quality)
        if message is not None:
            job.future.set_exception(InvalidArgument(job.field, message))
        else:
            job.future.set_result(EmbeddedFace(vector, detected.face, quality))

    def close(self) -> None:
        """Stops the workers once they have answered what they took; photos still queued
        are answered Stopping, and any photo sent from now on too."""
        with self._closing:
            self._closed = True
            for _ in self._workers:
                self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=10)
        self._answer_queued()

    def _answer_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                continue
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Stopping(f"{job.field}: the server is stopping; retry"))
            else:
                self._release(job.slot)
        for _ in (worker for worker in self._workers if worker.is_alive()):
            self._queue.put(None)  # its stop signal, should it still be in a batch
