"""A small echo upstream for the demo and the tests: it answers with what it received.

Each response is JSON: the method, target, headers (in order, repeated ones kept), body and
trailers of the request. Query parameters shape the reply: ``status=NNN`` sets the status,
``chunked=1`` sends the body chunked with an ``x-echo-trailer`` trailer, ``size=N`` replaces the
JSON by N bytes of a repeating pattern (:func:`pattern`), written in ``writes=K`` separate
socket writes. Every request is also kept in :attr:`EchoUpstream.requests` for tests.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from extproc.io.http1 import Http1Connection

_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]]
    connection: int

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class EchoUpstream:
    """A threaded HTTP/1.1 echo server on ``host``, port 0 unless told otherwise."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self._connections = 0
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> EchoUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> EchoUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            connection = self._connections
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Http1Connection(sock, h11.SERVER, max_head_bytes=256 * 1024)
        try:
            while self._serve_one(conn, connection):
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            conn.close()

    def _serve_one(self, conn: Http1Connection, connection: int) -> bool:
        event = conn.next_event(_TIMEOUT)
        if not isinstance(event, h11.Request):
            return False
        body = bytearray()
        while True:
            part = conn.next_event(_TIMEOUT)
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                trailers = _strs(part.headers)
                break
            else:
                return False
        received = ReceivedRequest(
            method=event.method.decode(),
            target=event.target.decode("latin-1"),
            headers=_strs(event.headers),
            body=bytes(body),
            trailers=trailers,
            connection=connection,
        )
        with self._lock:
            self.requests.append(received)
        self._reply(conn, received)
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    def _reply(self, conn: Http1Connection, received: ReceivedRequest) -> None:
        query = parse_qs(urlsplit(received.target).query)
        status = int(query.get("status", ["200"])[0])
        chunked = query.get("chunked", ["0"])[0] == "1"
        writes = int(query.get("writes", ["1"])[0])
        if "size" in query:
            data = pattern(int(query["size"][0]))
        else:
            payload: dict[str, Any] = {
                "method": received.method,
                "target": received.target,
                "headers": received.headers,
                "body": received.body.decode("utf-8", "replace"),
                "trailers": received.trailers,
            }
            data = json.dumps(payload, indent=1).encode() + b"\n"
        headers = [
            (b"content-type", b"application/json"),
            (b"x-echo-connection", str(received.connection).encode()),
        ]
        if status in (204, 304):
            data = b""
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            headers.append((b"content-length", str(len(data)).encode()))
        if received.method == "HEAD":
            data = b""
        conn.send(h11.Response(status_code=status, headers=headers), _TIMEOUT)
        step = -(-len(data) // writes) if data else 0
        for start in range(0, len(data), step or 1):
            conn.send(h11.Data(data=data[start : start + step]), _TIMEOUT)
        trailers = [(b"x-echo-trailer", b"done")] if chunked and data else []
        conn.send(h11.EndOfMessage(headers=trailers), _TIMEOUT)


def pattern(size: int) -> bytes:
    """``size`` bytes of a repeating, position-revealing pattern."""
    unit = b"0123456789abcdef"
    return (unit * (size // len(unit) + 1))[:size]


def _strs(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
