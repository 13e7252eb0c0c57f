"""ext_proc headers processing over real sockets and a real gRPC processor."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import h11
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream
from extproc.io import driver
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    header_items,
    immediate,
    immediate_on,
    matching_reply,
    mutate_headers,
    mutating,
)
from tests.support.proxy import TIMEOUT, Client, Reply, request, running_proxy

pytestmark = pytest.mark.integration


def test_processor_sees_both_phases_as_envoy_sends_them(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with running_proxy(upstream.address, processor.address, xff=False) as proxy:
        reply = request(proxy.address, "GET", "/p?q=1", headers=[("x-foo", "a")])
    assert reply.status == 200
    (stream,) = processor.wait_streams(1)
    first, second = stream.requests
    assert first.HasField("protocol_config") and first.HasField("metadata_context")
    assert first.request_headers.end_of_stream
    items = header_items(first.request_headers)
    assert [k for k, _ in items] == [
        ":authority",
        ":path",
        ":method",
        ":scheme",
        "x-foo",
        "x-forwarded-proto",
        "x-request-id",
    ]
    assert items[:4] == [
        (":authority", b"example.com"),
        (":path", b"/p?q=1"),
        (":method", b"GET"),
        (":scheme", b"http"),
    ]
    assert all(h.value == "" for h in first.request_headers.headers.headers)
    assert not second.HasField("protocol_config")
    assert header_items(second.response_headers)[0] == (":status", b"200")
    assert not second.response_headers.end_of_stream


def test_post_request_headers_are_not_end_of_stream(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with running_proxy(upstream.address, processor.address) as proxy:
        request(proxy.address, "POST", "/", body=b"abc")
    assert not processor.wait_streams(1)[0].requests[0].request_headers.end_of_stream


def test_request_header_mutations_reach_the_upstream(upstream: EchoUpstream) -> None:
    common = mutate_headers(
        set_headers=[("x-set", "1"), (":path", "/new?x=1")],
        append_headers=[("x-foo", "c"), ("x-new", "n")],
        remove=["x-gone"],
    )
    with (
        ScriptedProcessor(mutating("request_headers", common)) as proc,
        running_proxy(upstream.address, proc.address, xff=False) as proxy,
    ):
        reply = request(
            proxy.address, "GET", "/old", headers=[("x-foo", "a"), ("x-gone", "1"), ("x-foo", "b")]
        )
    assert reply.status == 200
    seen = upstream.requests[0]
    assert seen.target == "/new?x=1"
    assert [(n, v) for n, v in seen.headers if n != "x-request-id"] == [
        ("host", "example.com"),
        ("x-foo", "a"),
        ("x-foo", "b"),
        ("x-forwarded-proto", "http"),
        ("x-set", "1"),
        ("x-foo", "c"),
        ("x-new", "n"),
    ]


def test_rejected_mutations_are_skipped_and_the_request_continues(upstream: EchoUpstream) -> None:
    common = mutate_headers(
        set_headers=[("x-envoy-foo", "1"), ("host", "evil.example"), (":method", "DELETE")],
        remove=[":path"],
    )
    with (
        ScriptedProcessor(mutating("request_headers", common)) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        reply = request(proxy.address, "GET", "/keep")
    assert reply.status == 200
    seen = upstream.requests[0]
    assert (seen.method, seen.target, seen.header("host")) == ("GET", "/keep", "example.com")
    assert seen.header("x-envoy-foo") is None


def test_authority_change_with_allow_all_routing_sets_host(upstream: EchoUpstream) -> None:
    common = mutate_headers(set_headers=[(":authority", "other.example")])
    with (
        ScriptedProcessor(mutating("request_headers", common)) as proc,
        running_proxy(
            upstream.address,
            proc.address,
            ext_proc={"mutation_rules": {"allow_all_routing": True}},
        ) as proxy,
    ):
        request(proxy.address, "GET", "/")
    assert upstream.requests[0].header("host") == "other.example"


def test_invalid_mutation_fails_with_500(upstream: EchoUpstream) -> None:
    common = mutate_headers(set_headers=[("x-bad", "a\r\nx-injected: 1")])
    with (
        ScriptedProcessor(mutating("request_headers", common)) as proc,
        running_proxy(upstream.address, proc.address, failure_mode_allow=True) as proxy,
    ):
        reply = request(proxy.address, "GET", "/")
    assert reply.status == 500
    assert upstream.requests == []


def test_response_header_mutations_reach_the_client(upstream: EchoUpstream) -> None:
    common = mutate_headers(
        set_headers=[(":status", "201"), ("x-resp", "1")], remove=["x-echo-connection"]
    )
    with (
        ScriptedProcessor(mutating("response_headers", common)) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        reply = request(proxy.address, "GET", "/")
    assert reply.status == 201
    assert reply.header("x-resp") == "1"
    assert reply.header("x-echo-connection") is None


def test_immediate_response_on_request_headers_skips_the_upstream(upstream: EchoUpstream) -> None:
    response = immediate(403, b"denied", headers=[("x-a", "1")], details="x y")
    with (
        ScriptedProcessor(immediate_on("request_headers", response)) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
        Client(proxy.address) as client,
    ):
        reply = client.request("GET", "/")
        assert client.request("GET", "/again").status == 403  # the connection is still usable
    assert (reply.status, reply.body) == (403, b"denied")
    assert reply.headers == [("x-a", "1"), ("content-length", "6"), ("content-type", "text/plain")]
    assert upstream.requests == []
    kinds = [r.WhichOneof("request") for r in proc.wait_streams(1)[0].requests]
    assert kinds == ["request_headers"]  # ext_proc's own replies are not sent back to it


def test_immediate_response_on_response_headers_replaces_the_upstreams(
    upstream: EchoUpstream,
) -> None:
    response = immediate(401, b"no", details="auth")
    with (
        ScriptedProcessor(immediate_on("response_headers", response)) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
        Client(proxy.address) as client,
    ):
        reply = client.request("GET", "/")
        assert client.request("GET", "/2").status == 401
    assert (reply.status, reply.body) == (401, b"no")
    assert len(upstream.requests) == 2


def test_immediate_response_to_head_has_no_body(upstream: EchoUpstream) -> None:
    response = immediate(403, b"denied")
    with (
        ScriptedProcessor(immediate_on("request_headers", response)) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        reply = request(proxy.address, "HEAD", "/")
    assert (reply.status, reply.body, reply.header("content-length")) == (403, b"", "6")


def test_immediate_response_drains_the_body_sent_and_keeps_the_connection(
    upstream: EchoUpstream,
) -> None:
    with (
        ScriptedProcessor(immediate_on("request_headers", immediate(413))) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
        Client(proxy.address) as client,
    ):
        first = client.request("POST", "/", body=b"x" * 1000)
        second = client.request("POST", "/", body=b"y" * 1000)
    assert (first.status, first.header("connection")) == (413, None)
    assert (second.status, second.header("connection")) == (413, None)


def _answered_early(address: tuple[str, int], head: bytes, send_rest: Any) -> tuple[Reply, bool]:
    """Send ``head``, then call ``send_rest(sock, stop)`` on another thread while the reply is
    read; the reply and whether the proxy ended the connection after it."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(head)
        stop = threading.Event()
        sender = threading.Thread(target=send_rest, args=(sock, stop), daemon=True)
        sender.start()
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        response, body = None, bytearray()
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
        try:
            ended = not sock.recv(65536)
        except ConnectionResetError:
            ended = True
        stop.set()
        sender.join(TIMEOUT)
    assert response is not None
    headers = [(n.decode(), v.decode()) for n, v in response.headers]
    return Reply(response.status_code, headers, bytes(body), []), ended


def _quietly(send: Any) -> Any:
    def sender(sock: socket.socket, stop: threading.Event) -> None:
        with contextlib.suppress(OSError):
            send(sock, stop)

    return sender


def test_the_drain_after_a_local_reply_is_bounded_in_bytes(upstream: EchoUpstream) -> None:
    """Past _DRAIN_BYTES the rest of the request is not read: the reply closes the connection
    (Envoy reads on for as long as the reply takes to make, however much comes)."""
    size = 3 * driver._DRAIN_BYTES
    head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % size
    with (
        ScriptedProcessor(immediate_on("request_headers", immediate(302))) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        reply, ended = _answered_early(
            proxy.address, head, _quietly(lambda sock, stop: sock.sendall(b"x" * size))
        )
    assert (reply.status, reply.header("connection"), ended) == (302, "close", True)


def test_the_drain_after_a_local_reply_is_bounded_in_time(upstream: EchoUpstream) -> None:
    """A client that trickles the rest holds the worker for _DRAIN_TIME at most, not for the
    client timeout; one that sends nothing more delays its reply by _DRAIN_GAP at most."""

    def trickle(sock: socket.socket, stop: threading.Event) -> None:
        while not stop.wait(driver._DRAIN_GAP / 5):
            sock.sendall(b"x")

    head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n"
    client_timeout = 120.0
    with (
        ScriptedProcessor(immediate_on("request_headers", immediate(302))) as proc,
        running_proxy(upstream.address, proc.address, client_timeout=client_timeout) as proxy,
    ):
        for send_rest in (_quietly(trickle), _quietly(lambda sock, stop: None)):
            started = time.monotonic()
            reply, ended = _answered_early(proxy.address, head, send_rest)
            took = time.monotonic() - started
            assert (reply.status, reply.header("connection"), ended) == (302, "close", True)
            assert took < client_timeout / 4


@pytest.mark.parametrize(
    ("flags", "kinds"),
    [
        ({"request_header_mode": "skip"}, ["response_headers"]),
        ({"response_header_mode": "skip"}, ["request_headers"]),
    ],
    ids=["skip-request", "skip-response"],
)
def test_skip_modes(
    upstream: EchoUpstream, processor: ScriptedProcessor, flags: dict[str, Any], kinds: list[str]
) -> None:
    with running_proxy(upstream.address, processor.address, **flags) as proxy:
        assert request(proxy.address, "GET", "/").status == 200
    (stream,) = processor.wait_streams(1)
    assert [r.WhichOneof("request") for r in stream.requests] == kinds
    assert stream.requests[0].HasField("protocol_config")


def test_skip_both_opens_no_stream(upstream: EchoUpstream, processor: ScriptedProcessor) -> None:
    with running_proxy(
        upstream.address, processor.address, request_header_mode="skip", response_header_mode="skip"
    ) as proxy:
        assert request(proxy.address, "GET", "/").status == 200
    assert processor.streams == []


def test_one_stream_per_request_closed_at_the_end(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with (
        running_proxy(upstream.address, processor.address) as proxy,
        Client(proxy.address) as client,
    ):
        for i in range(3):
            assert client.request("GET", f"/{i}").status == 200
    streams = processor.wait_streams(3)
    assert len(streams) == 3
    assert all(s.end_reason in ("cancelled", "half_closed") for s in streams)


def abort_on_request_headers(stream: ProcessorStream) -> None:
    stream.recv()
    stream.abort(grpc.StatusCode.INTERNAL, "boom")


@pytest.mark.parametrize(
    ("allow", "status", "reaches_upstream"),
    [(False, 500, False), (True, 200, True)],
    ids=["closed", "open"],
)
def test_processor_error(
    upstream: EchoUpstream, allow: bool, status: int, reaches_upstream: bool
) -> None:
    with (
        ScriptedProcessor(abort_on_request_headers) as proc,
        running_proxy(upstream.address, proc.address, failure_mode_allow=allow) as proxy,
    ):
        reply = request(proxy.address, "GET", "/")
    assert reply.status == status
    assert bool(upstream.requests) is reaches_upstream


def test_status_on_error(upstream: EchoUpstream) -> None:
    with (
        ScriptedProcessor(abort_on_request_headers) as proc,
        running_proxy(upstream.address, proc.address, status_on_error=503) as proxy,
    ):
        assert request(proxy.address, "GET", "/").status == 503


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(("allow", "status"), [(False, 500), (True, 200)], ids=["closed", "open"])
def test_unreachable_processor(
    upstream: EchoUpstream, closed_port: int, allow: bool, status: int
) -> None:
    with running_proxy(
        upstream.address, f"127.0.0.1:{closed_port}", failure_mode_allow=allow, message_timeout="5s"
    ) as proxy:
        reply = request(proxy.address, "GET", "/")
    assert reply.status == status
    assert reply.body == (b"" if status == 500 else reply.body)


@pytest.mark.parametrize(("allow", "status"), [(False, 504), (True, 200)], ids=["closed", "open"])
@pytest.mark.parametrize("phase", ["request_headers", "response_headers"])
def test_message_timeout(upstream: EchoUpstream, allow: bool, status: int, phase: str) -> None:
    release = threading.Event()

    def stall(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == phase:
                release.wait(30)
                return
            stream.send(matching_reply(message))

    with (
        ScriptedProcessor(stall) as proc,
        running_proxy(
            upstream.address, proc.address, failure_mode_allow=allow, message_timeout="200ms"
        ) as proxy,
    ):
        try:
            reply = request(proxy.address, "GET", "/")
        finally:
            release.set()
    assert reply.status == status
    if status == 504:
        assert reply.body == b""


def test_spurious_reply_fails_closed(upstream: EchoUpstream) -> None:
    def wrong(stream: ProcessorStream) -> None:
        stream.recv()
        stream.send(ep.ProcessingResponse(response_headers=ep.HeadersResponse()))
        stream.recv()

    with ScriptedProcessor(wrong) as proc, running_proxy(upstream.address, proc.address) as proxy:
        assert request(proxy.address, "GET", "/").status == 500
    assert upstream.requests == []


def test_ok_close_without_answer_continues_unprocessed(upstream: EchoUpstream) -> None:
    def close_early(stream: ProcessorStream) -> None:
        stream.recv()

    with (
        ScriptedProcessor(close_early) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        reply = request(proxy.address, "GET", "/")
    assert reply.status == 200 and len(upstream.requests) == 1
    assert len(proc.wait_streams(1)[0].requests) == 1  # nothing more sent after the close


def test_initial_metadata_and_authority_reach_the_processor(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    ext_proc = {
        "grpc_service": {
            "envoy_grpc": {"cluster_name": "proc"},
            "initial_metadata": [{"key": "x-tenant", "value": "t1"}],
        }
    }
    with running_proxy(
        upstream.address, None, ext_proc=ext_proc, cluster={"proc": processor.address}
    ) as proxy:
        assert request(proxy.address, "GET", "/").status == 200
    assert processor.wait_streams(1)[0].metadata.get("x-tenant") == "t1"
