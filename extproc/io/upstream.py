"""Connections to the upstreams: round robin over the addresses, passive health, keep-alive.

Each request goes to the next address in turn. An address that refuses the connection (or
does not answer within the connect timeout) is ejected, as by Envoy's outlier detection: it
is skipped for ``ejection_time`` seconds times the number of ejections in a row, at most
``max_ejection_time``; the next address is tried at once (nothing was sent yet, so the
request loses nothing). A connection that succeeds ends the run of ejections. When every
address is ejected they are all tried anyway, the one whose ejection ends first first.

A connection goes back to its address's idle list only when both sides of its h11 state
machine finished cleanly; anything else (errors, timeouts, half-read responses) closes it.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from collections.abc import Callable

import h11
import structlog

from extproc.addresses import Address
from extproc.config import UpstreamSettings
from extproc.errors import UpstreamConnectError
from extproc.io.http1 import Http1Connection
from extproc.metrics import Stats, UpstreamHostStats

log = structlog.get_logger("extproc.upstream")


class UpstreamConnection(Http1Connection):
    """A connection that knows which address's idle list it goes back to."""

    __slots__ = ("host",)

    def __init__(self, sock: socket.socket, host: _Host, max_head_bytes: int) -> None:
        super().__init__(sock, h11.CLIENT, max_head_bytes=max_head_bytes)
        self.host = host


class _Host:
    """One upstream address: its idle connections and its ejection state."""

    __slots__ = ("address", "idle", "ejected_until", "ejections", "stats")

    def __init__(self, address: Address, stats: UpstreamHostStats | None) -> None:
        self.address = address
        self.idle: list[UpstreamConnection] = []
        self.ejected_until = 0.0  # monotonic; 0: not ejected
        self.ejections = 0  # in a row
        self.stats = stats


class UpstreamPool:
    """Every upstream address with its idle keep-alive connections, shared by all workers."""

    def __init__(
        self,
        settings: UpstreamSettings,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._hosts = [
            _Host(a, stats.upstream_host(str(a)) if stats is not None else None)
            for a in settings.addresses
        ]
        self._turn = itertools.count()
        self._ejected = 0  # how many hosts are ejected: no clock read while none is
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> tuple[Http1Connection, bool]:
        """A connection ready for a request, and whether it was reused from the pool.

        Raises :class:`UpstreamConnectError` when no address takes a connection.
        """
        failure: UpstreamConnectError | None = None
        for host in self._order():
            conn = self._idle_connection(host)
            if conn is not None:
                return conn, True
            try:
                return self._connect(host), False
            except UpstreamConnectError as err:
                self._eject(host)
                failure = err
        assert failure is not None
        raise failure

    def release(self, conn: Http1Connection) -> bool:
        """Give back a connection after a response; it is kept only if reusable.

        False when the upstream sent bytes past the end of its response (more body than its
        Content-Length said): they must never be read as the next request's response.
        """
        h = conn.h11
        if h.their_state is h11.DONE and h.trailing_data[0]:
            conn.close()
            return False
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            assert isinstance(conn, UpstreamConnection)
            conn.start_next_cycle()
            with self._lock:
                if not self._closed and len(conn.host.idle) < self.settings.max_idle:
                    conn.host.idle.append(conn)
                    return True
        conn.close()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [conn for host in self._hosts for conn in host.idle]
            for host in self._hosts:
                host.idle = []
        for conn in idle:
            conn.close()

    def _order(self) -> list[_Host]:
        """The hosts to try for one request: healthy ones from the next in turn."""
        hosts = self._hosts
        if len(hosts) == 1:
            return hosts
        start = next(self._turn) % len(hosts)
        ordered = hosts[start:] + hosts[:start]
        if not self._ejected:
            return ordered
        now = self._clock()
        with self._lock:
            for host in ordered:
                if host.ejected_until and host.ejected_until <= now:
                    self._end_ejection(host)
            healthy = [host for host in ordered if not host.ejected_until]
            # All ejected: try them anyway, the soonest to come back first.
            return healthy or sorted(ordered, key=lambda host: host.ejected_until)

    def _idle_connection(self, host: _Host) -> UpstreamConnection | None:
        while True:
            with self._lock:
                conn = host.idle.pop() if host.idle else None
            if conn is None or _still_open(conn.sock):
                return conn
            conn.close()

    def _connect(self, host: _Host) -> UpstreamConnection:
        s = self.settings
        address = host.address
        if host.stats is not None:
            host.stats.cx_total.inc()
        try:
            sock = socket.create_connection((address.host, address.port), timeout=s.connect_timeout)
        except OSError as err:
            if host.stats is not None:
                host.stats.cx_connect_fail.inc()
            raise UpstreamConnectError(f"connect to {address}: {err}") from err
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if host.ejections:
            with self._lock:
                host.ejections = 0  # healthy again: the next ejection starts from the base
                if host.ejected_until:
                    self._end_ejection(host)
        return UpstreamConnection(sock, host, s.max_response_head_bytes)

    def _eject(self, host: _Host) -> None:
        s = self.settings
        with self._lock:
            host.ejections += 1
            duration = min(s.ejection_time * host.ejections, s.max_ejection_time)
            if not host.ejected_until:
                self._ejected += 1
                if host.stats is not None:
                    host.stats.ejections_active.inc()
            host.ejected_until = self._clock() + duration
        if host.stats is not None:
            host.stats.ejections_enforced.inc()
        log.warning("upstream_ejected", address=str(host.address), seconds=duration)

    def _end_ejection(self, host: _Host) -> None:
        # Under self._lock.
        host.ejected_until = 0.0
        self._ejected -= 1
        if host.stats is not None:
            host.stats.ejections_active.dec()


def _still_open(sock: socket.socket) -> bool:
    """False when the upstream closed an idle connection (readable with EOF or stray bytes)."""
    # poll, not a MSG_DONTWAIT peek: a socket with a timeout waits for readability first.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)
