"""The Envoy harness itself: a GET through real Envoy reaches the upstream and the processor."""

from __future__ import annotations

import http.client
import http.server
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.support.envoy import EnvoyProxy, envoy_binary


class RecordingUpstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.seen: list[tuple[str, str]] = []


class _UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingUpstream

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.seen.append((self.command, self.path))
        body = b"hello from upstream"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature
        pass


class EchoProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers every message with an empty response of the matching kind."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def Process(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ProcessingResponse]:
        for request in request_iterator:
            kind = request.WhichOneof("request")
            self.seen.append(kind)
            # The ProcessingResponse oneof fields carry the same names as the request's.
            yield pb.ProcessingResponse(**{kind: {}})


def require_envoy() -> str:
    binary = envoy_binary()
    if binary is None:
        message = "no runnable Envoy 1.40 (set EXTPROC_ENVOY_BIN or run `make envoy`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def processor() -> Iterator[tuple[EchoProcessor, int]]:
    servicer = EchoProcessor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None).wait()


@pytest.mark.parity
def test_get_goes_through_envoy_and_processor(
    tmp_path: Path, upstream: RecordingUpstream, processor: tuple[EchoProcessor, int]
) -> None:
    require_envoy()
    servicer, processor_port = processor
    upstream_port = upstream.server_address[1]
    assert isinstance(upstream_port, int)
    with EnvoyProxy(
        upstream=("127.0.0.1", upstream_port),
        processor=("127.0.0.1", processor_port),
        workdir=tmp_path,
    ) as envoy:
        client = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
        try:
            client.request("GET", "/hello?x=1")
            response = client.getresponse()
            body = response.read()
        finally:
            client.close()
        stats = envoy.stats()

    assert (response.status, body) == (200, b"hello from upstream")
    assert upstream.seen == [("GET", "/hello?x=1")]
    assert servicer.seen == ["request_headers", "response_headers"]
    assert stats["http.ingress.ext_proc.streams_started"] == 1
