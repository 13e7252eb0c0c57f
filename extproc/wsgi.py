"""ext_proc as WSGI middleware: ``ExtProcMiddleware(app, config)`` around any PEP 3333 app.

The same :class:`extproc.core.exchange.Exchange` as the proxy decides everything, run by the
proxy's own loop (:class:`extproc.io.request_loop.RequestLoop`); this module is only the loop's
HTTP side over WSGI, as ``extproc.io.driver`` is over sockets:

* the request phase runs until the exchange forwards the request head; the app is then
  called, and its ``wsgi.input`` (:class:`RequestInput`) pulls the body through the exchange
  as the app reads, so NONE, STREAMED and FULL_DUPLEX_STREAMED bodies stream into the app
  (BUFFERED ones come whole, as upstream). What the app leaves unread still goes through the
  exchange when it returns, as the proxy reads a request to its end, and is dropped. The app
  gets CONTENT_LENGTH when the proxy would send a Content-Length upstream, else none, with
  ``wsgi.input_terminated``;
* the response phase runs inside the iterable returned to the server, so ``start_response`` is
  called only once the exchange releases the head, and body pieces are yielded as the exchange
  forwards them (NONE and STREAMED stay streaming; BUFFERED holds the body, as in Envoy);
* each request ends in the proxy's access-log line and stats
  (:meth:`extproc.io.request_loop.RequestLoop.finish`).

What WSGI cannot carry: trailers (none come in; response trailers are dropped), a message
deadline while blocked reading ``wsgi.input`` or the app's iterable (it is checked after each
piece), and a local reply after the first response body piece went out (Envoy resets the
stream; here the iterable raises, so the server aborts the connection). Before that piece, the
server has not sent the head, and the local reply replaces it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from extproc.config import (
    FileConfig,
    FilterConfig,
    ProcessorSettings,
    ProxyConfig,
    build_filter,
    load_file,
    parse_file_data,
    resolve_options,
)
from extproc.core import attributes, wire
from extproc.core.events import (
    Direction,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    RespondLocally,
)
from extproc.core.record import RequestRecord
from extproc.core.settings import ExchangeSettings
from extproc.errors import ConfigError, ExchangeAborted, RequestStopped
from extproc.io.clients import Client, open_client
from extproc.io.request_ids import new_request_id
from extproc.io.request_loop import BodyPiece, open_loop, wall_clock
from extproc.metrics import Stats
from extproc.models import Header, Headers
from extproc.options import SPECS, Scope, flag_name

__all__ = ["ExtProcMiddleware", "filter_config"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Callable[[bytes], object]]

READ_SIZE = 64 * 1024

WsgiSource = str | os.PathLike[str] | Mapping[str, Any] | FilterConfig | ProxyConfig | None


def filter_config(source: WsgiSource, options: Mapping[str, Any]) -> FilterConfig:
    """The middleware's filter from a config file's path, a dict of any of the file's three
    shapes, a built configuration, or nothing (then the options say it all); ``options`` are
    the proxy's flags by name, read with the environment and the file as the proxy reads them.
    The options of a listener, an upstream or the command are refused: WSGI has none."""
    if isinstance(source, (FilterConfig, ProxyConfig)):
        if options:
            raise ConfigError(flag_name(next(iter(options))), "cannot change a built config")
        return source if isinstance(source, FilterConfig) else source.filter
    for name in options:
        if name in SPECS and SPECS[name].scope is not Scope.FILTER:
            raise ConfigError(
                flag_name(name),
                "is not an option of the WSGI middleware (it has no listener,"
                " upstream or command line)",
            )
    file: FileConfig | None = None
    if isinstance(source, (str, os.PathLike)):
        file = load_file(Path(source))
    elif source is not None:
        file = parse_file_data(source)
    return build_filter(file, resolve_options(file, options, None, frozenset({Scope.FILTER})))


class ExtProcMiddleware:
    """Wraps a WSGI app; each request runs one ext_proc exchange with the processor.

    Each request ends in the proxy's access-log line (structlog logger ``extproc.access``)
    and is counted in :attr:`stats`, the proxy's :class:`~extproc.metrics.Stats` (Envoy's
    ext_proc counters): pass one to share it, e.g. with an admin endpoint of the host's.
    """

    def __init__(
        self,
        app: WsgiApp,
        config: WsgiSource = None,
        /,
        *,
        stats: Stats | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        self.config = filter_config(config, options)
        self.stats = stats if stats is not None else Stats(self.config.stat_prefix)
        self._lock = threading.Lock()
        self._clients: dict[ProcessorSettings, Client] = {}
        self._pid = os.getpid()

    def processor(self, settings: ProcessorSettings) -> Client:
        """The process's channel to ``settings``, created on first use.

        Lazily, because pre-forking servers (gunicorn) import the app in the master: a gRPC
        channel must not cross a fork, so each worker makes its own.
        """
        with self._lock:
            if self._pid != os.getpid():
                # Inherited from the parent through fork: unusable here, and not ours to close.
                self._clients, self._pid = {}, os.getpid()
            client = self._clients.get(settings)
            if client is None:
                client = self._clients[settings] = open_client(settings)
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = request_headers(environ)
        settings, target = self.config.for_path(headers.get(b":path") or b"/")
        return _Response(_Run(self, environ, start_response, headers, settings, target))


# Environ <-> headers ---------------------------------------------------------------------

_SPECIAL = {"CONTENT_TYPE": b"content-type", "CONTENT_LENGTH": b"content-length"}


def environ_wire_headers(environ: Mapping[str, Any]) -> list[Header]:
    """The request's headers as the server received them: PEP 3333 keeps them as ``HTTP_*``
    keys, Content-Type and Content-Length apart."""
    wire_headers: list[Header] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].lower().replace("_", "-").encode("latin-1")
        elif key in _SPECIAL and value:
            name = _SPECIAL[key]
        else:
            continue
        wire_headers.append((name, str(value).encode("latin-1")))
    return wire_headers


def request_target(environ: Mapping[str, Any]) -> str:
    """The request-target, rebuilt from SCRIPT_NAME, PATH_INFO and QUERY_STRING (PEP 3333's
    URL reconstruction)."""
    path = quote(
        environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
        safe="/;=,@:!$&'()*+~",
        encoding="latin-1",
    )
    query = environ.get("QUERY_STRING", "")
    return (path or "/") + (f"?{query}" if query else "")


def request_headers(environ: Mapping[str, Any]) -> Headers:
    """The request as the processor sees it, through the proxy's own ingress rules."""
    wire_headers = environ_wire_headers(environ)
    if not any(name == b"host" for name, _ in wire_headers):
        host = f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        wire_headers.insert(0, (b"host", host.encode("latin-1")))
    target = request_target(environ)
    options = wire.IngressOptions(
        scheme=str(environ.get("wsgi.url_scheme", "http")).encode(),
        # The WSGI server is the edge and sets REMOTE_ADDR itself; nothing to forward.
        forwarded_for=False,
        new_request_id=new_request_id,
    )
    return wire.request_from_wire(
        str(environ.get("REQUEST_METHOD", "GET")).encode("latin-1"),
        target.encode("latin-1"),
        wire_headers,
        str(environ.get("REMOTE_ADDR", "")),
        options,
    )


def environ_with(environ: Mapping[str, Any], headers: Headers) -> dict[str, Any]:
    """A copy of ``environ`` carrying the (mutated) request ``headers``."""
    out = {k: v for k, v in environ.items() if not k.startswith("HTTP_") and k not in _SPECIAL}
    out["REQUEST_METHOD"] = (headers.get(b":method") or b"GET").decode("latin-1")
    authority = headers.get(b":authority")
    if authority:
        out["HTTP_HOST"] = authority.decode("latin-1")
    path, _, query = (headers.get(b":path") or b"/").partition(b"?")
    path_info = unquote_to_bytes(path).decode("latin-1")
    script = str(environ.get("SCRIPT_NAME", ""))
    if script and (path_info == script or path_info.startswith(script + "/")):
        path_info = path_info[len(script) :]
    else:
        out["SCRIPT_NAME"] = "" if script else out.get("SCRIPT_NAME", "")
    out["PATH_INFO"] = path_info
    out["QUERY_STRING"] = query.decode("latin-1")
    for name, value in headers.regular():
        text = value.decode("latin-1")
        if name == b"host":
            continue
        if name == b"content-type":
            out["CONTENT_TYPE"] = text
        elif name == b"content-length":
            out["CONTENT_LENGTH"] = text
        else:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            # Repeated headers fold into one value, as WSGI servers fold them.
            sep = "; " if name == b"cookie" else ","
            out[key] = f"{out[key]}{sep}{text}" if key in out else text
    return out


# One request -----------------------------------------------------------------------------


class _Run:
    """One request: the middleware's :class:`~extproc.io.request_loop.HttpSide` over the
    app's environ, its ``wsgi.input`` and its iterable."""

    def __init__(
        self,
        middleware: ExtProcMiddleware,
        environ: dict[str, Any],
        start_response: StartResponse,
        headers: Headers,
        settings: ExchangeSettings,
        target: ProcessorSettings,
    ) -> None:
        self.mw = middleware
        self.environ = environ
        self.start_response = start_response
        self.request = headers
        self.method = headers.get(b":method") or b"GET"
        # The request id from the start: a processor fault is logged with it as it happens.
        self.record = RequestRecord(
            started=time.monotonic(), request_id=headers.get(b"x-request-id") or b""
        )
        # Replies first: the next piece may be slow to come (the client's upload, the app's
        # stream of events) and what is already read, or the head the app waits for, must
        # not wait for it.
        self.loop = open_loop(
            settings,
            target,
            middleware,
            self,
            self.record,
            middleware.stats,
            self._connection,
            reply_first=True,
        )
        self.proxy_response: tuple[int, bytes] | None = None
        self.request_head: ForwardHeaders | None = None
        self.request_body = bytearray()  # forwarded, not yet read by the app
        self.app_reading = True  # False once the app returned: the rest is drained
        self.input_left: int | None = None
        self.out: deque[bytes] = deque()
        self.head_sent = False
        self.app_result: Iterable[bytes] | None = None
        self.app_iter: Iterator[bytes] | None = None
        self.app_status: tuple[int, list[Header]] | None = None
        self.app_written: list[bytes] = []
        self.finished = False

    def _connection(self) -> attributes.Connection:
        environ = self.environ

        def port(key: str) -> int:
            value = str(environ.get(key) or "")
            return int(value) if value.isdigit() else 0

        return attributes.Connection(
            source=(str(environ.get("REMOTE_ADDR", "")), port("REMOTE_PORT")),
            destination=(str(environ.get("SERVER_NAME", "")), port("SERVER_PORT")),
            protocol=str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")),
            start=wall_clock(self.record.started),
        )

    # The request phase ----------------------------------------------------------------

    def run_request(self) -> None:
        length = _content_length(self.environ)
        # A chunked body is readable to its end only where the server says so (gunicorn).
        chunked = "chunked" in str(self.environ.get("HTTP_TRANSFER_ENCODING", "")).lower() and bool(
            self.environ.get("wsgi.input_terminated")
        )
        has_body = bool(length) or chunked
        self.input_left = length if not chunked else None
        self.loop.begin(Direction.REQUEST, self.request, not has_body)
        # Until the head can go to the app; the body then streams to it as it reads.
        while self.request_head is None and self.loop.step(Direction.REQUEST):
            pass

    def read_forwarded(self, size: int, line: bool = False) -> bytes:
        """Up to ``size`` bytes (all when negative; up to a newline with ``line``) of the
        body as forwarded: what wsgi.input reads, pulled through the exchange on demand."""
        body = self.request_body
        step = self.loop.step
        while (
            (size < 0 or len(body) < size)
            and not (line and b"\n" in body)
            and step(Direction.REQUEST)
        ):
            pass
        if self.loop.local is not None or self.proxy_response is not None:
            raise RequestStopped("the request was answered by ext_proc while the app read it")
        end = len(body) if size < 0 else min(size, len(body))
        if line and (newline := body.find(b"\n", 0, end)) >= 0:
            end = newline + 1
        data = bytes(body[:end])
        del body[:end]
        return data

    def finish_request(self) -> None:
        """The app is done with wsgi.input: the rest goes through the exchange (as the
        proxy reads a request to its end) and is dropped."""
        self.app_reading = False
        self.request_body.clear()
        self.loop.run(Direction.REQUEST)

    def _read_input(self) -> BodyPiece:
        size = READ_SIZE if self.input_left is None else min(READ_SIZE, self.input_left)
        data: bytes = self.environ["wsgi.input"].read(size) if size else b""
        if self.input_left is not None:
            if size and not data:
                raise ExchangeAborted("the client closed before sending the whole body")
            self.input_left -= len(data)
            return data, self.input_left == 0, None
        return data, not data, None

    def app_environ(self) -> dict[str, Any]:
        head = self.request_head
        assert head is not None
        environ = environ_with(self.environ, head.headers)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input"] = RequestInput(self)
        # Framed as the proxy frames it upstream (wire.request_to_wire): a length when it is
        # known, else the input reads to its end; a bodiless request keeps only a length 0,
        # and gets one if its method may have a body.
        environ["wsgi.input_terminated"] = not head.end_of_stream
        if head.end_of_stream:
            method = head.headers.get(b":method") or b""
            if "CONTENT_LENGTH" in environ or wire.may_have_body(method):
                environ["CONTENT_LENGTH"] = "0"
        elif head.body_length is not None:
            environ["CONTENT_LENGTH"] = str(head.body_length)
        else:
            environ.pop("CONTENT_LENGTH", None)
        return environ

    # The response phase ---------------------------------------------------------------

    def call_app(self) -> None:
        started = time.monotonic()
        try:
            self._call_app()
        except RequestStopped:
            if self.loop.local is None and self.proxy_response is None:
                raise
        finally:
            self.record.upstream_time = time.monotonic() - started
        self.finish_request()

    def _call_app(self) -> None:
        result = self.mw.app(self.app_environ(), self._app_start_response)
        self.app_result = result
        self.app_iter = iter(result)
        first: list[bytes] = []
        while self.app_status is None:
            # PEP 3333 lets the app call start_response as late as its first iteration.
            try:
                first.append(next(self.app_iter))
            except StopIteration:
                break
        if self.app_status is None:
            raise RuntimeError("the WSGI app did not call start_response")
        self.app_written += first

    def _app_start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and self.head_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        code = int(status.split(" ", 1)[0])
        self.app_status = (
            code,
            [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        )
        return self.app_written.append  # the legacy write(): its data precedes the iterable

    def response(self) -> Iterator[bytes]:
        loop = self.loop
        if loop.local is None and self.proxy_response is None:
            self.call_app()
        if loop.local is None and self.proxy_response is not None:
            # The proxy's own reply (413) replaces whatever the app answered.
            self._close_app()
            status, body = self.proxy_response
            head = [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")]
            self.app_written, self.app_iter = [body], None
            self.app_status = (status, head)
        if loop.local is None:
            assert self.app_status is not None
            status, head = self.app_status
            allowed = wire.response_may_have_body(status, self.method)
            length = wire.response_body_length(head) if allowed else 0
            headers = wire.response_from_wire(status, head)
            loop.begin(Direction.RESPONSE, headers, not allowed or length == 0)
            while loop.step(Direction.RESPONSE):
                yield from self._drain_out()
            yield from self._drain_out()
        if loop.answer():
            yield from self._drain_out()

    def _read_app(self) -> BodyPiece:
        if self.app_written:
            return self.app_written.pop(0), False, None
        if self.app_iter is None:
            return b"", True, None
        for data in self.app_iter:
            if data:
                return bytes(data), False, None
        return b"", True, None

    def _drain_out(self) -> Iterator[bytes]:
        while self.out:
            data = self.out.popleft()
            self.record.bytes_out += len(data)
            yield data

    # HttpSide ---------------------------------------------------------------------------

    @property
    def responding_from_proxy(self) -> bool:
        return self.proxy_response is not None

    def read_body(self, direction: Direction, limit: float) -> BodyPiece:
        # A blocking read: WSGI gives no way to bound it, the deadline is checked after it.
        return self._read_input() if direction is Direction.REQUEST else self._read_app()

    def read_arrived(self, direction: Direction) -> BodyPiece | None:
        # Neither wsgi.input nor a generator can say what is there without blocking. A
        # request body of known length is taken as arrived (it comes with the request, and
        # every read of it blocks anyway); so is what the app already gave, and the rest of
        # an iterable it built whole (a list or a tuple). docs/embedding.md, WSGI middleware.
        if direction is Direction.REQUEST:
            return self._read_input() if self.input_left is not None else None
        if self.app_written or self.app_iter is None or isinstance(self.app_result, list | tuple):
            return self._read_app()
        return None

    def answer_locally(self, reply: RespondLocally) -> None:
        aborted = ExchangeAborted(f"local reply after the response started: {reply.details}")
        if self.record.bytes_out:
            raise aborted
        allowed = wire.response_may_have_body(reply.status, self.method)
        # The server sends the head with the first body piece: until then start_response
        # may replace it (with exc_info, PEP 3333), so the local reply still goes out whole,
        # where the proxy, its head already on the wire, can only reset.
        exc_info = (type(aborted), aborted, None) if self.head_sent else None
        self._send_head(reply.headers, len(reply.body) if allowed else 0, allowed, exc_info)
        if allowed and reply.body:
            self.out.append(reply.body)

    def _send_head(
        self, headers: Headers, length: int | None, allowed: bool, exc_info: Any = None
    ) -> None:
        status, reason, wire_headers = wire.response_to_wire(headers, length, allowed)
        self.record.status = status
        self.start_response(
            f"{status} {reason.decode()}".strip(),
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in wire_headers],
            exc_info,
        )
        self.head_sent = True

    def respond_from_proxy(self, status: int, body: bytes, details: str) -> None:
        self.proxy_response = (status, body)
        self.record.details = details

    def forward_headers(self, action: ForwardHeaders) -> None:
        if action.direction is Direction.RESPONSE:
            allowed = wire.response_may_have_body(
                int(action.headers.get(b":status") or b"502"), self.method
            )
            length = 0 if action.end_of_stream and allowed else action.body_length
            self._send_head(action.headers, length, allowed)
            return
        self.request_head = action
        self.method = action.headers.get(b":method") or self.method

    def forward_body(self, action: ForwardBody) -> None:
        if action.direction is Direction.REQUEST:
            if self.app_reading:
                self.request_body += action.data
        elif action.data:
            self.out.append(action.data)

    def forward_trailers(self, action: ForwardTrailers) -> None:
        """WSGI has no trailers to carry them (see the module docstring): dropped."""

    def finish(self) -> None:
        """Release what the request held; idempotent, called from the iterable's close()."""
        if self.finished:
            return
        self.finished = True
        try:
            self._close_app()
        finally:
            record, request = self.record, self.request
            # The head as the exchange left it (the proxy logs the one it received).
            record.method = request.get(b":method") or b"GET"
            record.path = request.get(b":path") or b"/"
            record.request_id = request.get(b"x-request-id") or b""
            record.upstream_answered = self.app_status is not None and self.proxy_response is None
            self.loop.finish()

    def _close_app(self) -> None:
        result, self.app_result = self.app_result, None
        close = getattr(result, "close", None)
        if close is not None:
            close()


class RequestInput:
    """wsgi.input for the app: the request body as ext_proc forwards it, pulled through the
    exchange as the app reads, so a streamed body is never held whole (PEP 3333 stream)."""

    def __init__(self, run: _Run) -> None:
        self._run = run

    def read(self, size: int | None = -1) -> bytes:
        return self._run.read_forwarded(-1 if size is None else size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._run.read_forwarded(-1 if size is None else size, line=True)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class _Response:
    """What the server iterates; its close() always reaches the app's iterable."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._gen = self._generate()

    def _generate(self) -> Generator[bytes, None, None]:
        run = self._run
        run.run_request()
        yield from run.response()

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def close(self) -> None:
        try:
            self._gen.close()
        finally:
            self._run.finish()

    def __enter__(self) -> _Response:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _content_length(environ: Mapping[str, Any]) -> int | None:
    value = str(environ.get("CONTENT_LENGTH") or "").strip()
    return int(value) if value.isdigit() else None
