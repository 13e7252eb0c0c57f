"""The admin listener (``--admin``): Envoy's ``/stats`` and ``/ready``, and Prometheus ``/metrics``.

Small on purpose: the standard library's ThreadingHTTPServer on a thread of its own answers
the few GETs of operators and scrapers, a short-lived thread each. Replies are HTTP/1.0, so no
connection outlives its reply; a client that stalls is dropped after a timeout, and stopping
cuts the connections still open, so it joins every thread promptly.

| path | answer |
|---|---|
| ``/stats`` | Envoy's text (``?format=json``: Envoy's JSON; ``?filter=REGEX``) |
| ``/metrics``, ``/stats/prometheus`` | Prometheus text (OpenMetrics when asked for) |
| ``/ready`` | 200 ``LIVE`` while the proxy takes traffic, else 503 and its state |
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from extproc.addresses import Address
from extproc.metrics import Stats

log = structlog.get_logger("extproc.admin")

_TEXT = "text/plain; charset=UTF-8"
# A client gets this long to send its request line and headers.
_CLIENT_TIMEOUT = 5.0
# How often the serving loop looks for a stop request: the most stop() waits for it.
_POLL_INTERVAL = 0.1


class AdminServer:
    """Serves one proxy's stats and readiness; ``state`` names the proxy's state, as Envoy
    does (``LIVE``, ``INITIALIZING``, ``DRAINING``)."""

    def __init__(
        self,
        address: Address,
        stats: Stats,
        state: Callable[[], str],
        client_timeout: float = _CLIENT_TIMEOUT,
    ) -> None:
        """Binds ``address`` (OSError if taken); serving starts with :meth:`start`.
        ``client_timeout``: how long a client may take to send its request."""
        self._server = _Server(address, stats, state, client_timeout)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> AdminServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="extproc-admin",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        log.info("admin_listening", address=f"{host}:{port}")
        return self

    def close_inherited(self) -> None:
        """In a forked child: close its copy of the listening socket, which the parent keeps
        serving (the parent's thread is not in the child, so there is nothing to stop)."""
        self._server.socket.close()

    def stop(self) -> None:
        """Stop serving, close the socket, join every thread. Idempotent; also releases a
        listener that was never started."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.shutdown()
            thread.join()
        self._server.cut_connections()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(), so stop() leaves none behind.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self, address: Address, stats: Stats, state: Callable[[], str], client_timeout: float
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.stats = stats
        self.state = state
        self.client_timeout = client_timeout
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__((address.host, address.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's FQDN up (DNS), for a name nothing here uses.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints the traceback to stderr; a client gone mid-reply is routine.
        log.debug("admin_client_error", client=str(client_address), exc_info=True)

    def cut_connections(self) -> None:
        """End the connections still open: their handlers see the end of input and return."""
        with self._open_lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def version_string(self) -> str:
        return "extproc-admin"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.client_timeout)

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/stats":
            self._stats(query)
        elif url.path in ("/metrics", "/stats/prometheus"):
            body, content_type = self.server.stats.render_prometheus(self.headers.get("Accept", ""))
            self._reply(200, body, content_type)
        elif url.path == "/ready":
            state = self.server.state()
            self._reply(200 if state == "LIVE" else 503, f"{state}\n".encode(), _TEXT)
        else:
            self._reply(404, b"invalid path; admin paths: /stats /metrics /ready\n", _TEXT)

    def _stats(self, query: dict[str, str]) -> None:
        try:
            pattern = re.compile(query["filter"]) if "filter" in query else None
        except re.error as err:
            self._reply(400, f"Invalid regex: {err}\n".encode(), _TEXT)
            return
        stats = self.server.stats
        fmt = query.get("format", "text")
        if fmt == "text":
            self._reply(200, stats.render_envoy_stats(pattern).encode(), _TEXT)
        elif fmt == "json":
            self._reply(200, stats.render_envoy_json(pattern).encode(), "application/json")
        elif fmt == "prometheus":
            body, content_type = stats.render_prometheus(self.headers.get("Accept", ""))
            self._reply(200, body, content_type)
        else:
            self._reply(400, b"format: expected text, json or prometheus\n", _TEXT)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, max-age=0")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # http.server writes to stderr; admin traffic is debug detail beside the access log.
        log.debug("admin_request", client=self.client_address[0], message=format % args)
