"""A small threaded WSGI server for :func:`extproc.processor.wsgi.wsgi_app`, with no dependency.

``extproc-processor --http`` runs it: the standard library's ``wsgiref`` with a bounded pool of
threads, one connection (one POST: ``wsgiref`` speaks HTTP/1.0 and closes after each) per
thread. ``wsgiref`` leaves a ``transfer-encoding: chunked`` body undecoded, and Envoy sends its
POSTs chunked, so the handler de-chunks it first. gunicorn is the production answer.
"""

from __future__ import annotations

import io
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from extproc.processor.targets import ProcessorSource
from extproc.processor.wsgi import MAX_BODY_BYTES, wsgi_app

_MAX_LINE = 4096


class _BadChunks(Exception):
    pass


def _dechunk(rfile: io.BufferedIOBase) -> bytes:
    body = bytearray()
    while True:
        line = rfile.readline(_MAX_LINE)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as err:
            raise _BadChunks(f"bad chunk size line {line[:40]!r}") from err
        if size == 0:
            break
        if len(body) + size > MAX_BODY_BYTES:
            raise _BadChunks("request body too large")
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.readline(_MAX_LINE).strip():
            raise _BadChunks("truncated chunk")
        body += chunk
    # Trailers, up to the blank line that ends the message.
    while rfile.readline(_MAX_LINE).strip():
        pass
    return bytes(body)


class _Handler(WSGIRequestHandler):
    _body_length: int | None = None

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if "chunked" not in self.headers.get("transfer-encoding", "").lower():
            return True
        try:
            body = _dechunk(self.rfile)
        except _BadChunks as err:
            self.send_error(400, str(err))
            return False
        # handle() reads the body from self.rfile after this: give it the decoded one. The
        # connection closes after this one request, so nothing else is read from the socket.
        self.rfile = io.BytesIO(body)
        self._body_length = len(body)
        return True

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        if self._body_length is not None:
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            environ["CONTENT_LENGTH"] = str(self._body_length)
        return environ

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        # One access line per event POST would drown the processor's own logs.
        return


class _PooledServer(ThreadingMixIn, WSGIServer):
    """``wsgiref`` on a fixed pool of threads, so ``workers`` bounds the POSTs served at once."""

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, workers: int):
        self.address_family = family
        self._pool = futures.ThreadPoolExecutor(max_workers=workers)
        self._pending: set[futures.Future[None]] = set()
        self._pending_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        future = self._pool.submit(self.process_request_thread, request, client_address)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: futures.Future[None]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def drain(self, grace: float | None) -> None:
        """Let the POSTs under way finish within ``grace`` seconds, then stop the pool."""
        with self._pending_lock:
            pending = set(self._pending)
        futures.wait(pending, timeout=grace)
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class RunningHttpServer:
    """A started HTTP processor server; ``stop`` it (or use it as a context manager)."""

    server: _PooledServer
    port: int
    thread: threading.Thread

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new connections, let open POSTs finish within ``grace``, close the socket."""
        self.server.shutdown()
        self.server.drain(grace)
        self.server.server_close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; False if ``timeout`` passed first."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def __enter__(self) -> RunningHttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def serve_http(
    processor: ProcessorSource | str, address: str, *, workers: int = 16
) -> RunningHttpServer:
    """Start serving ``processor`` (what :func:`wsgi_app` takes) over HTTP on ``address``
    ("127.0.0.1:0" picks a port).

    ``[::]:PORT`` listens on every interface. Raises RuntimeError if the address cannot be bound.
    """
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = _PooledServer((host, int(port)), family, workers)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot listen on {address}: {err}") from err
    server.set_app(wsgi_app(processor))
    thread = threading.Thread(target=server.serve_forever, name="extproc-http", daemon=True)
    thread.start()
    return RunningHttpServer(server, server.server_address[1], thread)
