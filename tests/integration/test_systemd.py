"""The proxy under systemd's protocols, as real processes: sd_notify datagrams on a socket the
test binds, and socket activation with a listening socket the test holds as systemd would."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from extproc.demo.upstream import EchoUpstream
from tests.support.processor import ScriptedProcessor
from tests.support.proxy import request
from tests.support.proxyproc import NotifySocket, ProxyProcess, listening_socket, proxy_args

pytestmark = pytest.mark.integration


def _args(upstream: EchoUpstream, processor: ScriptedProcessor, *more: str) -> list[str]:
    return [*proxy_args(upstream.address, processor.address), *more]


def test_notify_ready_watchdog_reloading_stopping(
    tmp_path: Path, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    notify = NotifySocket(tmp_path)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    try:
        with ProxyProcess("--listen", "127.0.0.1:0", *_args(upstream, processor), env=env) as proxy:
            assert notify.next() == "READY=1"
            # Ready means accepting: a request goes through right away.
            assert request(("127.0.0.1", proxy.port()), "GET", "/").status == 200
            # Pings every WatchdogSec/2 from the serving loop.
            assert notify.wait_for("^WATCHDOG=1$") == "WATCHDOG=1"
            assert notify.wait_for("^WATCHDOG=1$") == "WATCHDOG=1"
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            proxy.signal(signal.SIGHUP)
            reloading = notify.wait_for("^RELOADING=1")
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            fields = dict(line.split("=", 1) for line in reloading.split("\n"))
            assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
            assert before <= int(fields["MONOTONIC_USEC"]) <= after
            assert notify.wait_for("^READY=1$") == "READY=1"
            proxy.signal(signal.SIGTERM)
            assert notify.wait_for("^STOPPING=1$") == "STOPPING=1"
            assert proxy.wait() == 0
    finally:
        notify.close()
    # No ping before READY, none after STOPPING.
    assert notify.received[0] == "READY=1"
    assert notify.received[-1] == "STOPPING=1"


def test_no_watchdog_pings_for_another_pid(
    tmp_path: Path, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    notify = NotifySocket(tmp_path)
    # WATCHDOG_PID names another process (the variable leaked from a parent): not ours to ping.
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    try:
        with ProxyProcess("--listen", "127.0.0.1:0", *_args(upstream, processor), env=env) as proxy:
            assert notify.next() == "READY=1"
            proxy.signal(signal.SIGTERM)
            assert notify.next() == "STOPPING=1"
            assert proxy.wait() == 0
    finally:
        notify.close()


@contextmanager
def _queued(address: tuple[str, int], paths: list[str]) -> Iterator[list[socket.socket]]:
    """Clients that connected and sent a request each, closed on the way out whatever
    happened (a socket left open fails a later test with a ResourceWarning)."""
    with ExitStack() as closing:
        clients = []
        for path in paths:
            sock = closing.enter_context(socket.create_connection(address, timeout=60))
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            clients.append(sock)
        yield clients


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_socket_activation_serves_connections_queued_before_start(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with listening_socket() as held:
        address = held.getsockname()
        # Connected and sent before any proxy runs: the kernel queues them on the socket.
        with (
            _queued(address, [f"/early/{i}" for i in range(3)]) as early,
            ProxyProcess(*_args(upstream, processor), activate=[held]) as proxy,
        ):
            activated = proxy.wait_event("socket_activated")
            assert activated["listen"] == "fd://3"
            replies = [_read_all(sock) for sock in early]
            assert request(address, "GET", "/late").status == 200
            proxy.signal(signal.SIGTERM)
            assert proxy.wait() == 0
        for i, reply in enumerate(replies):
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert f"/early/{i}".encode() in reply  # the echo upstream's account of it


def test_restart_with_a_held_socket_drops_no_connection(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    """``systemctl restart`` with a .socket unit: the socket outlives the service, so what
    clients send while no proxy runs waits in its queue for the next one."""
    with listening_socket() as held:
        address = held.getsockname()
        first = ProxyProcess(*_args(upstream, processor), activate=[held])
        with first:
            first.wait_event("listening")
            assert request(address, "GET", "/before").status == 200
            first.signal(signal.SIGTERM)
            assert first.wait() == 0
        with (
            _queued(address, [f"/during/{i}" for i in range(4)]) as during,
            ProxyProcess(*_args(upstream, processor), activate=[held]) as second,
        ):
            replies = [_read_all(sock) for sock in during]
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
        for reply in replies:
            assert reply.startswith(b"HTTP/1.1 200 ")


def test_listen_fd_serves_on_the_named_descriptor(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with listening_socket() as held:
        fd = held.fileno()
        with ProxyProcess(
            "--listen", f"fd://{fd}", *_args(upstream, processor), pass_fds=(fd,)
        ) as proxy:
            proxy.wait_event("listening")
            assert request(held.getsockname(), "GET", "/").status == 200
            assert not proxy.events("socket_activated")
            proxy.signal(signal.SIGTERM)
            assert proxy.wait() == 0


def test_listen_fd_that_is_no_socket_exits_3(
    tmp_path: Path, upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with (tmp_path / "file").open("w") as not_a_socket:
        fd = not_a_socket.fileno()
        with ProxyProcess(
            "--listen", f"fd://{fd}", *_args(upstream, processor), pass_fds=(fd,)
        ) as proxy:
            assert proxy.wait() == 3
    assert f"cannot listen on fd://{fd}" in proxy.log()


def test_several_activated_sockets_are_refused(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with (
        listening_socket() as one,
        listening_socket() as two,
        ProxyProcess(*_args(upstream, processor), activate=[one, two]) as proxy,
    ):
        assert proxy.wait() == 3
    assert "systemd passed 2 sockets" in proxy.log()
