"""The proxy as an HTTP/1.1 intermediary, over real sockets (processor answering CONTINUE)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from extproc.demo.upstream import EchoUpstream
from extproc.io.server import ProxyServer
from tests.support.processor import ScriptedProcessor
from tests.support.proxy import Client, raw_exchange, request, running_proxy, status_of
from tests.support.rawpeer import ScriptedUpstream

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(upstream: EchoUpstream, processor: ScriptedProcessor) -> Iterator[ProxyServer]:
    with running_proxy(upstream.address, processor.address) as server:
        yield server


def test_get_passes_through_with_forwarding_headers(
    proxy: ProxyServer, upstream: EchoUpstream
) -> None:
    reply = request(proxy.address, "GET", "/p?q=1", headers=[("x-foo", "a"), ("x-foo", "b")])
    assert reply.status == 200
    seen = upstream.requests[0]
    assert (seen.method, seen.target) == ("GET", "/p?q=1")
    assert [n for n, _ in seen.headers] == [
        "host",
        "x-foo",
        "x-foo",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
    ]
    assert seen.header("host") == "example.com"
    assert seen.header("x-forwarded-for") == "127.0.0.1"


def test_post_with_length_body(proxy: ProxyServer, upstream: EchoUpstream) -> None:
    reply = request(proxy.address, "POST", "/post", body=b"hello")
    assert reply.status == 200
    assert upstream.requests[0].body == b"hello"
    assert upstream.requests[0].header("content-length") == "5"


def test_chunked_request_body_and_trailers_pass_through(
    proxy: ProxyServer, upstream: EchoUpstream
) -> None:
    reply = request(
        proxy.address, "POST", "/c", body=[b"ab", b"cd", b"ef"], trailers=[("x-checksum", "42")]
    )
    assert reply.status == 200
    seen = upstream.requests[0]
    assert seen.body == b"abcdef"
    assert seen.trailers == [("x-checksum", "42")]
    assert seen.header("transfer-encoding") == "chunked"


def test_chunked_response_and_trailers_pass_through(proxy: ProxyServer) -> None:
    reply = request(proxy.address, "GET", "/r?chunked=1")
    assert reply.status == 200
    assert reply.header("transfer-encoding") == "chunked"
    assert reply.trailers == [("x-echo-trailer", "done")]
    assert b'"target": "/r?chunked=1"' in reply.body


def test_keep_alive_reuses_both_connections(proxy: ProxyServer, upstream: EchoUpstream) -> None:
    with Client(proxy.address) as client:
        replies = [client.request("GET", f"/{i}") for i in range(3)]
    assert [r.status for r in replies] == [200, 200, 200]
    assert {r.connection for r in upstream.requests} == {1}


def test_pipelined_requests_are_answered_in_order(proxy: ProxyServer) -> None:
    raw = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3))
    raw += b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    data = raw_exchange(proxy.address, raw)
    assert data.count(b"HTTP/1.1 200 OK") == 4
    targets = [b'"/0"', b'"/1"', b'"/2"', b'"/last"']
    positions = [data.index(b'"target": ' + t) for t in targets]
    assert positions == sorted(positions)


def test_head_204_and_304_have_no_body(proxy: ProxyServer) -> None:
    with Client(proxy.address) as client:
        head = client.request("HEAD", "/h")
        assert head.status == 200 and head.body == b"" and int(head.header("content-length") or 0)
        assert client.request("GET", "/n?status=204").status == 204
        not_modified = client.request("GET", "/n?status=304")
        assert not_modified.status == 304 and not_modified.body == b""
        assert client.request("GET", "/after").status == 200


def test_expect_100_continue_is_answered_by_the_proxy(
    proxy: ProxyServer, upstream: EchoUpstream
) -> None:
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(
            b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"abc")
        rest = first.split(b"\r\n\r\n", 1)[1]
        while b"\r\n\r\n" not in rest:
            rest += sock.recv(4096)
    assert rest.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].body == b"abc"
    assert upstream.requests[0].header("expect") is None


def test_hop_by_hop_headers_are_not_forwarded(proxy: ProxyServer, upstream: EchoUpstream) -> None:
    reply = request(
        proxy.address,
        "GET",
        "/",
        headers=[
            ("connection", "x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-end", "1"),
        ],
    )
    assert reply.status == 200
    names = [n for n, _ in upstream.requests[0].headers]
    assert not {"connection", "x-private", "keep-alive", "proxy-connection"} & set(names)
    assert "te" in names and "x-end" in names


def test_connection_close_is_honoured(proxy: ProxyServer) -> None:
    data = raw_exchange(proxy.address, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(data) == 200
    assert b"connection: close" in data.lower()


def test_http10_client_gets_a_close_delimited_response(proxy: ProxyServer) -> None:
    data = raw_exchange(proxy.address, b"GET /old?chunked=1 HTTP/1.0\r\nHost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in data.lower()
    assert data.endswith(b"}\n")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400),
        (b"NOT A REQUEST\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n", 431),
    ],
    ids=["double-length", "no-colon", "garbage", "no-host", "head-too-large"],
)
def test_malformed_requests_get_4xx_and_close(
    proxy: ProxyServer, upstream: EchoUpstream, raw: bytes, status: int
) -> None:
    data = raw_exchange(proxy.address, raw)
    assert status_of(data) == status
    assert b"connection: close" in data
    assert upstream.requests == []


def test_slow_request_head_gets_408(upstream: EchoUpstream, processor: ScriptedProcessor) -> None:

    with running_proxy(upstream.address, processor.address, header_read_timeout=0.3) as proxy:
        data = raw_exchange(proxy.address, b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert status_of(data) == 408


def test_unreachable_upstream_is_503(processor: ScriptedProcessor) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with running_proxy(("127.0.0.1", port), processor.address) as proxy:
            reply = request(proxy.address, "GET", "/")
            assert proxy.wait_idle(10)
            assert proxy.stats.snapshot()["cluster.upstream.upstream_cx_connect_fail"] == 1
    assert reply.status == 503
    assert reply.body == (
        b"upstream connect error or disconnect/reset before headers."
        b" reset reason: remote connection failure"
    )
    # The proxy's own 503 goes through the response phase, as Envoy's router replies do.
    kinds = [r.WhichOneof("request") for r in processor.wait_streams(1)[0].requests]
    assert kinds == ["request_headers", "response_headers"]


def test_request_retried_when_a_kept_alive_upstream_connection_was_closed(
    processor: ScriptedProcessor,
) -> None:
    """The upstream answers once, then closes the connection on the next request unanswered."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: list[int] = []

    def serve() -> None:
        first, _ = listener.accept()
        accepted.append(1)
        with first:
            first.recv(65536)
            first.sendall(ok)
            first.recv(65536)  # the second request on this connection: dropped unanswered
        second, _ = listener.accept()
        accepted.append(2)
        with second:
            second.recv(65536)
            second.sendall(ok)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with running_proxy(listener.getsockname(), processor.address) as proxy:
            assert request(proxy.address, "GET", "/1").status == 200
            assert request(proxy.address, "GET", "/2").status == 200
    finally:
        thread.join(10)
        listener.close()
    assert accepted == [1, 2]


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:

    with (
        running_proxy(upstream.address, processor.address, idle_timeout=0.3) as proxy,
        Client(proxy.address) as client,
    ):
        assert client.request("GET", "/").status == 200
        # The proxy closes the idle connection: recv sees EOF well before the socket timeout.
        assert client.sock.recv(1) == b""


def test_silent_new_connection_is_dropped_without_holding_a_worker(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:

    with (
        running_proxy(
            upstream.address, processor.address, threads=1, header_read_timeout=0.5
        ) as proxy,
        socket.create_connection(proxy.address, timeout=10) as silent,
    ):
        # The only worker thread is free for others while this client says nothing.
        assert request(proxy.address, "GET", "/").status == 200
        assert silent.recv(1) == b""


def test_upstream_1xx_responses_are_not_forwarded(processor: ScriptedProcessor) -> None:
    upstream = ScriptedUpstream(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    try:
        with running_proxy(upstream.address, processor.address) as proxy:
            data = raw_exchange(
                proxy.address, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
    finally:
        upstream.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"103" not in data and b"link" not in data.lower()
    assert data.endswith(b"ok")
