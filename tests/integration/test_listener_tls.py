"""TLS on the listener (--tls-cert/--tls-key, --tls-client-ca), with a real TLS client."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.demo.upstream import EchoUpstream
from extproc.io.server import ProxyServer
from tests.support.certs import CertAuthority, Issued
from tests.support.processor import ScriptedProcessor, header_value
from tests.support.proxy import running_proxy

pytestmark = pytest.mark.integration

# The start of a ClientHello: a handshake record announcing 512 bytes, of which few come.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


@dataclass
class Pki:
    ca: CertAuthority
    server: Issued
    client: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertAuthority(tmp_path / "ca")
    return Pki(ca, ca.issue("proxy"), ca.issue("client", client=True))


@contextmanager
def tls_proxy(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor, **overrides: Any
) -> Iterator[ProxyServer]:
    with running_proxy(
        upstream.address,
        processor.address,
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        **overrides,
    ) as proxy:
        yield proxy


def client_context(pki: Pki, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if with_cert:
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return context


def https(proxy: ProxyServer, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    host, port = proxy.address
    return http.client.HTTPSConnection("localhost", port, context=context, timeout=30)


def get(conn: http.client.HTTPSConnection, path: str = "/") -> tuple[int, dict[str, str]]:
    """Status and the request headers the upstream received."""
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    return response.status, dict(json.loads(body)["headers"]) if response.status == 200 else {}


def closed_by_peer(sock: socket.socket) -> bool:
    """The peer closed (an RST when our unread bytes were still in its buffer)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_https_client_served_with_x_forwarded_proto_https(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with tls_proxy(pki, upstream, processor) as proxy:
        conn = https(proxy, client_context(pki))
        try:
            status, headers = get(conn)
        finally:
            conn.close()
    assert status == 200
    assert headers["x-forwarded-proto"] == "https"
    [stream] = processor.wait_streams(1)
    assert header_value(stream.requests[0].request_headers.headers, ":scheme") == b"https"


def test_keep_alive_over_tls(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with tls_proxy(pki, upstream, processor) as proxy:
        conn = https(proxy, client_context(pki))
        try:
            statuses = [get(conn, f"/{i}")[0] for i in range(5)]
        finally:
            conn.close()
    assert statuses == [200] * 5
    assert proxy.stats.snapshot()["http.ingress.downstream_cx_total"] == 1


def test_a_request_head_in_pieces_over_tls(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    """A head that arrives after the handshake, and in two TLS records, waits for the rest
    (the worker's read finds no bytes, or half a head, and must not take that as an error)."""
    head = b"GET /pieces HTTP/1.1\r\nhost: localhost\r\n"
    with tls_proxy(pki, upstream, processor) as proxy:
        raw = socket.create_connection(proxy.address, timeout=30)
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
            # The pauses only make the split likely; the outcome must be 200 either way.
            time.sleep(0.3)
            tls.sendall(head)
            time.sleep(0.3)
            tls.sendall(b"\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = tls.recv(65536)
                assert chunk, f"closed after {reply!r}"
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")


def test_client_certificate_required_with_tls_client_ca(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with tls_proxy(pki, upstream, processor, tls_client_ca=str(pki.ca.cert)) as proxy:
        conn = https(proxy, client_context(pki, with_cert=True))
        try:
            assert get(conn)[0] == 200
        finally:
            conn.close()
        anonymous = https(proxy, client_context(pki))
        try:
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                get(anonymous)
        finally:
            anonymous.close()
    assert len(upstream.requests) == 1


def test_plain_http_to_a_tls_listener_is_dropped(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with (
        tls_proxy(pki, upstream, processor) as proxy,
        socket.create_connection(proxy.address, timeout=30) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert closed_by_peer(sock)
    assert upstream.requests == []


def test_a_stalled_handshake_does_not_stop_other_clients(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    """One worker waits on the stalled handshake; the acceptor and the others go on.

    The header-read timeout (which bounds the handshake) is longer than the good client's
    30 s socket timeout, so a stalled acceptor would fail this test rather than slow it."""
    slow = {"header_read_timeout": 120.0}
    with (
        tls_proxy(pki, upstream, processor, threads=2, **slow) as proxy,
        socket.create_connection(proxy.address, timeout=30) as stalled,
    ):
        stalled.sendall(PARTIAL_CLIENT_HELLO)
        conn = https(proxy, client_context(pki))
        try:
            statuses = [get(conn, f"/{i}")[0] for i in range(3)]
        finally:
            conn.close()
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # still waiting on its handshake, not dropped
            stalled.recv(1)
    assert statuses == [200] * 3


def test_a_stalled_handshake_is_dropped_at_the_header_read_timeout(
    pki: Pki, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with (
        tls_proxy(pki, upstream, processor, header_read_timeout=0.5) as proxy,
        socket.create_connection(proxy.address, timeout=30) as stalled,
    ):
        stalled.sendall(PARTIAL_CLIENT_HELLO)
        assert closed_by_peer(stalled)  # by the proxy, not by the 30 s socket timeout
    assert upstream.requests == []
