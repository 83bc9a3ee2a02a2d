"""The console's only way to the data: gRPC calls to `dedup serve`, each with the signed-in
person's own bearer token and the open case (Investigate's fields, or `x-case-id` and
`x-purpose` metadata elsewhere), so the server authorises and audits every one as that
person's. Errors come back as `ServerRefused`, a status name and the server's message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.console.sessions import Case
from dedup.console.settings import ConsoleSettings


class ServerRefused(Exception):
    """A call that did not succeed: `code` the gRPC status name, `message` the server's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def of(cls, error: grpc.RpcError) -> ServerRefused:
        code = error.code()
        return cls(code.name if code is not None else "UNKNOWN", error.details() or "")


class SignInRefused(Exception):
    """A token the console does not accept, with what to tell the person."""


def _metadata(case: Case | None) -> tuple[tuple[str, str], ...]:
    if case is None:
        return ()
    return (("x-case-id", case.case_id), ("x-purpose", case.purpose))


class Backend:
    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        if settings.ca is None:
            self.channel = grpc.insecure_channel(settings.server)
        else:
            self.channel = grpc.secure_channel(
                settings.server,
                grpc.ssl_channel_credentials(root_certificates=settings.ca.read_bytes()))
        self.face_dedup = pb_grpc.FaceDedupStub(self.channel)
        self.investigate = pb_grpc.InvestigateStub(self.channel)
        self.index_admin = pb_grpc.IndexAdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, token: str | None, case: Case | None,
              timeout: float | None = None) -> Any:
        options: dict[str, Any] = {"metadata": _metadata(case),
                                   "timeout": timeout or self.settings.call_timeout_s}
        if token is not None:
            options["credentials"] = grpc.access_token_call_credentials(token)
        try:
            return method(request, **options)
        except grpc.RpcError as error:
            raise ServerRefused.of(error) from None

    # -- sign-in -------------------------------------------------------------------------

    def role_of(self, token: str | None) -> str:
        """The role the server gives this token: Stats answers an admin only; an empty
        Adjudicate is refused before anything is read, PERMISSION_DENIED for a role without
        Investigate and INVALID_ARGUMENT (no case_id) for one with it."""
        try:
            self._call(self.face_dedup.Stats, pb.StatsRequest(), token, None)
            return "admin"
        except ServerRefused as refused:
            if refused.code == "UNAUTHENTICATED":
                raise SignInRefused(f"the server does not accept this token: "
                                    f"{refused.message}") from None
            if refused.code != "PERMISSION_DENIED":
                raise
        try:
            self._call(self.investigate.Adjudicate, pb.AdjudicateRequest(), token, None)
        except ServerRefused as refused:
            if refused.code == "PERMISSION_DENIED":
                return "registration"
            if refused.code == "INVALID_ARGUMENT":
                return "investigator"
            raise
        raise ServerRefused("UNKNOWN", "an empty Adjudicate request was accepted")

    # -- Investigate ---------------------------------------------------------------------

    def search(self, token: str | None, case: Case, request: pb.SearchRequest
               ) -> pb.SearchResponse:
        request.case_id, request.purpose = case.case_id, case.purpose
        response: pb.SearchResponse = self._call(self.investigate.Search, request, token, case)
        return response

    def links(self, token: str | None, case: Case, id_number: str) -> pb.LinksResponse:
        request = pb.LinksRequest(case_id=case.case_id, purpose=case.purpose,
                                  id_number=id_number)
        response: pb.LinksResponse = self._call(self.investigate.Links, request, token, case)
        return response

    def adjudicate(self, token: str | None, case: Case, request: pb.AdjudicateRequest
                   ) -> pb.AdjudicateResponse:
        request.case_id, request.purpose = case.case_id, case.purpose
        response: pb.AdjudicateResponse = self._call(self.investigate.Adjudicate, request,
                                                     token, case)
        return response

    def find_clusters(self, token: str | None, case: Case, min_ids: int,
                      min_score: float | None) -> Any:
        """The FindClusters call: iterate it for ClusterUpdate messages; `cancel()` stops it."""
        request = pb.FindClustersRequest(case_id=case.case_id, purpose=case.purpose,
                                         min_distinct_id_numbers=min_ids)
        if min_score is not None:
            request.min_score = min_score
        credentials = (grpc.access_token_call_credentials(token) if token is not None
                       else None)
        return self.investigate.FindClusters(request, metadata=_metadata(case),
                                             credentials=credentials)

    # -- FaceDedup and IndexAdmin ----------------------------------------------------------

    def registration(self, token: str | None, case: Case, registration_id: str
                     ) -> pb.Registration:
        request = pb.GetRegistrationRequest(registration_id=registration_id)
        response: pb.Registration = self._call(self.face_dedup.GetRegistration, request,
                                               token, case)
        return response

    def stats(self, token: str | None, case: Case | None) -> pb.StatsResponse:
        response: pb.StatsResponse = self._call(self.face_dedup.Stats, pb.StatsRequest(),
                                                token, case)
        return response

    def index_info(self, token: str | None, case: Case | None) -> pb.IndexInfo:
        response: pb.IndexInfo = self._call(self.index_admin.GetIndexInfo,
                                            pb.GetIndexInfoRequest(), token, case)
        return response


def cluster_updates(call: Any) -> Iterator[pb.ClusterUpdate]:
    """The stream's messages; ServerRefused when it ends in an error."""
    try:
        yield from call
    except grpc.RpcError as error:
        raise ServerRefused.of(error) from None
