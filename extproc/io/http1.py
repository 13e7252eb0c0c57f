"""A blocking h11 connection over one socket, used downstream (server) and upstream (client).

Owns reading with timeouts and writing without copying body bytes. Knows nothing of ext_proc.

A plain TCP socket stays in blocking mode and its timeouts are the kernel's (SO_RCVTIMEO,
SO_SNDTIMEO): a socket with a Python timeout polls before every recv and send, and switching
it between "wait" and "do not wait" is an ioctl, each a second syscall that hands the GIL to
another worker and back. Blocking, a read or a write is one syscall. TLS sockets keep Python's
timeouts (an SSL socket takes no MSG_DONTWAIT and reports a kernel timeout as a TLS error).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import h11

READ_SIZE = 65536
# A piece of a message body: its bytes, whether it ends the message, and the trailers that
# end it instead.
Piece = tuple[bytes, bool, list[tuple[bytes, bytes]] | None]
# A kernel socket timeout of zero means "wait forever": the shortest real one is 1 µs.
_MIN_TIMEOUT = 1e-6


class Http1Connection:
    """An h11 state machine bound to a blocking socket."""

    __slots__ = ("sock", "h11", "_recv_timeout", "_send_timeout", "_end", "_held", "peer_closed")

    def __init__(self, sock: socket.socket, role: Any, *, max_head_bytes: int) -> None:
        self.sock = sock
        self.h11 = h11.Connection(role, max_incomplete_event_size=max_head_bytes)
        self._recv_timeout: float | None = None
        self._send_timeout: float | None = None
        self._end: Any = None  # an EndOfMessage read behind data, handed out next time
        self._held: list[bytes] = []  # written with the next send (see hold())
        # The peer closed or reset the connection: an error that follows is its doing.
        self.peer_closed = False
        self._prepare_socket()

    def _prepare_socket(self) -> None:
        if self.sock.gettimeout() is not None:
            self.sock.settimeout(None)

    def _recv(self, timeout: float) -> bytes:
        """One read of what the peer sent, waiting at most ``timeout`` seconds for it."""
        if timeout != self._recv_timeout:
            # Only call into the socket when the value changes: most reads reuse the last one.
            _set_kernel_timeout(self.sock, socket.SO_RCVTIMEO, timeout)
            self._recv_timeout = timeout
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError as err:
            raise TimeoutError("timed out") from err

    def _recv_nowait(self) -> bytes | None:
        """What the peer sent, from one read that does not wait; None when nothing is there."""
        try:
            return self.sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def _receive(self, data: bytes) -> None:
        if not data:
            self.peer_closed = True
        self.h11.receive_data(data)

    def next_event(self, timeout: float, deadline: float | None = None) -> Any:
        """The next h11 event.

        Raises TimeoutError if no bytes come for ``timeout`` seconds, or once the monotonic
        ``deadline`` passes (a slow peer trickling bytes cannot stretch it), and
        h11.RemoteProtocolError when the peer breaks HTTP/1.1.
        """
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise TimeoutError("deadline passed")
            try:
                data = self._recv(timeout)
            except ConnectionError:
                data = b""
            self._receive(data)

    def receive_within(self, timeout: float) -> bool:
        """Whether the peer sent something (or closed) within ``timeout`` seconds; what it
        sent is taken in, for the next event."""
        try:
            data = self._recv(timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        self._receive(data)
        return True

    def poll_event(self) -> Any:
        """The next event from the bytes held plus at most one read that does not wait.

        h11.NEED_DATA when that is not enough: the caller waits for readability elsewhere (a
        request head that trickles in waits in the server's selector, not on a worker).
        """
        event = self.h11.next_event()
        if event is h11.NEED_DATA:
            try:
                data = self._recv_nowait()
            except ConnectionError:
                data = b""
            if data is None:
                return event
            self._receive(data)
            event = self.h11.next_event()
        return event

    def read_body(self, timeout: float) -> Piece:
        """The next piece of a message body: all the data one read brought, whether the
        message ended, and its trailers if it ended with some.

        Like Envoy's HTTP/1 codec, one socket read is one piece (data h11 already holds is
        joined), and the end of the message is always a piece of its own, without data.
        """
        if self._end is not None:
            return self._take_end()
        return self._piece(self.next_event(timeout))

    def read_arrived(self) -> Piece | None:
        """As :meth:`read_body`, from what has already arrived: the bytes held plus at most
        one read that does not wait; None when that holds no piece."""
        if self._end is not None:
            return self._take_end()
        event = self.poll_event()
        return None if event is h11.NEED_DATA else self._piece(event)

    def _piece(self, event: Any) -> Piece:
        """The piece that starts with ``event``."""
        parts: list[bytes] = []
        while isinstance(event, h11.Data):
            parts.append(event.data)
            event = self.h11.next_event()
        if isinstance(event, h11.EndOfMessage):
            self._end = event
            return (_join(parts), False, None) if parts else self._take_end()
        if event is h11.NEED_DATA and parts:
            return _join(parts), False, None
        raise ConnectionResetError(f"peer ended the message early ({event!r})")

    def _take_end(self) -> Piece:
        event, self._end = self._end, None
        return b"", not event.headers, [(n, v) for n, v in event.headers] or None

    def buffered_event_ready(self) -> bool:
        """Whether bytes already received hold (part of) another message, e.g. pipelining."""
        return bool(self.h11.trailing_data[0])

    def send(self, event: Any, timeout: float) -> None:
        pieces = self.h11.send_with_data_passthrough(event) or []
        if self._held:
            pieces = self._held + pieces
            self._held = []
        if pieces:
            self._write(pieces, timeout)

    def _write(self, pieces: Sequence[bytes | bytearray | memoryview], timeout: float) -> None:
        if timeout != self._send_timeout:
            _set_kernel_timeout(self.sock, socket.SO_SNDTIMEO, timeout)
            self._send_timeout = timeout
        try:
            _sendall(self.sock, pieces)
        except BlockingIOError as err:
            raise TimeoutError("timed out") from err

    def hold(self, event: Any) -> None:
        """Serialise ``event`` now but write it with the next :meth:`send`: one syscall for
        a head and the body right behind it. Only for a send that follows without a wait."""
        self._held += self.h11.send_with_data_passthrough(event) or []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _join(parts: list[bytes]) -> bytes:
    # h11 hands out bytearrays; protobuf bytes fields want bytes.
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def _set_kernel_timeout(sock: socket.socket, option: int, timeout: float) -> None:
    if timeout <= 0:
        raise TimeoutError("deadline passed")
    timeout = max(timeout, _MIN_TIMEOUT)
    seconds = int(timeout)
    sock.setsockopt(
        socket.SOL_SOCKET, option, struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
    )


# Up to this much, pieces are joined and written with sendall: copying a head and a small body
# costs less than a memoryview for each piece and sendmsg's bookkeeping.
_JOIN_LIMIT = 16 * 1024


def _sendall(sock: socket.socket, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write every piece: joined when small, else scatter-gather (h11 hands out the body bytes
    uncopied, and a large body stays so)."""
    if sum(map(len, pieces)) <= _JOIN_LIMIT:
        sock.sendall(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
