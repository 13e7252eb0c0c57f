"""ExtProcMiddleware served by wsgiref on loopback, around an app that relays to an upstream.

The parity suites run each scenario against a real upstream (EchoUpstream, or the bodies
suite's ReplyingUpstream) and compare what it received. :class:`RelayApp` lets the same
scenarios run through the middleware unchanged: it is the app behind the middleware, and it
does nothing of its own, handing the upstream the request the app was given (its environ and
wsgi.input, streamed) and the server the upstream's answer (streamed, piece by piece). So what
the upstream records is what the app saw, and the upstream's behaviour (echo, pacing) is the
app's.

What a relay cannot carry is what WSGI cannot: trailers, either way, and framing headers (a
WSGI app may not set hop-by-hop headers, PEP 3333).
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import h11

from extproc import ExtProcMiddleware
from extproc.metrics import Stats
from extproc.wsgi import environ_wire_headers, request_target

TIMEOUT = 30.0
READ_SIZE = 64 * 1024
# PEP 3333: the app must not set these; the server frames the response itself.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te"}
    | {"trailer", "transfer-encoding", "upgrade"}
)


class RelayApp:
    """A WSGI app that forwards each request to ``upstream`` over HTTP/1.1 (h11), keeping
    connections alive between requests as the proxy's pool does (the echo tells them apart).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._idle: list[tuple[socket.socket, h11.Connection]] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock, _ in idle:
            sock.close()

    def release(self, sock: socket.socket, conn: h11.Connection) -> None:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            with self._lock:
                self._idle.append((sock, conn))
        else:
            sock.close()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        with self._lock:
            sock, conn = self._idle.pop() if self._idle else (None, None)
        if sock is None or conn is None:
            sock = socket.create_connection(self.upstream, timeout=TIMEOUT)
            conn = h11.Connection(h11.CLIENT)
        try:
            self._send_request(sock, conn, environ)
            response = _next(sock, conn)
            assert isinstance(response, h11.Response), response
        except BaseException:
            sock.close()
            raise
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in response.headers
            if n.decode("latin-1") not in _HOP_BY_HOP
        ]
        start_response(f"{response.status_code} {response.reason.decode()}".strip(), headers)
        return _Body(self, sock, conn)

    def _send_request(
        self, sock: socket.socket, conn: h11.Connection, environ: dict[str, Any]
    ) -> None:
        length = environ.get("CONTENT_LENGTH")
        # No length, read to the end (wsgi.input_terminated): a body of unknown length.
        chunked = not length and bool(environ.get("wsgi.input_terminated"))
        headers = [(n, v) for n, v in environ_wire_headers(environ) if n != b"transfer-encoding"]
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        target = request_target(environ)
        request = h11.Request(method=environ["REQUEST_METHOD"], target=target, headers=headers)
        sock.sendall(conn.send(request) or b"")
        left = int(length) if length else 0
        stream = environ["wsgi.input"]
        while chunked or left > 0:
            data = stream.read(READ_SIZE if chunked else min(READ_SIZE, left))
            if not data:
                break
            left -= len(data)
            sock.sendall(conn.send(h11.Data(data=data)) or b"")
        sock.sendall(conn.send(h11.EndOfMessage()) or b"")


class _Body:
    """The upstream's response body, a piece per h11 Data event; close() closes the socket."""

    def __init__(self, relay: RelayApp, sock: socket.socket, conn: h11.Connection) -> None:
        self._relay = relay
        self._sock = sock
        self._conn = conn

    def __iter__(self) -> Iterator[bytes]:
        while True:
            event = _next(self._sock, self._conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return  # its trailers: WSGI cannot carry them
            else:
                raise ConnectionError(f"upstream: {event!r}")

    def close(self) -> None:
        self._relay.release(self._sock, self._conn)


def _next(sock: socket.socket, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(sock.recv(READ_SIZE))
    return event


class ChunkedInput:
    """A chunked request body read from ``raw``, de-chunked.

    read(size) returns at most what is left of the current chunk, as a socket read returns
    what has arrived: a body sent in paced chunks reaches the middleware chunk by chunk.
    """

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self._left = 0  # in the current chunk
        self._done = False

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while not self._done and (size < 0 or not out):
            if self._left == 0:
                self._left = int(self.raw.readline().split(b";")[0].strip() or b"0", 16)
                if self._left == 0:
                    while self.raw.readline().strip():
                        pass  # the trailers, up to the blank line that ends them
                    self._done = True
                    break
            want = self._left if size < 0 else min(self._left, size - len(out))
            data = self.raw.read(want)
            if not data:
                raise ConnectionError("the client closed inside a chunk")
            out += data
            self._left -= len(data)
            if self._left == 0:
                self.raw.readline()  # the CRLF after the chunk
        return bytes(out)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            # wsgiref hands the app the raw socket whatever the framing; read a chunked body
            # as gunicorn does: de-chunked, to its end (wsgi.input_terminated), trailers
            # dropped (WSGI has no request trailers). The handler hands rfile on as
            # wsgi.input.
            self.rfile = ChunkedInput(self.rfile)  # type: ignore[assignment]
        return True

    def finish(self) -> None:
        if isinstance(self.rfile, ChunkedInput):
            self.rfile = self.rfile.raw  # closed by finish(), as the handler's own
        super().finish()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        if isinstance(self.rfile, ChunkedInput):
            environ["wsgi.input_terminated"] = True
            environ.pop("CONTENT_LENGTH", None)
        if self.headers.get("content-type") is None:
            # wsgiref fills in "text/plain" for a request without one (PEP 3333 lets it be
            # absent; gunicorn leaves it out): the processor would see a header never sent.
            environ.pop("CONTENT_TYPE", None)
        return environ


@contextmanager
def serving_wsgi(middleware: ExtProcMiddleware) -> Iterator[tuple[str, int]]:
    """``middleware`` served by wsgiref (a thread per request) on 127.0.0.1:0."""
    server = make_server("127.0.0.1", 0, middleware, _Server, _QuietHandler)
    # A short poll interval only makes shutdown() prompt; requests are served as they come.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()  # joins the request threads (block_on_close)
        thread.join(TIMEOUT)
        middleware.close()


@contextmanager
def relaying_middleware(
    upstream: tuple[str, int],
    processor: tuple[str, int],
    ext_proc: dict[str, Any],
    stats: Stats | None = None,
    **options: Any,
) -> Iterator[tuple[tuple[str, int], ExtProcMiddleware]]:
    """ExtProcMiddleware(RelayApp(upstream)) with ``ext_proc`` as its filter, served."""
    relay = RelayApp(upstream)
    target = f"{processor[0]}:{processor[1]}"
    middleware = ExtProcMiddleware(relay, ext_proc, stats=stats, processor=target, **options)
    try:
        with serving_wsgi(middleware) as address:
            yield address, middleware
    finally:
        relay.close()
