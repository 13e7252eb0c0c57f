"""The processor SDK over HTTP (Envoy's ext_proc ``http_service``): the same Processor classes as
over gRPC, served by ``wsgi_app`` under the SDK's threaded server, under gunicorn, and by
``extproc-processor --http``, each sent real POSTs of JSON ProcessingRequests as Envoy sends
them (snake_case proto3 JSON, ``x-request-id`` the stream id)."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from extproc.demo.upstream import EchoUpstream
from extproc.processor.http_server import serve_http
from extproc.processor.testing import request_headers, response_headers, set_headers
from tests.integration.test_processor_sdk import COMMAND, ENV, processor_command
from tests.support.gunicorn import running_gunicorn
from tests.support.http_processor import http_service
from tests.support.proxy import REPO, request, running_proxy

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0
AUTH = "examples.auth:AuthProcessor"
HEADERS = "examples.response_headers:ResponseHeadersProcessor"
FAILING = "tests.integration.test_processor_sdk:Failing"
TRANSPORTS = ["threaded", "gunicorn", "command"]


@contextmanager
def _threaded(target: str) -> Iterator[int]:
    with serve_http(target, "127.0.0.1:0", workers=4) as running:
        yield running.port


@contextmanager
def _gunicorn(target: str) -> Iterator[int]:
    with running_gunicorn({}, app=f'extproc.processor:wsgi_app("{target}")') as (_, port):
        yield port


@contextmanager
def _command(target: str) -> Iterator[int]:
    args = ("--http", "--listen", "127.0.0.1:0", "--workers", "4")
    with processor_command(target, *args) as (_, port, _):
        yield port


STARTERS = {"threaded": _threaded, "gunicorn": _gunicorn, "command": _command}


@dataclass
class Servers:
    """Each (transport, target) started once for the module, on first use."""

    stack: ExitStack
    ports: dict[tuple[str, str], int] = field(default_factory=dict)

    def port(self, transport: str, target: str) -> int:
        key = (transport, target)
        if key not in self.ports:
            started: AbstractContextManager[int] = STARTERS[transport](target)
            self.ports[key] = self.stack.enter_context(started)
        return self.ports[key]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with ExitStack() as stack:
        yield Servers(stack)


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def reply(self) -> ep.ProcessingResponse:
        assert self.status == 200 and self.content_type == "application/json", self
        return json_format.Parse(self.body, ep.ProcessingResponse())


def post(
    port: int,
    body: bytes,
    *,
    stream_id: str = "",
    chunked: bool = False,
    method: str = "POST",
) -> Answer:
    headers = {"host": "processor.local", "content-type": "application/json"}
    if stream_id:
        headers["x-request-id"] = stream_id
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        if chunked:
            # In two chunks, as a streaming client (Envoy) may send it.
            middle = len(body) // 2
            pieces = iter([body[:middle], body[middle:]])
            conn.request(method, "/process", pieces, headers, encode_chunked=True)
        else:
            conn.request(method, "/process", body if method == "POST" else None, headers)
        response = conn.getresponse()
        return Answer(response.status, response.getheader("content-type", ""), response.read())
    finally:
        conn.close()


def as_json(request: ep.ProcessingRequest) -> bytes:
    """The request as Envoy puts it on the wire: proto3 JSON with the proto's field names."""
    return json_format.MessageToJson(request, preserving_proto_field_name=True).encode()


def event(
    port: int, request: ep.ProcessingRequest, stream_id: str = "", *, chunked: bool = False
) -> ep.ProcessingResponse:
    return post(port, as_json(request), stream_id=stream_id, chunked=chunked).reply()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("chunked", [False, True])
def test_auth_example(servers: Servers, transport: str, chunked: bool) -> None:
    port = servers.port(transport, AUTH)
    denied = event(
        port, request_headers({":path": "/private"}, end_of_stream=True), "1", chunked=chunked
    )
    assert denied.immediate_response.status.code == 403
    assert denied.immediate_response.body == b"missing or invalid authorization\n"
    (www_authenticate,) = denied.immediate_response.headers.set_headers
    assert www_authenticate.header.key == "www-authenticate"
    assert www_authenticate.header.raw_value == b"Bearer"
    allowed = event(
        port,
        request_headers({":path": "/private", "authorization": "Bearer alice", "x-debug": "1"}),
        "2",
        chunked=chunked,
    )
    mutation = allowed.request_headers.response.header_mutation
    assert set_headers(allowed) == {"x-user": "alice", "x-auth": "checked", "via-processor": "auth"}
    assert list(mutation.remove_headers) == ["authorization", "x-debug"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ctx_carries_from_request_to_response_on_one_stream_id(
    servers: Servers, transport: str
) -> None:
    port = servers.port(transport, HEADERS)
    for stream_id, path in (("17", "/first"), ("18446744073709551615", "/second")):
        request_reply = event(port, request_headers({":path": path, ":method": "GET"}), stream_id)
        assert request_reply.WhichOneof("response") == "request_headers"
    # Interleaved, as concurrent requests are: each stream id keeps its own ctx.
    second = event(port, response_headers({":status": "200"}), "18446744073709551615")
    first = event(port, response_headers({":status": "200", "server": "x"}), "17")
    assert set_headers(first)["x-request-path"] == "/first"
    assert set_headers(second)["x-request-path"] == "/second"
    assert "server" in first.response_headers.response.header_mutation.remove_headers
    # Another stream id, or none, is another request: nothing carried.
    assert (
        set_headers(event(port, response_headers({":status": "200"}), "99"))["x-request-path"] == ""
    )
    assert set_headers(event(port, response_headers({":status": "200"})))["x-request-path"] == ""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_raising_hook_is_a_500_and_fails_only_its_event(servers: Servers, transport: str) -> None:
    port = servers.port(transport, FAILING)
    failed = post(port, as_json(request_headers({":path": "/fail"})), stream_id="5")
    assert failed.status == 500 and b"ValueError: boom for /fail" in failed.body
    assert event(port, request_headers({":path": "/ok"}), "6").HasField("request_headers")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", b"not a JSON ProcessingRequest"),
        (b'{"request_headers": 7}', b"not a JSON ProcessingRequest"),
        (b"{}", b"carries no phase"),
        (b'{"metadata_context": {}}', b"carries no phase"),
    ],
)
def test_what_is_not_a_processing_request_is_a_400(
    servers: Servers, transport: str, body: bytes, reason: bytes
) -> None:
    answer = post(servers.port(transport, AUTH), body, stream_id="3")
    assert answer.status == 400 and reason in answer.body


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_get_is_a_405(servers: Servers, transport: str) -> None:
    answer = post(servers.port(transport, AUTH), b"", method="GET")
    assert answer.status == 405 and answer.body == b"POST only\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_behind_the_proxy_with_http_service(
    servers: Servers, upstream: EchoUpstream, transport: str
) -> None:
    def ext_proc(target: str) -> dict[str, Any]:
        uri = f"http://127.0.0.1:{servers.port(transport, target)}/process"
        return {
            "http_service": http_service(uri),
            "processing_mode": {"response_header_mode": "SEND"},
        }

    with running_proxy(upstream.address, None, ext_proc=ext_proc(HEADERS)) as proxy:
        reply = request(proxy.address, "GET", "/through-the-proxy")
    assert reply.status == 200 and reply.header("x-request-path") == "/through-the-proxy"
    assert reply.header("x-frame-options") == "DENY"
    with running_proxy(upstream.address, None, ext_proc=ext_proc(AUTH)) as proxy:
        denied = request(proxy.address, "GET", "/private")
        allowed = request(
            proxy.address, "GET", "/private", headers=[("authorization", "Bearer bo")]
        )
    assert denied.status == 403 and denied.header("www-authenticate") == "Bearer"
    assert allowed.status == 200
    assert upstream.requests[-1].header("x-user") == "bo"


def test_camel_case_names_are_read_too(servers: Servers) -> None:
    # proto3 JSON parsers accept both spellings; what a hand-written client may send.
    body = b'{"requestHeaders": {"headers": {"headers": [{"key": ":path", "rawValue": "L3g="}]}}}'
    reply = post(servers.port("threaded", HEADERS), body, stream_id="c1").reply()
    assert reply.HasField("request_headers")
    second = event(servers.port("threaded", HEADERS), response_headers({":status": "200"}), "c1")
    assert set_headers(second)["x-request-path"] == "/x"


def test_command_stops_on_sigterm() -> None:
    with processor_command(HEADERS, "--http", "--listen", "127.0.0.1:0") as (proc, port, lines):
        assert event(port, request_headers({":path": "/"})).HasField("request_headers")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
    assert "over HTTP on port" in "".join(lines)


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV
    )


def test_command_refuses_api_with_http() -> None:
    out = run_command(AUTH, "--http", "--api", "v3", "--listen", "127.0.0.1:0")
    assert out.returncode == 2 and "does not apply to --http" in out.stderr


def test_command_exits_3_when_the_port_is_taken() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = run_command(AUTH, "--http", "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 3 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
