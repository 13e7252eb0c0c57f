"""The bench upstreams' common part: one h11 server connection per thread, keep-alive.

A subclass of :class:`Peer` answers each request (``answer``); :func:`serve` runs it on a
port until the process is stopped (SIGTERM keeps its default action: nothing needs cleaning).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
from collections.abc import Iterator

import h11


def read_event(conn: h11.Connection, sock: socket.socket, read_size: int) -> h11.Event:
    """The next event of ``conn``, reading ``sock`` as it needs."""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Event):
            return event
        if event is h11.PAUSED:
            raise ConnectionError("the peer asked for a protocol switch")
        conn.receive_data(sock.recv(read_size))


class Peer:
    """One downstream connection (the proxy's) and its h11 state."""

    read_size = 1 << 16

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.SERVER)

    def next_event(self) -> h11.Event:
        return read_event(self.h11, self.sock, self.read_size)

    def send(self, event: h11.Event) -> None:
        # Passthrough: h11 hands body buffers back uncopied.
        for piece in self.h11.send_with_data_passthrough(event) or ():
            self.sock.sendall(piece)

    def body(self) -> Iterator[bytes]:
        """The request body's pieces, to its end."""
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ConnectionError(f"request ended early: {event!r}")

    def answer(self, request: h11.Request) -> None:
        raise NotImplementedError

    def serve(self) -> None:
        while True:
            request = self.next_event()
            if not isinstance(request, h11.Request):
                return  # ConnectionClosed: the proxy dropped an idle connection
            self.answer(request)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def serve(port: int, peer: type[Peer]) -> None:
    """Serve ``peer`` connections on 127.0.0.1:``port`` until the process ends."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A broken or reset connection is the proxy's to report; the next one starts afresh.
            with contextlib.suppress(OSError, h11.ProtocolError):
                peer(sock).serve()

    with _Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()
