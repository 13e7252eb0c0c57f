"""ext_proc as WSGI middleware: ``ExtProcMiddleware(app, config)`` around any PEP 3333 app.

The same :class:`extproc.core.exchange.Exchange` as the proxy decides everything; this module
only translates WSGI to its events and its actions back to WSGI, as ``extproc.io.driver`` does
for sockets:

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
  (:func:`extproc.io.session.record_request`).

What WSGI cannot carry: trailers (none come in; response trailers are dropped), a message
deadline while blocked reading ``wsgi.input`` or the app's iterable (it is checked after each
piece), and a local reply after the first response body piece went out (Envoy resets the
stream; here the iterable raises, so the server aborts the connection). Before that piece, the
server has not sent the head, and the local reply replaces it.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from extproc.config import (
    Overrides,
    ProcessorSettings,
    ProxyConfig,
    Route,
    build_config,
    load_file,
    parse_file_data,
)
from extproc.core import attributes, wire
from extproc.core.events import (
    Action,
    BodyReceived,
    Direction,
    ForwardBody,
    ForwardHeaders,
    HeadersReceived,
    RespondFromProxy,
    RespondLocally,
)
from extproc.core.exchange import Exchange
from extproc.core.settings import ExchangeSettings
from extproc.io.processor import ProcessorClient
from extproc.io.request_ids import new_request_id
from extproc.io.session import ProcessorSession, RequestFacts, record_request
from extproc.metrics import Stats
from extproc.models import Header, Headers

__all__ = ["ExtProcMiddleware", "WsgiConfig"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Callable[[bytes], object]]

READ_SIZE = 64 * 1024

# build_config wants a listener and an upstream; WSGI has neither, so these are never used.
_NO_LISTEN = "127.0.0.1:0"
_NO_UPSTREAM = "127.0.0.1:1"


class ExchangeAborted(Exception):
    """The response cannot be completed (a local reply after its head went out)."""


class RequestStopped(ExchangeAborted):
    """Raised to the app reading wsgi.input: ext_proc answered the request (an immediate
    response, an error, a body over the limit), so the rest of the body will not come. The
    app's answer, if it makes one, is dropped for ext_proc's."""


@dataclass(frozen=True, slots=True)
class WsgiConfig:
    """The ext_proc filter settings and processor of a middleware; per-path routes too."""

    exchange: ExchangeSettings
    processor: ProcessorSettings
    routes: tuple[Route, ...] = ()
    # ExternalProcessor.stat_prefix: the ext_proc stats are http.ingress.ext_proc.<it>.*
    stat_prefix: str = ""

    @classmethod
    def from_proxy_config(cls, config: ProxyConfig) -> WsgiConfig:
        return cls(config.exchange, config.processor, config.routes, config.stat_prefix)

    @classmethod
    def from_dict(
        cls, ext_proc: dict[str, Any], processor: str | None = None, **overrides: Any
    ) -> WsgiConfig:
        """Any of the config file's three shapes as a dict; ``processor`` and ``overrides``
        (:class:`extproc.config.Overrides` fields) as the CLI's flags."""
        return cls._build(parse_file_data(ext_proc), processor, overrides)

    @classmethod
    def from_file(
        cls, path: str | Path, processor: str | None = None, **overrides: Any
    ) -> WsgiConfig:
        return cls._build(load_file(Path(path)), processor, overrides)

    @classmethod
    def _build(cls, file: Any, processor: str | None, overrides: dict[str, Any]) -> WsgiConfig:
        # The proxy's builder, so validation, defaults and error messages are the same;
        # listen and upstream only satisfy it.
        flags = Overrides(
            listen=_NO_LISTEN, upstream=_NO_UPSTREAM, processor=processor, **overrides
        )
        return cls.from_proxy_config(build_config(file, flags))

    def for_path(self, path: bytes) -> tuple[ExchangeSettings, ProcessorSettings]:
        for route in self.routes:
            if path.startswith(route.prefix):
                return route.exchange, route.processor
        return self.exchange, self.processor


class ExtProcMiddleware:
    """Wraps a WSGI app; each request runs one ext_proc exchange with the processor.

    Each request ends in the proxy's access-log line (structlog logger ``extproc.access``)
    and is counted in :attr:`stats`, the proxy's :class:`~extproc.metrics.Stats` (Envoy's
    ext_proc counters): pass one to share it, e.g. with an admin endpoint of the host's.
    """

    def __init__(
        self, app: WsgiApp, config: WsgiConfig | ProxyConfig, *, stats: Stats | None = None
    ) -> None:
        if isinstance(config, ProxyConfig):
            config = WsgiConfig.from_proxy_config(config)
        self.app = app
        self.config = config
        self.stats = stats if stats is not None else Stats(config.stat_prefix)
        self._lock = threading.Lock()
        self._clients: dict[ProcessorSettings, ProcessorClient] = {}
        self._pid = os.getpid()

    def processor(self, settings: ProcessorSettings) -> ProcessorClient:
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
                client = self._clients[settings] = ProcessorClient(settings)
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

BodyPiece = tuple[bytes, bool]


class _Run:
    """One request's exchange, driven like the proxy's ``_RequestRun``."""

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
        self.target = target
        self.method = headers.get(b":method") or b"GET"
        self.exchange = Exchange(settings, _connection(environ))
        self.client: ProcessorClient | None = None
        self.session = ProcessorSession(self.exchange, self._client, self._forward)
        self.local: RespondLocally | None = None
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
        self.started = time.monotonic()
        self.status = 0  # sent to the server's start_response
        self.bytes_in = 0
        self.bytes_out = 0
        self.app_time = 0.0  # calling the app, until its start_response

    # The request phase ----------------------------------------------------------------

    def run_request(self) -> None:
        length = _content_length(self.environ)
        # A chunked body is readable to its end only where the server says so (gunicorn).
        chunked = "chunked" in str(self.environ.get("HTTP_TRANSFER_ENCODING", "")).lower() and bool(
            self.environ.get("wsgi.input_terminated")
        )
        has_body = bool(length) or chunked
        self.input_left = length if not chunked else None
        self.session.feed(HeadersReceived(Direction.REQUEST, self.request, not has_body))
        # Until the head can go to the app; the body then streams to it as it reads.
        while self.request_head is None and self._request_step():
            pass

    def _request_step(self) -> bool:
        if self.proxy_response is not None:
            return False  # the proxy answers (413): the app gets no more of the body
        return self._step(Direction.REQUEST, self._read_input)

    def _step(self, direction: Direction, read: Callable[[], BodyPiece]) -> bool:
        """One turn of a direction: read a piece, or wait for the processor; False once the
        direction has nothing more to do."""
        if not self._going(direction):
            return False
        # Replies first: the next piece may be slow to come (the client's upload, the app's
        # stream of events) and what is already read, or the head the app waits for, must
        # not wait for it.
        self.session.turn(direction, lambda: self._read_into(direction, read), reply_first=True)
        return True

    def read_body(self, size: int, line: bool = False) -> bytes:
        """Up to ``size`` bytes (all when negative; up to a newline with ``line``) of the
        body as forwarded: what wsgi.input reads, pulled through the exchange on demand."""
        body = self.request_body
        while (
            (size < 0 or len(body) < size) and not (line and b"\n" in body) and self._request_step()
        ):
            pass
        if self.local is not None or self.proxy_response is not None:
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
        while self._request_step():
            pass

    def _read_input(self) -> BodyPiece:
        size = READ_SIZE if self.input_left is None else min(READ_SIZE, self.input_left)
        data: bytes = self.environ["wsgi.input"].read(size) if size else b""
        self.bytes_in += len(data)
        if self.input_left is not None:
            if size and not data:
                raise ExchangeAborted("the client closed before sending the whole body")
            self.input_left -= len(data)
            return data, self.input_left == 0
        return data, not data

    def app_environ(self) -> dict[str, Any]:
        head = self.request_head
        assert head is not None
        environ = environ_with(self.environ, head.headers)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input"] = RequestInput(self)
        # Framed as the proxy frames it upstream (wire.request_to_wire): a length when it is
        # known, else the input reads to its end; a bodiless request keeps only a length 0.
        environ["wsgi.input_terminated"] = not head.end_of_stream
        if head.end_of_stream:
            if "CONTENT_LENGTH" in environ:
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
            if self.local is None and self.proxy_response is None:
                raise
        finally:
            self.app_time = time.monotonic() - started
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
        if self.local is None and self.proxy_response is None:
            self.call_app()
        if self.local is None and self.proxy_response is not None:
            # The proxy's own reply (413) replaces whatever the app answered.
            self._close_app()
            status, body = self.proxy_response
            head = [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")]
            self.app_written, self.app_iter = [body], None
            self.app_status = (status, head)
        if self.local is None:
            assert self.app_status is not None
            status, head = self.app_status
            allowed = wire.response_may_have_body(status, self.method)
            length = wire.response_body_length(head) if allowed else 0
            headers = wire.response_from_wire(status, head)
            self.session.feed(
                HeadersReceived(Direction.RESPONSE, headers, not allowed or length == 0)
            )
            while self._step(Direction.RESPONSE, self._read_app):
                yield from self._drain_out()
            yield from self._drain_out()
        if self.local is not None:
            yield from self._reply_locally(self.local)

    def _read_app(self) -> BodyPiece:
        if self.app_written:
            return self.app_written.pop(0), False
        if self.app_iter is None:
            return b"", True
        for data in self.app_iter:
            if data:
                return bytes(data), False
        return b"", True

    def _drain_out(self) -> Iterator[bytes]:
        while self.out:
            data = self.out.popleft()
            self.bytes_out += len(data)
            yield data

    def _reply_locally(self, reply: RespondLocally) -> Iterator[bytes]:
        aborted = ExchangeAborted(f"local reply after the response started: {reply.details}")
        if self.bytes_out:
            raise aborted
        allowed = wire.response_may_have_body(reply.status, self.method)
        # The server sends the head with the first body piece: until then start_response
        # may replace it (with exc_info, PEP 3333), so the local reply still goes out whole,
        # where the proxy, its head already on the wire, can only reset.
        exc_info = (type(aborted), aborted, None) if self.head_sent else None
        self._send_head(reply.headers, len(reply.body) if allowed else 0, allowed, exc_info)
        if allowed and reply.body:
            self.bytes_out += len(reply.body)
            yield reply.body

    def _send_head(
        self, headers: Headers, length: int | None, allowed: bool, exc_info: Any = None
    ) -> None:
        status, reason, wire_headers = wire.response_to_wire(headers, length, allowed)
        self.status = status
        self.start_response(
            f"{status} {reason.decode()}".strip(),
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in wire_headers],
            exc_info,
        )
        self.head_sent = True

    # The exchange loop, as extproc.io.driver's --------------------------------------------

    def _going(self, direction: Direction) -> bool:
        """Whether the direction still has work: input is read to its end even once the
        output is done, so a replaced body is drained (as in the proxy)."""
        ex = self.exchange
        return self.local is None and (not ex.output_done(direction) or ex.wants_input(direction))

    def _read_into(self, direction: Direction, read: Callable[[], BodyPiece]) -> None:
        if self.session.time_left() <= 0:
            self.session.wait_reply(0)  # the message deadline passed: a reply now, or the timeout
            return
        # A blocking read: WSGI gives no way to bound it, the deadline is checked after it.
        data, eos = read()
        self.session.feed(BodyReceived(direction, data, eos))
        while self.local is None and self.session.replies_ready():
            self.session.wait_reply(0)

    def _client(self) -> ProcessorClient:
        self.client = self.mw.processor(self.target)
        return self.client

    def _forward(self, action: Action) -> None:
        """The exchange's actions for the HTTP side (the session keeps the processor's)."""
        if isinstance(action, ForwardHeaders):
            self._forward_headers(action)
        elif isinstance(action, ForwardBody):
            self._forward_body(action)
        elif isinstance(action, RespondLocally):
            self.local = action
        elif isinstance(action, RespondFromProxy):
            self.proxy_response = (action.status, action.body)
        # ForwardTrailers: WSGI has no trailers to carry them (see the module docstring).

    def _forward_headers(self, action: ForwardHeaders) -> None:
        if action.direction is Direction.RESPONSE:
            allowed = wire.response_may_have_body(
                int(action.headers.get(b":status") or b"502"), self.method
            )
            length = 0 if action.end_of_stream and allowed else action.body_length
            self._send_head(action.headers, length, allowed)
            return
        method = action.headers.get(b":method") or b""
        if not wire.request_line_is_valid(method, action.headers.get(b":path") or b""):
            # What the proxy answers when a processor's :method or :path could not go on a
            # request line: the app, like the proxy's upstream, never sees it.
            self.proxy_response = (503, wire.UPSTREAM_RESET + b"connection termination")
            return
        for namespace, header in self.exchange.settings.metadata_headers:
            value = self.exchange.metadata_json(namespace)
            if value is not None:
                action.headers.set(header, value.encode())
        self.request_head = action
        self.method = action.headers.get(b":method") or self.method

    def _forward_body(self, action: ForwardBody) -> None:
        if action.direction is Direction.REQUEST:
            if self.app_reading:
                self.request_body += action.data
        elif action.data:
            self.out.append(action.data)

    def finish(self) -> None:
        """Release what the request held; idempotent, called from the iterable's close()."""
        if self.finished:
            return
        self.finished = True
        try:
            self._close_app()
        finally:
            if self.exchange.observing and self.client is not None:
                self.session.close_later(self.client)
            self.session.close()
            self._record()

    def _close_app(self) -> None:
        result, self.app_result = self.app_result, None
        close = getattr(result, "close", None)
        if close is not None:
            close()

    def _record(self) -> None:
        proxy_status = self.proxy_response[0] if self.proxy_response is not None else None
        record_request(
            self.mw.stats,
            self.session,
            RequestFacts(
                method=self.request.get(b":method") or b"GET",
                path=self.request.get(b":path") or b"/",
                status=self.status,
                request_id=self.request.get(b"x-request-id") or b"",
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                started=self.started,
                upstream_time=self.app_time,
                upstream_answered=self.app_status is not None and proxy_status is None,
                local_reply=self.local is not None,
                request_too_large=proxy_status == 413,
            ),
        )


class RequestInput:
    """wsgi.input for the app: the request body as ext_proc forwards it, pulled through the
    exchange as the app reads, so a streamed body is never held whole (PEP 3333 stream)."""

    def __init__(self, run: _Run) -> None:
        self._run = run

    def read(self, size: int | None = -1) -> bytes:
        return self._run.read_body(-1 if size is None else size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._run.read_body(-1 if size is None else size, line=True)

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


def _connection(environ: Mapping[str, Any]) -> attributes.Connection:
    def port(key: str) -> int:
        value = str(environ.get(key) or "")
        return int(value) if value.isdigit() else 0

    return attributes.Connection(
        source=(str(environ.get("REMOTE_ADDR", "")), port("REMOTE_PORT")),
        destination=(str(environ.get("SERVER_NAME", "")), port("SERVER_PORT")),
        protocol=str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")),
        start=datetime.datetime.now(datetime.UTC),
    )
