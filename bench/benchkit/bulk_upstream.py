"""An upstream for large bodies: count and discard the request body, answer with N bytes.

Run in its own process (``python -m benchkit.bulk_upstream PORT``) so its CPU and memory are
apart from the proxy's. ``GET|POST /?respond=N`` is answered 200 with an N-byte body
(content-length) and an ``x-bench-received`` header telling how many request body bytes
arrived, so the client can check both directions. One thread per connection, keep-alive.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import sys
import urllib.parse

import h11

RECEIVED_HEADER = "x-bench-received"
READ_SIZE = 1 << 20
# Built once and sent again and again: generating the body costs nothing per byte.
_BLOCK = memoryview(bytes(range(256)) * (READ_SIZE // 256))


def respond_bytes(target: bytes) -> int:
    """The N of ``/?respond=N`` (0 when absent or malformed)."""
    query = urllib.parse.urlsplit(target.decode("latin-1")).query
    values = urllib.parse.parse_qs(query).get("respond", ["0"])
    return int(values[0]) if values[0].isdigit() else 0


class _Peer:
    """One downstream connection (the proxy's) and its h11 state."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.SERVER)

    def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise ConnectionError("the proxy asked for a protocol switch")
            self.h11.receive_data(self.sock.recv(READ_SIZE))

    def send(self, event: h11.Event) -> None:
        # Passthrough: h11 hands the body memoryview back uncopied.
        for piece in self.h11.send_with_data_passthrough(event) or ():
            self.sock.sendall(piece)

    def drain_body(self) -> int:
        """Read the request body to its end; how many bytes it had."""
        received = 0
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                received += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return received
            else:
                raise ConnectionError(f"request ended early: {event!r}")

    def respond(self, length: int, received: int) -> None:
        headers = [("content-length", str(length)), (RECEIVED_HEADER, str(received))]
        self.send(h11.Response(status_code=200, headers=headers))
        left = length
        while left:
            piece = _BLOCK if left >= len(_BLOCK) else _BLOCK[:left]
            # h11 passes any buffer through uncopied, though its annotation says bytes.
            self.send(h11.Data(data=piece))  # type: ignore[arg-type]
            left -= len(piece)
        self.send(h11.EndOfMessage())

    def serve(self) -> None:
        while True:
            request = self.next_event()
            if not isinstance(request, h11.Request):
                return  # ConnectionClosed: the proxy dropped an idle connection
            self.respond(respond_bytes(request.target), self.drain_body())
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A broken or reset connection is the proxy's business; the next one starts afresh.
        with contextlib.suppress(OSError, h11.ProtocolError):
            _Peer(sock).serve()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m benchkit.bulk_upstream PORT", file=sys.stderr)
        return 2
    # SIGTERM keeps its default action: the process holds nothing that needs cleaning up.
    with _Server(("127.0.0.1", int(argv[1])), _Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
