"""The soak's upstream: check the request body against its checksum header, echo it back.

Run in its own process (``python -m benchkit.echo_upstream PORT``). A request carrying
``x-soak-sha256`` (the SHA-256 of the body the upstream should receive) is answered 200 with
the same body when it matches, 422 with the digest it computed otherwise; the reply is sent
with a Content-Length or chunked, as the request came. One thread per connection, keep-alive.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import socketserver
import sys

import h11

CHECKSUM_HEADER = b"x-soak-sha256"
READ_SIZE = 1 << 16
CHUNK = 1 << 14


class _Peer:
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
        data = self.h11.send(event)
        if data:
            self.sock.sendall(data)

    def read_body(self) -> bytes:
        parts = []
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise ConnectionError(f"request ended early: {event!r}")

    def answer(self, request: h11.Request) -> None:
        body = self.read_body()
        headers = dict(request.headers)
        digest = hashlib.sha256(body).hexdigest().encode()
        expected = headers.get(CHECKSUM_HEADER)
        if expected is not None and expected != digest:
            self._respond(422, digest, chunked=False)
        else:
            self._respond(200, body, chunked=b"transfer-encoding" in headers)

    def _respond(self, status: int, body: bytes, *, chunked: bool) -> None:
        framing = (
            ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body)))
        )
        self.send(h11.Response(status_code=status, headers=[framing]))
        for start in range(0, len(body), CHUNK):
            self.send(h11.Data(data=body[start : start + CHUNK]))
        self.send(h11.EndOfMessage())

    def serve(self) -> None:
        while True:
            request = self.next_event()
            if not isinstance(request, h11.Request):
                return  # ConnectionClosed: the proxy dropped an idle connection
            self.answer(request)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A broken connection is the proxy's to report; the soak client sees its effect.
        with contextlib.suppress(OSError, h11.ProtocolError):
            _Peer(sock).serve()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m benchkit.echo_upstream PORT", file=sys.stderr)
        return 2
    with _Server(("127.0.0.1", int(argv[1])), _Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
