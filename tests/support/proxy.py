"""Run extproc in the test process, and talk HTTP/1.1 to it over real sockets."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h11

from extproc.config import FileConfig, build_config, parse_file_data
from extproc.io.server import ProxyServer

TIMEOUT = 10.0


@contextmanager
def running_proxy(
    upstream: tuple[str, int],
    processor: str | None,
    *,
    ext_proc: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[ProxyServer]:
    """extproc on 127.0.0.1:0 in front of ``upstream``, with ``ext_proc`` as its filter and
    ``options`` as its flags (extproc.options names).

    Envoy's 200 ms message timeout is too short for a loaded test machine: unless the test
    sets one, the processor gets 10 s.
    """
    filter_dict = (ext_proc or {}).get("ext_proc", ext_proc or {})
    if "message_timeout" not in options and not filter_dict.get("message_timeout"):
        options["message_timeout"] = "10s"
    file: FileConfig | None = parse_file_data(ext_proc) if ext_proc is not None else None
    given = {
        "listen": "127.0.0.1:0",
        "upstream": f"{upstream[0]}:{upstream[1]}",
        "processor": processor,
        **options,
    }
    server = ProxyServer(build_config(file, given)).start()
    try:
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]]
    http_version: bytes = b"1.1"

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    def header_names(self) -> list[str]:
        return [n for n, _ in self.headers]


class Client:
    """A keep-alive HTTP/1.1 client on one socket, built on h11."""

    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | list[bytes] | None = None,
        trailers: list[tuple[str, str]] | None = None,
    ) -> Reply:
        """Send one request; a list body goes chunked (with ``trailers``), bytes with a length."""
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "example.com"), *(headers or [])]
        if isinstance(body, list):
            all_headers.append(("transfer-encoding", "chunked"))
        elif body is not None:
            all_headers.append(("content-length", str(len(body))))
        self._send(h11.Request(method=method, target=target, headers=all_headers))
        for chunk in body if isinstance(body, list) else [body] if body else []:
            self._send(h11.Data(data=chunk))
        self._send(h11.EndOfMessage(headers=trailers or []))
        return self.read_reply()

    def read_reply(self) -> Reply:
        response = self._next(h11.Response)
        body = bytearray()
        while True:
            event = self._next(None)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Reply(
                    response.status_code,
                    _strs(response.headers),
                    bytes(body),
                    _strs(event.headers),
                    response.http_version,
                )
            else:
                raise AssertionError(f"unexpected {event!r}")

    def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.sock.sendall(data)

    def _next(self, kind: type | None) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            if kind is h11.Response and isinstance(event, h11.InformationalResponse):
                continue
            if kind is not None and not isinstance(event, kind):
                raise AssertionError(f"expected {kind.__name__}, got {event!r}")
            return event


def request(address: tuple[str, int], method: str = "GET", target: str = "/", **kw: Any) -> Reply:
    with Client(address) as client:
        return client.request(method, target, **kw)


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send raw bytes and read until the proxy closes the connection (or ``timeout``)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else 0


def _strs(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


REPO = Path(__file__).resolve().parents[2]
