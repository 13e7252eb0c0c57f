"""Conversions between the HTTP model and the ext_proc protobuf messages.

Header values travel in ``raw_value`` both ways, as Envoy 1.40 sends them; ``value`` is left
empty on what we send and never read on what we receive.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.models import Header, Headers


def to_header_map(headers: Iterable[Header]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=name.decode("latin-1"), raw_value=value)
            for name, value in headers
        ]
    )


def from_header_map(header_map: base_pb2.HeaderMap) -> Headers:
    return Headers((hv.key.encode("latin-1"), hv.raw_value) for hv in header_map.headers)


def http_headers(headers: Iterable[Header], end_of_stream: bool) -> ep.HttpHeaders:
    return ep.HttpHeaders(headers=to_header_map(headers), end_of_stream=end_of_stream)


def http_body(data: bytes, end_of_stream: bool) -> ep.HttpBody:
    return ep.HttpBody(body=data, end_of_stream=end_of_stream)


def http_trailers(trailers: Iterable[Header]) -> ep.HttpTrailers:
    return ep.HttpTrailers(trailers=to_header_map(trailers))
