"""Registers the synchronous servicers on the asyncio server.

Every method, whatever its shape in the proto, is registered as a stream-request handler:
grpcio then runs the handler as soon as the call's headers arrive, where a unary handler
would first wait for, read and parse the whole request. So the caller is admitted (see
api/admission.py) before any request byte is read, the request is read within a time bound,
and its bytes are decoded here (undecodable ones get INVALID_ARGUMENT naming the message
type). The servicer method then runs on the worker pool (api/calls.py, api/bridge.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from dedup.api.calls import Call, Gate

_Handle = Callable[[Any, Any], Any]


def _unary_response(method: MethodDescriptor, behaviour: Callable[..., Any], gate: Gate,
                    request_class: type[Message]) -> _Handle:
    if method.client_streaming:
        # A request stream is read ahead by Call.stream, one response per request.
        raise TypeError(f"{method.full_name}: a request stream needs a response stream here")

    async def answer(call: Call) -> Any:
        return await call.run(behaviour, await call.request(), call.sync)

    async def handle(requests: Any, context: Any) -> Any:
        return await gate.serve(method, context, request_class, answer)

    return handle


def _streaming_response(method: MethodDescriptor, behaviour: Callable[..., Any], gate: Gate,
                        request_class: type[Message]) -> _Handle:
    async def answer(call: Call) -> None:
        if method.client_streaming:
            feed = call.feed()
            await call.stream(await call.run(behaviour, feed, call.sync), feed)
        else:
            request = await call.request()
            await call.stream(await call.run(behaviour, request, call.sync), None)

    async def handle(requests: Any, context: Any) -> None:
        await gate.serve(method, context, request_class, answer)

    return handle


def _handler(method: MethodDescriptor, behaviour: Callable[..., Any],
             gate: Gate) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    if method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streaming_response(method, behaviour, gate, request_class),
            response_serializer=response_class.SerializeToString)
    return grpc.stream_unary_rpc_method_handler(
        _unary_response(method, behaviour, gate, request_class),
        response_serializer=response_class.SerializeToString)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object,
                gate: Gate) -> None:
    """Serves every method of `service` from the same-named method of `servicer`."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name), gate)
                for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
