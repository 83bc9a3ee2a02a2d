"""The gRPC IndexAdmin service: rebuild, inspect, compact and checkpoint the gallery's index."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api.status import details, rpc, status_of
from dedup.core.errors import DedupError
from dedup.gallery.base import Gallery, IndexStatus

log = logging.getLogger("dedup.server")


class IndexAdminServicer(pb_grpc.IndexAdminServicer):
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def Rebuild(self, request: pb.RebuildRequest,
                context: grpc.ServicerContext) -> Iterator[pb.RebuildProgress]:
        updates: queue.Queue[pb.RebuildProgress | BaseException] = queue.Queue()

        def progress(phase: str, done: int, total: int) -> None:
            updates.put(pb.RebuildProgress(phase=phase, done=done, total=total))

        def run() -> None:
            try:
                status = self.gallery.rebuild(request.index_factory or None, progress)
                updates.put(pb.RebuildProgress(phase="done", done=status.vectors,
                                               total=status.vectors, index=_index_info(status)))
            except BaseException as error:
                updates.put(error)

        # The rebuild is a server job: it finishes even if this caller goes away.
        threading.Thread(target=run, name="dedup-rebuild-rpc", daemon=True).start()
        while True:
            update = updates.get()
            if isinstance(update, BaseException):
                if not isinstance(update, DedupError):
                    log.error("rebuild failed", exc_info=update)
                context.abort(status_of(update) if isinstance(update, DedupError)
                              else grpc.StatusCode.INTERNAL, f"rebuild failed: {details(update)}")
                return
            yield update
            if update.phase == "done":
                return

    @rpc
    def GetIndexInfo(self, request: pb.GetIndexInfoRequest,
                     context: grpc.ServicerContext) -> pb.IndexInfo:
        return _index_info(self.gallery.index_status())

    @rpc
    def Compact(self, request: pb.CompactRequest,
                context: grpc.ServicerContext) -> pb.CompactResponse:
        started = time.monotonic()
        before, after = self.gallery.compact()
        return pb.CompactResponse(bytes_before=before, bytes_after=after,
                                  seconds=time.monotonic() - started)

    @rpc
    def Checkpoint(self, request: pb.CheckpointRequest,
                   context: grpc.ServicerContext) -> pb.CheckpointResponse:
        sequence = self.gallery.checkpoint()
        return pb.CheckpointResponse(sequence=sequence, path=str(self.gallery.checkpoint_path))


def _index_info(status: IndexStatus) -> pb.IndexInfo:
    return pb.IndexInfo(**dataclasses.asdict(status))
