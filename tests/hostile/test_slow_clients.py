"""Slow clients and connection floods against a live proxy with two worker threads.

A head trickled byte by byte waits in the acceptor's selector, not on a worker, and is cut off
with 408 at ``--header-read-timeout``; a body that stalls past ``--client-timeout`` gets 408 and
frees its worker; beyond ``--max-connections`` new connections are closed at once and counted.
Good clients are served throughout, and nothing leaks: no worker stays busy, no descriptor or
thread is left behind.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from extproc.demo.upstream import EchoUpstream
from extproc.io.server import ProxyServer
from tests.support.proxy import Client, request, running_proxy, status_of

pytestmark = pytest.mark.integration

THREADS = 2
# The slow clients outnumber the workers: if any of them held one, good clients would wait.
SLOW_CLIENTS = 4
HEAD_TIMEOUT_S = 6.0
BODY_TIMEOUT_S = 2.0
WAIT_S = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll a state the proxy reaches asynchronously (no event is exposed for it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        time.sleep(0.02)


def workers_idle(proxy: ProxyServer) -> bool:
    return proxy.wait_idle(0)


def read_to_close(sock: socket.socket, timeout: float = WAIT_S) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def answered(sock: socket.socket) -> bool:
    """Whether the proxy wrote to (or closed) this connection."""
    return bool(select.select([sock], [], [], 0)[0])


@pytest.fixture
def slow_proxy(upstream: EchoUpstream, processor_target: str) -> Iterator[ProxyServer]:
    timeouts: dict[str, Any] = {
        "header_read_timeout": HEAD_TIMEOUT_S,
        "client_timeout": BODY_TIMEOUT_S,
    }
    with running_proxy(upstream.address, processor_target, threads=THREADS, **timeouts) as proxy:
        yield proxy


def test_slowloris_head_holds_no_worker(slow_proxy: ProxyServer) -> None:
    slow = [socket.create_connection(slow_proxy.address) for _ in range(SLOW_CLIENTS)]
    try:
        for sock in slow:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a.example\r\nX-Slow: ")
        for _ in range(3):
            for sock in slow:
                sock.sendall(b"z")  # one byte at a time, each making the socket readable
            assert request(slow_proxy.address, "GET", "/good").status == 200
        # Every good request was answered while every slow head was still being waited for.
        assert not any(answered(sock) for sock in slow)
        for sock in slow:
            assert status_of(read_to_close(sock)) == 408
    finally:
        for sock in slow:
            sock.close()
    wait_until(lambda: workers_idle(slow_proxy), "no worker busy")
    assert request(slow_proxy.address, "GET", "/after").status == 200


def test_slow_body_is_cut_off_at_the_client_timeout(
    slow_proxy: ProxyServer, upstream: EchoUpstream
) -> None:
    with socket.create_connection(slow_proxy.address) as stalled:
        stalled.sendall(b"POST /stall HTTP/1.1\r\nHost: a.example\r\nContent-Length: 10\r\n\r\nabc")
        # The stalled body holds one worker; the other serves good clients meanwhile.
        assert request(slow_proxy.address, "GET", "/good").status == 200
        reply = read_to_close(stalled)
    assert status_of(reply) == 408
    assert b"connection: close" in reply
    # The upstream got the head and a cut-off body, which it never took for a whole request.
    assert [r.target for r in upstream.requests] == ["/good"]
    wait_until(lambda: workers_idle(slow_proxy), "no worker busy")
    assert request(slow_proxy.address, "GET", "/after").status == 200


def test_a_connection_that_sends_nothing_is_dropped_without_a_reply(
    slow_proxy: ProxyServer,
) -> None:
    with socket.create_connection(slow_proxy.address) as silent:
        assert request(slow_proxy.address, "GET", "/good").status == 200
        assert read_to_close(silent) == b""


# --max-connections ---------------------------------------------------------------------------

LIMIT = 4
FLOOD = 200


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def counter(proxy: ProxyServer, name: str) -> float:
    return proxy.stats.snapshot()[name]


@pytest.fixture
def limited_proxy(upstream: EchoUpstream, processor_target: str) -> Iterator[ProxyServer]:
    with running_proxy(
        upstream.address, processor_target, threads=THREADS, max_connections=LIMIT
    ) as proxy:
        yield proxy


def test_max_connections_refuses_the_flood_and_recovers(limited_proxy: ProxyServer) -> None:
    active = "http.ingress.downstream_cx_active"
    overflow = "listener.ingress.downstream_cx_overflow"
    idle = [socket.create_connection(limited_proxy.address) for _ in range(LIMIT)]
    try:
        wait_until(lambda: counter(limited_proxy, active) == LIMIT, f"{LIMIT} connections open")
        fds, threads = open_fds(), threading.active_count()
        for _ in range(FLOOD):
            with socket.create_connection(limited_proxy.address) as extra:
                extra.sendall(b"GET /flood HTTP/1.1\r\nHost: a.example\r\n\r\n")
                assert read_to_close(extra) == b""  # closed at once, nothing read or answered
        assert counter(limited_proxy, overflow) == FLOOD
        assert counter(limited_proxy, active) == LIMIT
        # Every refused connection's descriptor is gone on both ends, and no thread was made.
        wait_until(lambda: open_fds() == fds, "descriptors back to where they were")
        assert threading.active_count() == threads
        idle.pop().close()
        wait_until(lambda: counter(limited_proxy, active) == LIMIT - 1, "one connection gone")
        # Below the limit again: a good client is served, twice on its kept-alive connection.
        with Client(limited_proxy.address) as client:
            assert client.request("GET", "/good").status == 200
            assert client.request("GET", "/again").status == 200
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: workers_idle(limited_proxy), "no worker busy")
