"""The floor's ext_proc client: one stream per request, driven from the connection's thread.

grpcio's public API hands every message between threads (the channel's spin thread completes
the batch, a condition variable wakes the caller). A *segregated* call instead gets its own
completion queue, which the calling thread polls itself (`next_event`): grpcio uses it for
single-threaded unary-stream calls, and here it carries a bidi stream. No thread hand-off,
no rendezvous object: about the least CPU a grpcio client spends per message, so what a
Python ext_proc proxy cannot go below. It sends what it is given and checks only the kind of
each reply (the no-op processor's are empty); it applies nothing.

Every batch started on a segregated call must be reaped with `next_event`, or the call and
its completion queue are never freed: `Stream` tracks the batches due and reaps them all,
after a cancel too (they then complete at once).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import h11
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

# grpc-stubs type the public API only; cygrpc ships its own catch-all stub, which they hide.
from grpc._cython import cygrpc  # type: ignore[attr-defined]

METHOD = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# Batch tags: the one carrying the current message and its reply, the close, the status.
_MESSAGE, _CLOSE, _STATUS = "message", "close", "status"


class StreamError(ConnectionError):
    """The processor broke the stream or answered out of turn."""


class Channel:
    """One HTTP/2 connection to the processor, shared by every connection thread."""

    def __init__(self, port: int) -> None:
        self.channel: Any = cygrpc.Channel(f"127.0.0.1:{port}".encode(), None, None)
        # Registering the method once spares core its per-call lookup, as grpcio's stubs do.
        self.method_handle: Any = self.channel.get_registered_call_handle(METHOD)

    def stream(self, first: ep.ProcessingRequest) -> Stream:
        return Stream(self, first)


class Stream:
    """A Process stream whose first message is sent on opening; `exchange` the next ones."""

    def __init__(self, channel: Channel, first: ep.ProcessingRequest) -> None:
        self._reply: bytes | None = None
        self._status: Any = None
        opening = (
            cygrpc.SendInitialMetadataOperation(None, 0),
            cygrpc.SendMessageOperation(first.SerializeToString(), 0),
            cygrpc.ReceiveInitialMetadataOperation(0),
            cygrpc.ReceiveMessageOperation(0),
        )
        self._call: Any = channel.channel.segregated_call(
            cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS,
            METHOD,
            None,  # host
            None,  # deadline
            None,  # metadata
            None,  # call credentials
            ((opening, _MESSAGE), ((cygrpc.ReceiveStatusOnClientOperation(0),), _STATUS)),
            None,  # census context
            channel.method_handle,
        )
        self._due = {_MESSAGE, _STATUS}

    def _start(self, operations: tuple[Any, ...], tag: str) -> None:
        if not self._call.operate(operations, tag):
            raise StreamError("the processor stream has ended")
        self._due.add(tag)

    def _wait(self, tag: str) -> None:
        """Reap completed batches until ``tag``'s is one of them."""
        while tag in self._due:
            event = self._call.next_event()
            self._due.discard(event.tag)
            for operation in event.batch_operations:
                if operation.type() == cygrpc.OperationType.receive_message:
                    self._reply = operation.message()
                elif operation.type() == cygrpc.OperationType.receive_status_on_client:
                    self._status = operation

    def reply(self, kind: str) -> ep.ProcessingResponse:
        """The reply to the message in flight, which must be a ``kind`` response."""
        self._wait(_MESSAGE)
        reply, self._reply = self._reply, None
        if reply is None:
            raise StreamError(f"the processor ended the stream instead of a {kind} reply")
        response = ep.ProcessingResponse.FromString(reply)
        if response.WhichOneof("response") != kind:
            raise StreamError(f"expected a {kind} reply, got {response}")
        return response

    def exchange(self, request: ep.ProcessingRequest, kind: str) -> ep.ProcessingResponse:
        self._start(
            (
                cygrpc.SendMessageOperation(request.SerializeToString(), 0),
                cygrpc.ReceiveMessageOperation(0),
            ),
            _MESSAGE,
        )
        return self.reply(kind)

    def close(self) -> None:
        """Half-close and wait for the processor's OK."""
        self._start((cygrpc.SendCloseFromClientOperation(0),), _CLOSE)
        self._wait(_CLOSE)
        self._wait(_STATUS)
        if self._status.code() != cygrpc.StatusCode.ok:
            raise StreamError(f"the processor ended the stream with {self._status.details()!r}")

    def cancel(self) -> None:
        self._call.cancel(cygrpc.StatusCode.cancelled, "")
        while self._due:
            self._due.discard(self._call.next_event().tag)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._due:
            self.cancel()


def _header_map(pairs: list[tuple[bytes, bytes]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k.decode(), raw_value=v) for k, v in pairs]
    )


def request_headers(request: h11.Request) -> ep.ProcessingRequest:
    """What Envoy sends for ``request``'s head: pseudo-headers first, names lower-case."""
    host = next((v for k, v in request.headers if k == b"host"), b"")
    pairs = [(b":method", request.method), (b":path", request.target), (b":authority", host)]
    pairs += [(b":scheme", b"http"), *request.headers]
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=_header_map(pairs)))


def response_headers(response: h11.Response) -> ep.ProcessingRequest:
    pairs = [(b":status", str(response.status_code).encode()), *response.headers]
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=_header_map(pairs)))
