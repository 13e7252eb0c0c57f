"""The demo's example ext_proc processor.

It tags both directions with an ``x-extproc-demo`` header and answers requests whose path
starts with ``/blocked`` itself, with a 403, so the upstream never sees them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2


def _tag(value: bytes) -> ep.CommonResponse:
    header = base_pb2.HeaderValue(key="x-extproc-demo", raw_value=value)
    return ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(header=header)])
    )


def _path(headers: ep.HttpHeaders) -> bytes:
    return next((h.raw_value for h in headers.headers.headers if h.key == ":path"), b"")


class DemoProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def Process(  # noqa: N802 (the gRPC method name)
        self, request_iterator: Iterator[ep.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[ep.ProcessingResponse]:
        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                if _path(request.request_headers).startswith(b"/blocked"):
                    yield ep.ProcessingResponse(
                        immediate_response=ep.ImmediateResponse(
                            status=http_status_pb2.HttpStatus(code=403),
                            body=b"blocked by the demo processor\n",
                            details="demo_blocked",
                        )
                    )
                    return
                yield ep.ProcessingResponse(
                    request_headers=ep.HeadersResponse(response=_tag(b"request-seen"))
                )
            elif kind == "response_headers":
                yield ep.ProcessingResponse(
                    response_headers=ep.HeadersResponse(response=_tag(b"response-seen"))
                )


def serve(address: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    """Start the demo processor; returns the server and the port it bound."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ep_grpc.add_ExternalProcessorServicer_to_server(DemoProcessor(), server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port
