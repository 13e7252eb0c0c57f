"""Run a Processor over a scripted exchange, with no network: for processor unit tests.

    exchange = Exchange(MyProcessor())
    reply = exchange.send(request_headers({":path": "/x", "authorization": "Bearer t"}))
    assert set_headers(reply) == {"x-user": "t"}

A hook that raises propagates out of :meth:`Exchange.send` (behind a proxy, the stream would
end with a gRPC INTERNAL error); :class:`RespondError` becomes an immediate response, as served.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.processor.base import Processor, StreamContext
from extproc.processor.dispatch import StreamDispatcher

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]


def header_map(headers: Pairs) -> base_pb2.HeaderMap:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode("latin-1")) for k, v in items]
    )


def request_headers(headers: Pairs, *, end_of_stream: bool = False) -> ep.ProcessingRequest:
    """A request-headers message; add ``:path``/``:method`` yourself if the processor reads them."""
    http = ep.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream)
    return ep.ProcessingRequest(request_headers=http)


def response_headers(headers: Pairs, *, end_of_stream: bool = False) -> ep.ProcessingRequest:
    http = ep.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream)
    return ep.ProcessingRequest(response_headers=http)


def request_body(data: bytes, *, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


def response_body(data: bytes, *, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


def request_trailers(trailers: Pairs) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_trailers=ep.HttpTrailers(trailers=header_map(trailers)))


def response_trailers(trailers: Pairs) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_trailers=ep.HttpTrailers(trailers=header_map(trailers)))


class Exchange:
    """One stream (one HTTP request) through ``processor``, message by message."""

    def __init__(self, processor: Processor) -> None:
        self._dispatcher = StreamDispatcher(processor)

    @property
    def ctx(self) -> StreamContext:
        return self._dispatcher.ctx

    @property
    def finished(self) -> bool:
        """True once the processor answered the request with an immediate response."""
        return self._dispatcher.finished

    def send(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        """The processor's reply (None in observability mode)."""
        if self._dispatcher.finished:
            raise RuntimeError("the stream ended with an immediate response")
        return self._dispatcher.handle(request)


def run(
    processor: Processor, requests: Iterable[ep.ProcessingRequest]
) -> list[ep.ProcessingResponse | None]:
    """Every reply, in order; stops after an immediate response, as the served stream does."""
    exchange = Exchange(processor)
    replies: list[ep.ProcessingResponse | None] = []
    for request in requests:
        replies.append(exchange.send(request))
        if exchange.finished:
            break
    return replies


def _common(reply: ep.ProcessingResponse) -> ep.CommonResponse | None:
    phase = reply.WhichOneof("response")
    if phase is None or phase == "immediate_response" or phase.endswith("_trailers"):
        return None
    common: ep.CommonResponse = getattr(reply, phase).response
    return common


def _mutation(reply: ep.ProcessingResponse) -> ep.HeaderMutation:
    phase = reply.WhichOneof("response")
    if phase is not None and phase.endswith("_trailers"):
        trailers: ep.HeaderMutation = getattr(reply, phase).header_mutation
        return trailers
    common = _common(reply)
    return common.header_mutation if common is not None else ep.HeaderMutation()


def set_headers(reply: ep.ProcessingResponse | None) -> dict[str, str]:
    """The headers a reply sets or appends, name to (last) value, from ``raw_value``."""
    if reply is None:
        return {}
    options = _mutation(reply).set_headers
    return {o.header.key: o.header.raw_value.decode("latin-1") for o in options}


def removed_headers(reply: ep.ProcessingResponse | None) -> list[str]:
    return [] if reply is None else list(_mutation(reply).remove_headers)


def body_of(reply: ep.ProcessingResponse | None) -> bytes | None:
    """The replacement body (b"" for clear_body), or None if the reply leaves it alone."""
    common = _common(reply) if reply is not None else None
    if common is None or not common.HasField("body_mutation"):
        return None
    mutation = common.body_mutation
    return b"" if mutation.clear_body else mutation.body
