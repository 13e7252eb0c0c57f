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
from h11._readers import ChunkedReader, ContentLengthReader

READ_SIZE = 65536
# A piece of a message body: its bytes, whether it ends the message, and the trailers that
# end it instead.
Piece = tuple[bytes, bool, list[tuple[bytes, bytes]] | None]
# A kernel socket timeout of zero means "wait forever": the shortest real one is 1 µs.
_MIN_TIMEOUT = 1e-6
# Envoy's HTTP/1 codec (balsa) holds a body's length in a size_t: a Content-Length or a chunk
# size beyond it is a codec error there. h11 takes up to 20 digits of either, as a Python int,
# and would wait for that many bytes.
MAX_BODY_LENGTH = 2**64 - 1


class _BoundedChunkedReader(ChunkedReader):
    """h11's chunked body reader, refusing a chunk size over :data:`MAX_BODY_LENGTH`."""

    def __call__(self, buf: Any) -> h11.Data | h11.EndOfMessage | None:
        event = super().__call__(buf)
        # What is left of the chunk, plus what this call handed out of it, is at most its
        # size, and is its size on the call that read its size line.
        left = self._bytes_in_chunk
        if type(event) is h11.Data:
            left += len(event.data)
        if left > MAX_BODY_LENGTH:
            raise h11.RemoteProtocolError("chunk size over 64 bits")
        return event


class _H11Connection(h11.Connection):
    """h11 with Envoy's bound on body lengths; notes each chunked body it starts to read.

    h11 has no hook for either: its body readers are chosen in ``_get_io_object``, and the
    chunk size lives in ``ChunkedReader._bytes_in_chunk``, both private. The unit tests
    (tests/unit/test_http1.py) and the hostile corpus fail if an h11 release moves them.
    """

    def __init__(self, role: Any, max_incomplete_event_size: int) -> None:
        super().__init__(role, max_incomplete_event_size=max_incomplete_event_size)
        self.chunked_body_began = False

    def _get_io_object(self, role: Any, event: Any, io_dict: Any) -> Any:
        io = super()._get_io_object(role, event, io_dict)
        if type(io) is ChunkedReader:
            self.chunked_body_began = True
            return _BoundedChunkedReader()
        if type(io) is ContentLengthReader and io._length > MAX_BODY_LENGTH:
            # Raised while h11 takes in the head: the head is refused, as Envoy's codec does.
            raise h11.RemoteProtocolError("Content-Length over 64 bits")
        return io


class Http1Connection:
    """An h11 state machine bound to a blocking socket."""

    __slots__ = (
        "sock",
        "h11",
        "_recv_timeout",
        "_send_timeout",
        "_ahead",
        "_end",
        "_held",
        "peer_closed",
    )

    def __init__(self, sock: socket.socket, role: Any, *, max_head_bytes: int) -> None:
        self.sock = sock
        self.h11 = _H11Connection(role, max_incomplete_event_size=max_head_bytes)
        self._recv_timeout: float | None = None
        self._send_timeout: float | None = None
        self._ahead: list[Any] = []  # body events parsed with their head, handed out first
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
        h11.RemoteProtocolError when the peer breaks HTTP/1.1, in a head or in the chunked
        body bytes that came with it (see :meth:`_parse_chunks_in_hand`).
        """
        if self._ahead:
            return self._ahead.pop(0)
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                if self.h11.chunked_body_began:
                    self._parse_chunks_in_hand()
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
        if self._ahead:
            return self._ahead.pop(0)
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
        if self.h11.chunked_body_began:
            self._parse_chunks_in_hand()
        return event

    def _parse_chunks_in_hand(self) -> None:
        """Parse the chunked body bytes that came with its head, reading nothing more.

        Envoy's codec parses all it has read before anything goes on, so a chunked body that
        breaks framing within them is refused with its head (h11.RemoteProtocolError here)
        before the head is passed on. The events are handed out next.
        """
        self.h11.chunked_body_began = False
        try:
            event = self.h11.next_event()
            while type(event) is h11.Data:
                self._ahead.append(event)
                event = self.h11.next_event()
        except h11.RemoteProtocolError as err:
            # A 400 whatever h11 hints (a chunk line over the head limit is no 431: the head
            # was whole).
            raise h11.RemoteProtocolError(f"body: {err}") from err
        if type(event) is h11.EndOfMessage:
            self._ahead.append(event)

    def start_next_cycle(self) -> None:
        """The next request or response on this connection; nothing read for the last one
        and not taken is handed out."""
        self._ahead = []
        self._end = None
        self.h11.start_next_cycle()

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
            event = self._ahead.pop(0) if self._ahead else self.h11.next_event()
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
        return bool(self._ahead or self.h11.trailing_data[0])

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
