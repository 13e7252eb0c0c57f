"""The processor SDK behind a real extproc proxy: each example served by ``serve`` on loopback,
an EchoUpstream behind, and what the client and the upstream saw."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from examples.auth import AuthProcessor
from examples.json_only import JsonOnlyProcessor
from examples.json_rewrite import JsonRewriteProcessor
from examples.redact import RedactProcessor
from examples.response_headers import SECURITY_HEADERS, ResponseHeadersProcessor
from extproc.apis import service_name
from extproc.demo.upstream import EchoUpstream
from extproc.processor import Body, Decision, Headers, Processor, StreamContext
from extproc.processor.service import RunningServer, serve
from extproc.processor.testing import request_headers
from tests.support.proxy import REPO, Client, request, running_proxy

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"
REDACTED = "XXXX XXXX XXXX XXXX"
RPC_TIMEOUT_S = 10.0


@contextmanager
def served(processor: Any) -> Iterator[str]:
    running = serve(processor, "127.0.0.1:0", workers=4)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(grace=1.0)


def echoed(body: bytes) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(body)
    return document


def test_auth_denies_without_a_token(upstream: EchoUpstream) -> None:
    with served(AuthProcessor) as target, running_proxy(upstream.address, target) as proxy:
        reply = request(proxy.address, "GET", "/private")
    assert reply.status == 403 and reply.body == b"missing or invalid authorization\n"
    assert reply.header("www-authenticate") == "Bearer"
    assert upstream.requests == []


def test_auth_rewrites_the_request_headers(upstream: EchoUpstream) -> None:
    headers = [("authorization", "Bearer alice"), ("x-debug", "1")]
    with served(AuthProcessor) as target, running_proxy(upstream.address, target) as proxy:
        reply = request(proxy.address, "GET", "/private", headers=headers)
    assert reply.status == 200
    (seen,) = upstream.requests
    names = [name for name, _ in seen.headers]
    assert seen.header("x-user") == "alice" and seen.header("via-processor") == "auth"
    assert "authorization" not in names and "x-debug" not in names


@pytest.mark.parametrize("mode", ["buffered", "streamed"])
def test_redact_request_bodies(upstream: EchoUpstream, mode: str) -> None:
    # Chunked in pieces that split the card number, so STREAMED must carry the tail over.
    pieces = [b"card 4111 11", b"11 1111 ", b"1111 end"]
    with (
        served(RedactProcessor) as target,
        running_proxy(upstream.address, target, request_body_mode=mode) as proxy,
        Client(proxy.address) as client,
    ):
        reply = client.request("POST", "/", body=pieces)
    assert reply.status == 200
    assert upstream.requests[0].body == f"card {REDACTED} end".encode()


def test_redact_response_body_buffered(upstream: EchoUpstream) -> None:
    body = f"pay with {CARD}".encode()
    with (
        served(RedactProcessor) as target,
        running_proxy(upstream.address, target, response_body_mode="buffered") as proxy,
    ):
        reply = request(proxy.address, "POST", "/", body=body)
    assert upstream.requests[0].body == body
    assert echoed(reply.body)["body"] == f"pay with {REDACTED}"


def test_json_rewrite_buffered(upstream: EchoUpstream) -> None:
    headers = [("content-type", "application/json")]
    with (
        served(JsonRewriteProcessor) as target,
        running_proxy(upstream.address, target, request_body_mode="buffered") as proxy,
    ):
        reply = request(proxy.address, "POST", "/", headers=headers, body=b'{"a": 1}')
    assert reply.status == 200
    (seen,) = upstream.requests
    assert json.loads(seen.body) == {"a": 1, "processed_by": "extproc"}
    assert seen.header("content-length") == str(len(seen.body))


def test_response_header_injection(upstream: EchoUpstream) -> None:
    with (
        served(ResponseHeadersProcessor) as target,
        running_proxy(upstream.address, target) as proxy,
    ):
        reply = request(proxy.address, "GET", "/page?x=1")
    for name, value in SECURITY_HEADERS.items():
        assert reply.header(name) == value
    assert reply.header("x-request-path") == "/page?x=1"


def test_mode_override_asks_for_json_bodies(upstream: EchoUpstream) -> None:
    bodies: list[int] = []

    class Counting(JsonOnlyProcessor):
        def on_response_body(self, ctx: StreamContext, body: Body) -> Decision:
            bodies.append(len(body.data))
            return super().on_response_body(ctx, body)

    ext_proc = {"allow_mode_override": True}
    with (
        served(Counting) as target,
        running_proxy(upstream.address, target, ext_proc=ext_proc) as proxy,
    ):
        reply = request(proxy.address, "GET", "/json")
    assert echoed(reply.body)["inspected"] is True and len(bodies) == 1
    assert reply.header("content-length") == str(len(reply.body))


class Failing(Processor):
    """Raises on /fail, tags everything else: one bad stream must not hurt the next."""

    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> Any:
        if ctx.path.startswith("/fail"):
            raise ValueError("boom for /fail")
        return None


@pytest.mark.parametrize(("allow", "status"), [(False, 500), (True, 200)])
def test_raising_hook_fails_only_its_request(
    upstream: EchoUpstream, allow: bool, status: int
) -> None:
    with (
        served(Failing) as target,
        running_proxy(upstream.address, target, failure_mode_allow=allow) as proxy,
    ):
        assert request(proxy.address, "GET", "/fail").status == status
        assert request(proxy.address, "GET", "/ok").status == 200


def test_raising_hook_is_an_internal_grpc_error() -> None:
    with served(Failing) as target, grpc.insecure_channel(target) as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)
        fail = request_headers({":path": "/fail"})
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Process(iter([fail]), timeout=RPC_TIMEOUT_S))
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "ValueError: boom for /fail" in error.details()
        replies = list(stub.Process(iter([request_headers({":path": "/ok"})]), timeout=10))
        assert [r.WhichOneof("response") for r in replies] == ["request_headers"]


def test_health_reports_serving() -> None:
    running: RunningServer = serve(AuthProcessor, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            # Any: the health stubs' typing does not declare the generated methods.
            stub: Any = health_pb2_grpc.HealthStub(channel)
            for service in ("", service_name("v3"), service_name("v3alpha")):
                answer = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=1.0)
    assert running.wait(timeout=RPC_TIMEOUT_S)


# The extproc-processor command ---------------------------------------------------------------

COMMAND = [sys.executable, "-m", "extproc.processor.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _watch(stream: IO[str], lines: list[str], ready: threading.Event) -> None:
    for line in stream:
        lines.append(line)
        if "serving" in line:
            ready.set()


@contextmanager
def processor_command(*args: str) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    proc = subprocess.Popen([*COMMAND, *args], cwd=REPO, stderr=subprocess.PIPE, text=True, env=ENV)
    lines: list[str] = []
    ready = threading.Event()
    assert proc.stderr is not None
    reader = threading.Thread(target=_watch, args=(proc.stderr, lines, ready), daemon=True)
    reader.start()
    try:
        assert ready.wait(30), "".join(lines)
        match = re.search(r"on port (\d+)", "".join(lines))
        assert match is not None
        yield proc, int(match.group(1)), lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(10)
        proc.stderr.close()


def test_command_serves_an_example(upstream: EchoUpstream) -> None:
    target = "examples.response_headers:ResponseHeadersProcessor"
    with processor_command(target, "--listen", "127.0.0.1:0", "--workers", "2") as (proc, port, _):
        with running_proxy(upstream.address, f"127.0.0.1:{port}") as proxy:
            reply = request(proxy.address, "GET", "/via-command")
        assert reply.header("x-request-path") == "/via-command"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("examples.nope:X", "cannot import 'examples.nope'"),
        ("examples.auth:Missing", "examples.auth:Missing not found"),
        ("examples.response_headers:SECURITY_HEADERS", "is not a Processor subclass"),
        ("no_colon", "expected module:Class"),
    ],
)
def test_command_refuses_what_is_not_a_processor(target: str, message: str) -> None:
    out = subprocess.run(
        [*COMMAND, target, "--listen", "127.0.0.1:0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert out.returncode == 2 and message in out.stderr
