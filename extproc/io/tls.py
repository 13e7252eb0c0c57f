"""TLS on the listener: the handshake, on a worker thread, and HTTP/1.1 over the TLS socket.

The acceptor parks a new connection until its first bytes (the ClientHello) arrive, as for
plain connections, so a client that connects and sends nothing costs no worker thread. The
handshake then runs on the worker that took the connection, bounded by the header-read
deadline as a whole (a client that trickles handshake bytes cannot stretch it), and never in
the acceptor thread, which a stalled client would otherwise stop.
"""

from __future__ import annotations

import selectors
import ssl
import time
from collections.abc import Sequence

import h11

from extproc.io.http1 import READ_SIZE, Http1Connection


class TlsConnection(Http1Connection):
    """An h11 connection over an ``ssl.SSLSocket``, with Python's socket timeouts. It has no
    ``sendmsg``: the pieces of one event are joined into one write (one TLS record where
    they fit)."""

    __slots__ = ()

    def _prepare_socket(self) -> None:
        pass

    def _recv(self, timeout: float) -> bytes:
        self._set_timeout(timeout)
        return self.sock.recv(READ_SIZE)

    def _recv_nowait(self) -> bytes | None:
        self._set_timeout(0.0)
        try:
            return self.sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None

    def _write(self, pieces: Sequence[bytes | bytearray | memoryview], timeout: float) -> None:
        self._set_timeout(timeout)
        self.sock.sendall(b"".join(pieces))

    def _set_timeout(self, timeout: float) -> None:
        # One value for both directions, as a Python socket timeout is.
        if timeout != self._recv_timeout:
            self.sock.settimeout(timeout)
            self._recv_timeout = timeout


def handshake(
    context: ssl.SSLContext, conn: Http1Connection, deadline: float, max_head_bytes: int
) -> TlsConnection:
    """Run the server side of the TLS handshake on ``conn``'s socket by ``deadline``.

    Returns the connection to serve HTTP on; raises OSError (``ssl.SSLError``, TimeoutError)
    when the handshake fails or the deadline passes, with the socket closed.
    """
    sock = conn.sock
    sock.setblocking(False)
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError:
        sock.close()
        raise
    try:
        _drive(tls, deadline)
    except OSError:
        tls.close()
        raise
    tls.setblocking(True)
    return TlsConnection(tls, h11.SERVER, max_head_bytes=max_head_bytes)


def _drive(tls: ssl.SSLSocket, deadline: float) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(tls, selectors.EVENT_READ)
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                selector.modify(tls, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                selector.modify(tls, selectors.EVENT_WRITE)
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError("TLS handshake not finished within the header read timeout")


def pending(conn: Http1Connection) -> bool:
    """Whether the TLS layer holds decrypted bytes the socket's readiness cannot show."""
    sock = conn.sock
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
