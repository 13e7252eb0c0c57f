"""The memory benchmark's client: one large exchange, or many idle keep-alive connections.

Talks to `benchkit.bulk_upstream` through the proxy: ``/?respond=N`` asks for an N-byte
response body, and the upstream's ``x-bench-received`` header says how much request body
reached it. Every wait is bounded by a socket timeout and an overall deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time

import h11

from benchkit.bulk_upstream import RECEIVED_HEADER

READ_SIZE = 1 << 20
# A stall this long means the proxy is stuck; the transfer fails instead of hanging.
STALL_TIMEOUT_S = 60.0
# One 64 KiB block, sent again and again: the client holds no more than this of the body.
_BLOCK = memoryview(b"\x5a" * 65536)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """What one exchange moved, as each end counted it."""

    status: int
    sent: int  # request body bytes the client wrote
    upstream_received: int | None  # request body bytes the upstream read (its header)
    received: int  # response body bytes the client read
    seconds: float


class _Client:
    """One connection to the proxy with its h11 state; deadline-bounded reads and writes."""

    def __init__(self, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STALL_TIMEOUT_S)
        self.h11 = h11.Connection(h11.CLIENT)

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError("transfer deadline passed")

    def send(self, event: h11.Event) -> None:
        for piece in self.h11.send_with_data_passthrough(event) or ():
            self.sock.sendall(piece)

    def send_body(self, length: int) -> int:
        left = length
        while left:
            self._check_deadline()
            piece = _BLOCK if left >= len(_BLOCK) else _BLOCK[:left]
            # h11 passes any buffer through uncopied, though its annotation says bytes.
            self.send(h11.Data(data=piece))  # type: ignore[arg-type]
            left -= len(piece)
        self.send(h11.EndOfMessage())
        return length

    def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise ConnectionError("the proxy switched protocols")
            self._check_deadline()
            self.h11.receive_data(self.sock.recv(READ_SIZE))

    def read_response(self) -> tuple[int, int | None, int]:
        """Status, the upstream's received count, and the response body length."""
        response = self.next_event()
        while isinstance(response, h11.InformationalResponse):
            response = self.next_event()
        if not isinstance(response, h11.Response):
            raise ConnectionError(f"no response: {response!r}")
        counted = dict(response.headers).get(RECEIVED_HEADER.encode())
        received = 0
        while not isinstance(event := self.next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise ConnectionError(f"response ended early: {event!r}")
            received += len(event.data)
        return response.status_code, int(counted) if counted is not None else None, received

    def request(self, body: int, respond: int) -> None:
        headers = [("host", "bench")]
        if body:
            headers.append(("content-length", str(body)))
        method = "POST" if body else "GET"
        self.send(h11.Request(method=method, target=f"/?respond={respond}", headers=headers))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def exchange(port: int, *, body: int, respond: int, timeout_s: float) -> Transfer:
    """POST `body` bytes (GET when 0) asking for `respond` bytes back; read it all."""
    started = time.monotonic()
    client = _Client(port, started + timeout_s)
    try:
        client.request(body, respond)
        sent = client.send_body(body) if body else 0
        if not body:
            client.send(h11.EndOfMessage())
        status, upstream_received, received = client.read_response()
    finally:
        client.close()
    return Transfer(status, sent, upstream_received, received, time.monotonic() - started)


def open_idle(port: int, count: int, *, timeout_s: float) -> list[socket.socket]:
    """`count` connections that each had one small GET answered and stay open (keep-alive).

    The caller owns closing them. Raises if any answer is not a complete 200.
    """
    deadline = time.monotonic() + timeout_s
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            client = _Client(port, deadline)
            opened.append(client.sock)
            client.request(0, 16)
            client.send(h11.EndOfMessage())
            status, _, received = client.read_response()
            if status != 200 or received != 16:
                raise ConnectionError(f"idle connection setup got {status} with {received} B")
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
