"""Connections to the one upstream: connect with a timeout, keep idle ones for reuse.

A connection goes back to the pool only when both sides of its h11 state machine finished
cleanly; anything else (errors, timeouts, half-read responses) closes it.
"""

from __future__ import annotations

import select
import socket
import threading

import h11

from extproc.config import UpstreamSettings
from extproc.errors import UpstreamConnectError
from extproc.io.http1 import Http1Connection


class UpstreamPool:
    """Idle keep-alive connections to one upstream address, shared by all workers."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._idle: list[Http1Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> tuple[Http1Connection, bool]:
        """A connection ready for a request, and whether it was reused from the pool."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if _still_open(conn.sock):
                return conn, True
            conn.close()

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
            h.start_next_cycle()
            with self._lock:
                if not self._closed and len(self._idle) < self.settings.max_idle:
                    self._idle.append(conn)
                    return True
        conn.close()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> Http1Connection:
        s = self.settings
        try:
            sock = socket.create_connection((s.host, s.port), timeout=s.connect_timeout)
        except OSError as err:
            raise UpstreamConnectError(f"connect to {s.host}:{s.port}: {err}") from err
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Http1Connection(sock, h11.CLIENT, max_head_bytes=s.max_response_head_bytes)


def _still_open(sock: socket.socket) -> bool:
    """False when the upstream closed an idle connection (readable with EOF or stray bytes)."""
    # poll, not a MSG_DONTWAIT peek: a socket with a timeout waits for readability first.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)
