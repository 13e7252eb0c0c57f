"""Conversions between the HTTP model and the ext_proc protobuf messages.

Header values travel in ``raw_value`` both ways, as Envoy 1.40 sends them; ``value`` is left
empty on what we send and never read on what we receive.

A message to the processor is built in place inside its ``ProcessingRequest``: a headers,
body or trailers message built apart would be copied whole into it, header map and body bytes
included.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.models import Header


def _fill(header_map: base_pb2.HeaderMap, headers: Iterable[Header]) -> None:
    add = header_map.headers.add
    for name, value in headers:
        add(key=name.decode("latin-1"), raw_value=value)


def headers_request(
    field: str, headers: Iterable[Header], end_of_stream: bool
) -> ep.ProcessingRequest:
    """A ProcessingRequest whose ``field`` (``request_headers``, ``response_headers``) holds
    ``headers``."""
    request = ep.ProcessingRequest()
    message = getattr(request, field)
    message.SetInParent()  # set even when the map is empty
    message.end_of_stream = end_of_stream
    _fill(message.headers, headers)
    return request


def body_request(field: str, data: bytes, end_of_stream: bool) -> ep.ProcessingRequest:
    """A ProcessingRequest whose ``field`` (``request_body``, ``response_body``) holds ``data``."""
    request = ep.ProcessingRequest()
    message = getattr(request, field)
    message.SetInParent()
    message.body = data
    message.end_of_stream = end_of_stream
    return request


def trailers_request(field: str, trailers: Iterable[Header]) -> ep.ProcessingRequest:
    """A ProcessingRequest whose ``field`` (``request_trailers``, ``response_trailers``) holds
    ``trailers``."""
    request = ep.ProcessingRequest()
    message = getattr(request, field)
    message.SetInParent()
    _fill(message.trailers, trailers)
    return request
