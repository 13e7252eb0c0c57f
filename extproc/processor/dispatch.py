"""One stream's messages to hook calls and back: the transport-free core of the SDK.

:class:`StreamDispatcher` keeps the :class:`StreamContext` up to date from each
``ProcessingRequest``, calls the matching hook and turns what it returns into the reply.
The gRPC service and :mod:`extproc.processor.testing` both drive it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from extproc.processor.base import Body, Headers, HookResult, Processor, StreamContext
from extproc.processor.decisions import Continue, Decision, RespondError

_Hook = Callable[[StreamContext, Any], HookResult]


def _struct_dict(message: Any) -> dict[str, Any]:
    converted: dict[str, Any] = json_format.MessageToDict(message)
    return converted


class StreamDispatcher:
    """Feed one stream's requests through :meth:`handle`; one instance per stream."""

    def __init__(
        self, processor: Processor, invocation_metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.processor = processor
        self.ctx = StreamContext(invocation_metadata=invocation_metadata)
        self.finished = False

    def handle(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        """The reply to ``request``; None in observability mode (the proxy ignores replies).

        Raises what the hook raised, except :class:`RespondError`, which becomes the reply.
        After an immediate response :attr:`finished` is set: the HTTP request is answered and
        nothing more of it will come.
        """
        phase = request.WhichOneof("request")
        if phase is None:
            raise ValueError("ProcessingRequest carries no phase")
        self._observe(request, phase)
        try:
            reply = self._call(phase, getattr(request, phase))
        except RespondError as err:
            reply = err.response.render(phase)
        if reply.HasField("immediate_response"):
            self.finished = True
        return None if request.observability_mode else reply

    def _call(self, phase: str, message: Any) -> ep.ProcessingResponse:
        hook: _Hook = getattr(self.processor, f"on_{phase}")
        if phase.endswith("_headers"):
            result = hook(self.ctx, self._headers(phase, message))
        elif phase.endswith("_body"):
            result = hook(self.ctx, Body(message.body, message.end_of_stream))
        else:
            result = hook(self.ctx, Headers(message.trailers))
        if result is None:
            return Continue().render(phase)
        if isinstance(result, Decision):
            return result.render(phase)
        if isinstance(result, ep.ProcessingResponse):
            return result
        raise TypeError(f"on_{phase} returned {type(result).__name__}, not a decision")

    def _headers(self, phase: str, message: ep.HttpHeaders) -> Headers:
        headers = Headers(message.headers)
        ctx = self.ctx
        if phase == "request_headers":
            ctx.request_headers = headers
            ctx.method = headers.get(":method", "")
            ctx.path = headers.get(":path", "")
            ctx.authority = headers.get(":authority", "")
            ctx.scheme = headers.get(":scheme", "")
            ctx.request_id = headers.get("x-request-id", "")
        else:
            ctx.response_headers = headers
            status = headers.get(":status", "")
            ctx.status = int(status) if status.isdigit() else 0
        return headers

    def _observe(self, request: ep.ProcessingRequest, phase: str) -> None:
        ctx = self.ctx
        ctx.observability_mode = request.observability_mode
        for namespace, struct in request.attributes.items():
            ctx.attributes.setdefault(namespace, {}).update(_struct_dict(struct))
        if request.metadata_context.filter_metadata:
            ctx.metadata = {
                namespace: _struct_dict(struct)
                for namespace, struct in request.metadata_context.filter_metadata.items()
            }
