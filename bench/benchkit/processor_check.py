"""Check a no-op processor before trusting it in a benchmark: one stream, every kind of
message, each answered with the empty response of the same kind.

The messages are real ProcessingRequests (the xds-protos classes), each preceded on the wire
by the fields a processor must skip (metadata_context, attributes, observability_mode,
protocol_config): the C++ processor reads the raw bytes, and the 64 KiB body crosses several
slices there. Concatenated encodings merge into one message, so the prefix is legitimate.
"""

from __future__ import annotations

from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from benchkit.floor_stream import METHOD

_HEADERS = ep.HttpHeaders(
    headers=base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":method", raw_value=b"GET"),
            base_pb2.HeaderValue(key=":path", raw_value=b"/"),
        ]
    ),
    end_of_stream=False,
)
# Each kind of message and what it carries; its reply is set in the field of the same name.
KINDS = {
    "request_headers": _HEADERS,
    "response_headers": _HEADERS,
    "request_body": ep.HttpBody(body=b"x" * 65536, end_of_stream=False),
    "response_body": ep.HttpBody(body=b"y" * 100, end_of_stream=True),
    "request_trailers": ep.HttpTrailers(),
    "response_trailers": ep.HttpTrailers(),
}


def _prefix() -> bytes:
    context = base_pb2.Metadata()
    context.filter_metadata["bench"].update({"a": 1})
    attributes = {"envoy.filters.http.ext_proc": struct_pb2.Struct()}
    prefix: bytes = ep.ProcessingRequest(
        metadata_context=context,
        attributes=attributes,
        observability_mode=True,
        protocol_config=ep.ProtocolConfiguration(request_body_mode=1),
    ).SerializeToString()
    return prefix


def requests() -> list[bytes]:
    prefix = _prefix()
    return [
        prefix + ep.ProcessingRequest(**{kind: message}).SerializeToString()
        for kind, message in KINDS.items()
    ]


def check_processor(port: int, timeout: float = 10.0) -> None:
    """Raise RuntimeError unless the processor on ``port`` answers every kind correctly and
    ends the stream with OK."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        process: Any = channel.stream_stream(
            METHOD.decode(),
            request_serializer=None,
            response_deserializer=ep.ProcessingResponse.FromString,
        )
        try:
            replies = list(process(iter(requests()), timeout=timeout))
        except grpc.RpcError as err:
            raise RuntimeError(f"processor on port {port}: {err}") from err
    got = [reply.WhichOneof("response") for reply in replies]
    # An empty reply is two bytes: the field's key and a zero length.
    if got != list(KINDS) or any(reply.ByteSize() != 2 for reply in replies):
        raise RuntimeError(f"processor on port {port} answered {replies}, not {list(KINDS)}")
