"""Registers servicers so that undecodable request bytes get INVALID_ARGUMENT.

grpcio answers a request its deserializer cannot parse with INTERNAL, which tells the
caller nothing and reads as a server fault. Here parsing never raises: a failure becomes an
`Undecodable` that the handler turns into INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from dedup.api.auth import CALLER, Authorizer
from dedup.api.observe import CallObserver
from dedup.api.status import details, status_of
from dedup.core.errors import DedupError


class Undecodable:
    """Request bytes that are not a valid message of the expected type."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def abort(self, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request: not a valid {self.type_name} message ({self.reason})")


def _parser(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    type_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            return Undecodable(type_name, str(error) or type(error).__name__)

    return parse


def _checked(request: Any, context: grpc.ServicerContext) -> Any:
    if isinstance(request, Undecodable):
        request.abort(context)
    return request


def _checked_all(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        yield _checked(request, context)


def _admit(authorizer: Authorizer, method: MethodDescriptor,
           context: grpc.ServicerContext) -> None:
    """Authenticates and authorises the caller, who is then in CALLER for the audit trail."""
    try:
        caller = authorizer.caller(context)
        authorizer.check(caller, method.containing_service.name, method.name)
    except DedupError as error:
        context.abort(status_of(error), details(error))
    CALLER.set(caller)


def _observed(method: MethodDescriptor, behaviour: Callable[..., Any],
              observer: CallObserver, authorizer: Authorizer) -> Callable[..., Any]:
    """The behaviour, run inside the observer, for an admitted caller, with its request(s)
    checked. Every call sets CALLER before its behaviour runs."""
    check = _checked_all if method.client_streaming else _checked

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        with observer.call(method.name, context):
            _admit(authorizer, method, context)
            return behaviour(check(request, context), context)

    def handle_streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with observer.call(method.name, context):
            _admit(authorizer, method, context)
            yield from behaviour(check(request, context), context)

    return handle_streaming if method.server_streaming else handle


def _handler(method: MethodDescriptor, behaviour: Callable[..., Any],
             observer: CallObserver, authorizer: Authorizer) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(method.client_streaming, method.server_streaming)]
    return make(_observed(method, behaviour, observer, authorizer),
                request_deserializer=_parser(request_class),
                response_serializer=response_class.SerializeToString)


def add_service(server: grpc.Server, service: ServiceDescriptor, servicer: object,
                observer: CallObserver, authorizer: Authorizer) -> None:
    """Serves every method of `service` from the same-named method of `servicer`."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name), observer,
                                      authorizer)
                for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
