"""Several upstream addresses: round robin, keep-alive per address, passive health."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest

from extproc.addresses import Address
from extproc.config import UpstreamSettings, build_config
from extproc.demo.upstream import EchoUpstream
from extproc.errors import UpstreamConnectError
from extproc.io.server import ProxyServer
from extproc.io.upstream import UpstreamPool
from extproc.metrics import Stats
from tests.support.processor import ScriptedProcessor
from tests.support.proxy import Client, request

pytestmark = pytest.mark.integration

CLUSTER = "cluster.upstream."


@contextmanager
def proxy_over(upstreams: str, processor: str, **overrides: Any) -> Iterator[ProxyServer]:
    """extproc on 127.0.0.1:0 in front of the comma list ``upstreams``."""
    flags = dict(
        listen="127.0.0.1:0",
        upstream=upstreams,
        processor=processor,
        message_timeout="10s",
        **overrides,
    )
    server = ProxyServer(build_config(None, flags)).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def refusing() -> Iterator[socket.socket]:
    """A port bound but not listening: connections to it are refused."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


@contextmanager
def unanswering() -> Iterator[socket.socket]:
    """A port whose accept queue is full: connections to it time out."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as sock:
        filler = socket.create_connection(sock.getsockname(), timeout=10)
        try:
            yield sock
        finally:
            filler.close()


def hostport(address: tuple[str, int] | socket.socket) -> str:
    host, port = address.getsockname()[:2] if isinstance(address, socket.socket) else address
    return f"{host}:{port}"


@pytest.fixture
def echoes() -> Iterator[list[EchoUpstream]]:
    with EchoUpstream() as a, EchoUpstream() as b, EchoUpstream() as c:
        yield [a, b, c]


def test_round_robin_with_keep_alive_per_address(
    echoes: list[EchoUpstream], processor: ScriptedProcessor
) -> None:
    upstreams = ",".join(hostport(e.address) for e in echoes)
    with (
        proxy_over(upstreams, processor.address) as proxy,
        Client(proxy.address) as client,
    ):
        replies = [client.request("GET", f"/{i}") for i in range(30)]
    assert [r.status for r in replies] == [200] * 30
    assert [len(e.requests) for e in echoes] == [10, 10, 10]
    # Each address kept its one connection alive across its ten requests.
    assert [{r.connection for r in e.requests} for e in echoes] == [{1}] * 3


@pytest.mark.parametrize("down", [refusing, unanswering], ids=["refused", "connect-timeout"])
def test_a_down_upstream_is_ejected_and_the_request_goes_to_the_next(
    echoes: list[EchoUpstream],
    processor: ScriptedProcessor,
    down: Callable[[], AbstractContextManager[socket.socket]],
) -> None:
    a, b = echoes[:2]
    with down() as dead:
        dead_address = hostport(dead)
        upstreams = f"{hostport(a.address)},{dead_address},{hostport(b.address)}"
        with proxy_over(upstreams, processor.address, upstream_connect_timeout=0.5) as proxy:
            replies = [request(proxy.address, "GET", "/") for _ in range(20)]
        stats = proxy.stats.snapshot()
        metrics = proxy.stats.render_prometheus()[0].decode()
    assert [r.status for r in replies] == [200] * 20
    assert len(a.requests) + len(b.requests) == 20
    # Tried once, then skipped for the (default 30 s) ejection time.
    assert stats[CLUSTER + "upstream_cx_connect_fail"] == 1
    assert stats[CLUSTER + "outlier_detection.ejections_enforced_total"] == 1
    assert stats[CLUSTER + "outlier_detection.ejections_active"] == 1
    assert f'extproc_upstream_cx_connect_fail_total{{address="{dead_address}"}} 1.0' in metrics


def test_all_ejected_are_tried_anyway(processor: ScriptedProcessor) -> None:
    with refusing() as first, refusing() as second:
        revived = first.getsockname()[:2]
        upstreams = f"{hostport(first)},{hostport(second)}"
        with proxy_over(upstreams, processor.address) as proxy:
            assert request(proxy.address, "GET", "/").status == 503
            assert proxy.stats.snapshot()[CLUSTER + "outlier_detection.ejections_active"] == 2
            first.close()  # the port is free again: an upstream comes back on it
            with EchoUpstream(*revived) as back:
                assert request(proxy.address, "GET", "/").status == 200
            assert len(back.requests) == 1
        stats = proxy.stats.snapshot()
    # The one that answered is healthy again; the other stays ejected.
    assert stats[CLUSTER + "outlier_detection.ejections_active"] == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ejection_time_grows_with_each_ejection_in_a_row_up_to_the_max() -> None:
    """Envoy's outlier detection: base_ejection_time times the ejections in a row, capped."""
    clock = Clock()
    stats = Stats()
    with EchoUpstream() as live, refusing() as dead:
        settings = UpstreamSettings(
            (Address(*live.address), Address(*dead.getsockname()[:2])),
            ejection_time=10.0,
            max_ejection_time=25.0,
        )
        pool = UpstreamPool(settings, stats, clock)

        def failures_after(acquires: int) -> float:
            for _ in range(acquires):
                conn, _ = pool.acquire()
                conn.close()
            return stats.snapshot()[CLUSTER + "upstream_cx_connect_fail"]

        assert failures_after(2) == 1  # round robin reached the dead one: ejected for 10 s
        for ejected_for, failures in ((10.0, 2), (20.0, 3), (25.0, 4), (25.0, 5)):
            clock.now += ejected_for - 0.1
            assert failures_after(6) == failures - 1  # still skipped
            clock.now += 0.2
            assert failures_after(2) == failures  # tried again, failed, ejected longer
        pool.close()


def test_a_single_upstream_down_is_a_503_each_time() -> None:
    with refusing() as dead:
        pool = UpstreamPool(UpstreamSettings((Address(*dead.getsockname()[:2]),)))
        for _ in range(2):
            with pytest.raises(UpstreamConnectError):
                pool.acquire()
        pool.close()
