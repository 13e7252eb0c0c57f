"""Runs HTTP exchanges on one downstream connection: h11 in, ext_proc exchange, upstream out.

The worker thread that owns a connection calls :meth:`ConnectionHandler.serve`. Each request's
exchange is run by :class:`extproc.io.request_loop.RequestLoop`; this module is its HTTP side
over sockets (``_RequestRun``): it reads the request body from the client and the response
from the upstream pool, writes what the loop forwards, and answers for a failed upstream.
Every read has a timeout: the client's or the upstream's, or the message deadline if sooner.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11

from extproc.config import ProcessorSettings, ProxyConfig
from extproc.core import attributes, wire
from extproc.core.events import (
    Direction,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    RespondLocally,
)
from extproc.core.record import RequestRecord
from extproc.errors import ClientBodyError, ExchangeAborted, UpstreamConnectError
from extproc.io.clients import Client
from extproc.io.http1 import Http1Connection
from extproc.io.request_ids import new_request_id
from extproc.io.request_loop import BodyPiece, open_loop, wall_clock
from extproc.io.upstream import UpstreamPool
from extproc.metrics import Stats
from extproc.models import Headers

# A request answered before its end (a local reply, a 413, a failed upstream) keeps its
# connection only if its end has been read when the reply's head goes out: Envoy's codec reads
# the rest while the reply is made, and closes the connection when it has not seen the end. The
# proxy reads the rest then, dropping it (never held), while it keeps coming: at most
# _DRAIN_BYTES, for at most _DRAIN_TIME (or the client timeout if shorter), each read waiting
# at most _DRAIN_GAP. A client that stops sending delays its reply by _DRAIN_GAP at most;
# past a bound, the reply says "connection: close" and the connection goes after it.
_DRAIN_BYTES = 4 * 1024 * 1024
_DRAIN_TIME = 2.0
_DRAIN_GAP = 0.25
# How long a worker keeps an idle keep-alive connection, when workers are to spare, before
# handing it back to the acceptor: a client's next request usually follows within a
# round trip, and serving it on the same thread saves two thread hand-offs and four syscalls.
KEEPALIVE_LINGER = 0.05


@dataclass(slots=True)
class Downstream:
    """One client connection, kept between requests (and while parked for keep-alive)."""

    conn: Http1Connection
    peer: tuple[str, int]
    local: tuple[str, int]
    id: int
    requests: int = 0
    # When the request head being read must be complete; None between requests.
    head_deadline: float | None = None

    @property
    def peer_ip(self) -> str:
        return self.peer[0]

    @classmethod
    def accept(cls, sock: socket.socket, peer: Any, max_head_bytes: int) -> Downstream:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Http1Connection(sock, h11.SERVER, max_head_bytes=max_head_bytes)
        local = sock.getsockname()
        return cls(conn, _host_port(peer), _host_port(local), next(_connection_ids))


_connection_ids = itertools.count(1)


def _host_port(address: Any) -> tuple[str, int]:
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    return "", 0


@dataclass(frozen=True, slots=True)
class Generation:
    """One configuration with what serves it: a request runs wholly on the generation that was
    current when it started, so a reload never changes a request midway."""

    config: ProxyConfig
    pool: UpstreamPool
    processors: Mapping[ProcessorSettings, Client]
    ingress: wire.IngressOptions

    @classmethod
    def build(
        cls,
        config: ProxyConfig,
        pool: UpstreamPool,
        processors: Mapping[ProcessorSettings, Client],
    ) -> Generation:
        ingress = wire.IngressOptions(
            scheme=b"http" if config.tls is None else b"https",
            forwarded_for=config.forwarded_for,
            default_authority=f"{config.upstream.host}:{config.upstream.port}".encode(),
            new_request_id=new_request_id,
        )
        return cls(config, pool, processors, ingress)

    def processor(self, settings: ProcessorSettings) -> Client:
        return self.processors[settings]


class ConnectionHandler:
    """Shared by all workers of one proxy: the current generation (config, upstream pool,
    processors) and the stats."""

    def __init__(
        self,
        config: ProxyConfig,
        pool: UpstreamPool,
        processors: Mapping[ProcessorSettings, Client],
        stats: Stats | None = None,
    ):
        # Replaced whole by swap(); reading the attribute is atomic, so no lock is needed.
        self.current = Generation.build(config, pool, processors)
        self.stats = stats if stats is not None else Stats(config.filter.stat_prefix)
        self.draining = threading.Event()

    @property
    def config(self) -> ProxyConfig:
        return self.current.config

    def swap(self, generation: Generation) -> None:
        """Requests that start from now on use ``generation``."""
        self.current = generation

    def serve(self, down: Downstream, may_linger: Callable[[], bool] = lambda: False) -> bool:
        """Serve requests while they come; True to park the connection in the selector,
        until its request head deadline (``down.head_deadline``) or for keep-alive.

        ``may_linger`` says whether this worker may wait :data:`KEEPALIVE_LINGER` for the
        next request rather than hand the connection back at once.
        """
        while True:
            kept = self._one_request(down)
            if kept is None:
                return True  # the head is not all here yet: wait for more without a worker
            if not kept or self.draining.is_set():
                down.conn.close()
                return False
            h = down.conn.h11
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                down.conn.close()
                return False
            down.conn.start_next_cycle()
            if down.conn.buffered_event_ready():
                continue
            if not (may_linger() and down.conn.receive_within(KEEPALIVE_LINGER)):
                return True

    def head_timed_out(self, down: Downstream) -> None:
        """A connection passed its head deadline: 408 if it had begun a request (the caller
        closes it)."""
        if down.conn.h11.their_state is h11.IDLE and down.conn.h11.trailing_data[0]:
            _raw_error(down.conn, 408, "request header timeout")
            self.stats.record_response(408)

    def _one_request(self, down: Downstream) -> bool | None:
        """Read and answer one request; whether the connection may be kept, None when the
        request head is still incomplete (it is read as it comes, never waited for here)."""
        now = time.monotonic()
        if down.head_deadline is None:
            down.head_deadline = now + self.config.timeouts.request_headers
        try:
            event = down.conn.poll_event()
        except h11.RemoteProtocolError as err:
            _raw_error(down.conn, err.error_status_hint, str(err))
            self.stats.record_response(err.error_status_hint)
            return False
        except OSError:
            return False
        if event is h11.NEED_DATA:
            if now < down.head_deadline:
                return None
            self.head_timed_out(down)
            return False
        down.head_deadline = None
        if not isinstance(event, h11.Request):
            return False
        limits = self.config.filter.exchange.limits
        # Once into a list: h11's Headers iterates through collections.abc's Python-level
        # __iter__, one __getitem__ call a header, and the head is read several times.
        headers = list(event.headers)
        refusal = wire.refuse_request(
            event.method,
            event.target,
            headers,
            event.http_version,
            limits.max_count,
            limits.max_bytes,
        )
        if refusal is not None:
            _raw_error(down.conn, refusal.status, refusal.reason)
            self.stats.record_response(refusal.status)
            return False
        down.requests += 1
        run = _RequestRun(self, down, event, headers)
        try:
            run.run()
        except ClientBodyError as err:
            if not run.response_started:
                _raw_error(down.conn, err.status, str(err))
                run.record.status = err.status
            return False
        except (ExchangeAborted, OSError, h11.ProtocolError):
            return False
        finally:
            run.finish()
        return not run.close_after


def _request_read(conn: Http1Connection) -> bool:
    """Whether the request's end has been read (MUST_CLOSE: it ended, and asked for the
    connection to close after the response)."""
    return conn.h11.their_state in (h11.DONE, h11.MUST_CLOSE)


def _raw_error(conn: Http1Connection, status: int, message: str) -> None:
    """An error reply written past h11, which will not send a response to a broken request."""
    body = message.encode()
    head = (
        f"HTTP/1.1 {status} {wire.reason_phrase(status).decode()}\r\n"
        f"content-length: {len(body)}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
    ).encode()
    try:
        conn.sock.settimeout(1.0)
        conn.sock.sendall(head + body)
    except OSError:
        pass


def _connect_failure(err: UpstreamConnectError) -> wire.UpstreamFailure:
    """Envoy's reply when no connection could be made: a timeout, or a failure with the
    connect error as Envoy's details name it ("delayed connect error: Connection refused")."""
    cause = err.__cause__
    if isinstance(cause, TimeoutError):
        return wire.upstream_reset(wire.CONNECTION_TIMEOUT)
    reason = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(cause)
    return wire.upstream_reset(wire.CONNECTION_FAILURE, f"delayed connect error: {reason}")


@dataclass(slots=True)
class _ProxyResponse:
    """A reply the proxy makes in the upstream's place (503, 504); it still goes through
    ext_proc's response phase, as Envoy's router replies do."""

    status: int
    body: bytes

    def headers(self) -> Headers:
        return Headers(
            [
                (b":status", str(self.status).encode()),
                (b"content-length", str(len(self.body)).encode()),
                (b"content-type", b"text/plain"),
            ]
        )


class _RequestRun:
    """One request on a worker thread: the proxy's :class:`~extproc.io.request_loop.HttpSide`
    over the downstream connection and an upstream one from the pool."""

    def __init__(
        self,
        handler: ConnectionHandler,
        down: Downstream,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
    ):
        self.h = handler
        self.gen = gen = handler.current
        self.timeouts = gen.config.timeouts
        self.down = down
        self.request = request
        self.request_headers = headers  # request.headers, as a list
        self.record = RequestRecord(
            started=time.monotonic(), method=request.method, path=request.target
        )
        settings, processor = gen.config.filter.for_path(request.target)
        self.loop = open_loop(
            settings,
            processor,
            gen,
            self,
            self.record,
            handler.stats,
            self._connection,
            reply_first=False,
        )
        self.upstream: Http1Connection | None = None
        self.upstream_reused = False
        self.upstream_request: h11.Request | None = None
        self.proxy_response: _ProxyResponse | None = None
        self._response_head: tuple[Headers, bool] = (Headers(), True)
        self.response_started = False
        self.response_body_allowed = True
        self.close_after = False
        self.method = request.method

    def _connection(self) -> attributes.Connection:
        upstream = self.gen.config.upstream
        return attributes.Connection(
            source=self.down.peer,
            destination=self.down.local,
            upstream=(upstream.host, upstream.port),
            connection_id=self.down.id,
            start=wall_clock(self.record.started),
        )

    # The exchange -----------------------------------------------------------------------

    def run(self) -> None:
        req = self.request
        has_body, _ = wire.request_body_framing(self.request_headers)
        headers = wire.request_from_wire(
            req.method, req.target, self.request_headers, self.down.peer_ip, self.gen.ingress
        )
        self.record.request_id = headers.get(b"x-request-id") or b""
        if not has_body:
            # h11 yields the EndOfMessage of a bodiless request without reading the socket.
            self.down.conn.next_event(self.timeouts.client)
        elif self.down.conn.h11.they_are_waiting_for_100_continue:
            self.down.conn.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"),
                self.timeouts.client,
            )
        loop = self.loop
        loop.begin(Direction.REQUEST, headers, not has_body)
        loop.run(Direction.REQUEST)
        if loop.local is None:
            self._respond()
        loop.answer()

    def _respond(self) -> None:
        """The response phase: from the upstream, or from the proxy when it failed."""
        if self.proxy_response is None:
            self._await_upstream_head()
        if self.proxy_response is not None:
            self._close_upstream()
            headers, eos = self.proxy_response.headers(), False
        else:
            assert self.upstream is not None
            headers, eos = self._response_head
        self.loop.begin(Direction.RESPONSE, headers, eos)
        self.loop.run(Direction.RESPONSE)

    # HttpSide ---------------------------------------------------------------------------

    @property
    def responding_from_proxy(self) -> bool:
        return self.proxy_response is not None

    def read_body(self, direction: Direction, limit: float) -> BodyPiece | None:
        if direction is Direction.RESPONSE and self.proxy_response is not None:
            return self.proxy_response.body, True, None
        if direction is Direction.REQUEST:
            timeout, read = self.timeouts.client, self._read_request_body
        else:
            timeout, read = self.timeouts.upstream, self._read_upstream_body
        try:
            return read(min(limit, timeout))
        except TimeoutError as err:
            if limit <= timeout:
                return None  # the message deadline passed while reading
            if direction is Direction.REQUEST:
                raise ClientBodyError(408, "request body timeout") from err
            raise

    def read_arrived(self, direction: Direction) -> BodyPiece | None:
        if direction is Direction.RESPONSE and self.proxy_response is not None:
            return self.proxy_response.body, True, None  # all here, as Envoy's local reply is
        if direction is Direction.REQUEST:
            return self._read_request_body(None)
        return self._read_upstream_body(None)

    def respond_from_proxy(self, status: int, body: bytes, details: str) -> None:
        self.proxy_response = _ProxyResponse(status, body)
        self.record.details = details

    def _upstream_failed(self, failure: wire.UpstreamFailure) -> None:
        self.respond_from_proxy(failure.status, failure.body, failure.details)

    def _drain_request(self) -> bool:
        """Read and drop the rest of a request the proxy answers without, within the bounds
        (see _DRAIN_BYTES); whether the request ended, so that its connection can be kept."""
        conn = self.down.conn
        deadline = time.monotonic() + min(_DRAIN_TIME, self.timeouts.client)
        dropped = 0
        # A timeout, a reset or broken framing ends the drain: the connection goes.
        with contextlib.suppress(h11.RemoteProtocolError, OSError):
            while not _request_read(conn) and dropped <= _DRAIN_BYTES:
                event = conn.next_event(_DRAIN_GAP, deadline)
                if isinstance(event, h11.Data):
                    dropped += len(event.data)
                elif not isinstance(event, h11.EndOfMessage):
                    break
        return _request_read(conn)

    # Forwarding -------------------------------------------------------------------------

    def forward_headers(self, action: ForwardHeaders) -> None:
        if action.direction is Direction.RESPONSE:
            self._send_head(action.headers, action.body_length, action.end_of_stream)
            return
        method, target, wire_headers = wire.request_to_wire(
            action.headers, action.body_length, not action.end_of_stream
        )
        self.method = method
        self.upstream_request = h11.Request(method=method, target=target, headers=wire_headers)
        try:
            self.upstream, self.upstream_reused = self.gen.pool.acquire()
        except UpstreamConnectError as err:
            self._upstream_failed(_connect_failure(err))
            return
        self._to_upstream(self.upstream_request)
        if action.end_of_stream:
            self._to_upstream(h11.EndOfMessage())

    def forward_body(self, action: ForwardBody) -> None:
        if action.direction is Direction.REQUEST:
            if action.data:
                self._to_upstream(h11.Data(data=action.data))
            if action.end_of_stream:
                self._to_upstream(h11.EndOfMessage())
            return
        if action.data and self.response_body_allowed:
            # A body a processor gives a HEAD, 204 or 304 response is dropped: one byte of it
            # would be read as the start of the next response on the connection.
            self.record.bytes_out += len(action.data)
            self.down.conn.send(h11.Data(data=action.data), self.timeouts.client)
        if action.end_of_stream:
            self.down.conn.send(h11.EndOfMessage(), self.timeouts.client)

    def forward_trailers(self, action: ForwardTrailers) -> None:
        trailers = [(n, v) for n, v in action.trailers]
        if action.direction is Direction.REQUEST:
            self._to_upstream(h11.EndOfMessage(headers=trailers))
        else:
            if self.down.conn.h11.their_http_version == b"1.0":
                trailers = []  # an HTTP/1.0 client cannot receive trailers
            self.down.conn.send(h11.EndOfMessage(headers=trailers), self.timeouts.client)

    def _to_upstream(self, event: Any) -> None:
        if self.upstream is None or self.proxy_response is not None:
            return
        try:
            self.upstream.send(event, self.timeouts.upstream)
        except OSError:
            self._close_upstream()
            self.h.stats.upstream_cx_destroy_remote_with_active_rq.inc()
            self._upstream_failed(wire.upstream_reset(wire.CONNECTION_TERMINATION))

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    # Upstream response ------------------------------------------------------------------

    def _await_upstream_head(self) -> None:
        started = time.monotonic()
        try:
            self._response_head = self._read_response_head()
        except (OSError, h11.ProtocolError) as err:
            closed = self.upstream is None or self.upstream.peer_closed
            self._close_upstream()
            if isinstance(err, TimeoutError):
                self.h.stats.upstream_rq_timeout.inc()
                self._upstream_failed(wire.UPSTREAM_TIMEOUT)
            elif self._retry_on_fresh_connection():
                self._await_upstream_head()
            elif isinstance(err, h11.ProtocolError) and not closed:
                self.h.stats.upstream_cx_protocol_error.inc()
                self._upstream_failed(wire.upstream_reset(wire.PROTOCOL_ERROR))
            else:
                self.h.stats.upstream_cx_destroy_remote_with_active_rq.inc()
                self._upstream_failed(wire.upstream_reset(wire.CONNECTION_TERMINATION))
        finally:
            self.record.upstream_time += time.monotonic() - started

    def _retry_on_fresh_connection(self) -> bool:
        """A kept-alive connection the upstream had just closed: once more, afresh.

        Only for a request without a body, which can be sent again as it was.
        """
        request = self.upstream_request
        if (
            not self.upstream_reused
            or request is None
            or wire.request_body_framing(request.headers)[0]
        ):
            return False
        try:
            self.upstream, self.upstream_reused = self.gen.pool.acquire()
            self.upstream.send(request, self.timeouts.upstream)
            self.upstream.send(h11.EndOfMessage(), self.timeouts.upstream)
        except (UpstreamConnectError, OSError):
            self._close_upstream()
            return False
        self.upstream_reused = False
        return True

    def _read_response_head(self) -> tuple[Headers, bool]:
        assert self.upstream is not None
        while True:
            event = self.upstream.next_event(self.timeouts.upstream)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                # PAUSED: a protocol switch, which the proxy never asked for (Upgrade and
                # CONNECT are not forwarded as such).
                raise ConnectionResetError("upstream closed or switched protocols")
            # Other 1xx: Expect was answered here, so these are dropped.
        allowed = wire.response_may_have_body(event.status_code, self.method)
        wire_headers = list(event.headers)  # read twice (see _one_request)
        length = wire.response_body_length(wire_headers) if allowed else 0
        headers = wire.response_from_wire(event.status_code, wire_headers)
        return headers, not allowed or length == 0

    def _read_upstream_body(self, timeout: float | None) -> BodyPiece | None:
        """The next piece of the upstream's body; None for ``timeout``: only what arrived."""
        assert self.upstream is not None
        try:
            upstream = self.upstream
            piece = upstream.read_body(timeout) if timeout is not None else upstream.read_arrived()
            if piece is None:
                return None
            if piece[2] is not None and not wire.trailers_are_clean(piece[2]):
                raise h11.RemoteProtocolError("invalid character in a trailer value")
            return piece
        except (OSError, h11.ProtocolError) as err:
            # Never let a truncated body pass for a complete one: drop the connection.
            stats = self.h.stats
            if isinstance(err, TimeoutError):
                stats.upstream_rq_timeout.inc()
            elif isinstance(err, h11.ProtocolError) and not self.upstream.peer_closed:
                stats.upstream_cx_protocol_error.inc()
            else:
                stats.upstream_cx_destroy_remote_with_active_rq.inc()
            self._close_upstream()
            raise ExchangeAborted("upstream broke mid-response") from err

    def _read_request_body(self, timeout: float | None) -> BodyPiece | None:
        """The next piece of the request body; None for ``timeout``: only what arrived."""
        conn = self.down.conn
        try:
            piece = conn.read_body(timeout) if timeout is not None else conn.read_arrived()
            if piece is None:
                return None
        except h11.RemoteProtocolError as err:
            raise ClientBodyError(400, f"request body: {err}") from err
        except ConnectionResetError as err:
            raise ExchangeAborted("request body") from err
        if piece[2] is not None and not wire.trailers_are_clean(piece[2]):
            raise ClientBodyError(400, "invalid character in a trailer value")
        return piece

    # Downstream -------------------------------------------------------------------------

    def answer_locally(self, reply: RespondLocally) -> None:
        if self.response_started:
            # Envoy resets the stream: on HTTP/1.1 the connection goes, mid-response.
            raise ExchangeAborted(f"local reply after the response started: {reply.details}")
        self._close_upstream()
        self.record.status = reply.status
        allowed = wire.response_may_have_body(reply.status, self.method)
        self._send_head(
            reply.headers,
            len(reply.body),
            not allowed or not reply.body,
            allowed=allowed,
            body_follows=True,
            # Envoy's connection manager takes a local 400 for a broken request on HTTP/1.1:
            # it closes the connection after it, whoever made the reply.
            close=reply.status == 400,
        )
        if allowed and reply.body:
            self.forward_body(ForwardBody(Direction.RESPONSE, reply.body, True))

    def _send_head(
        self,
        headers: Headers,
        length: int | None,
        end_of_stream: bool,
        allowed: bool | None = None,
        body_follows: bool = False,
        close: bool = False,
    ) -> None:
        status = int(headers.get(b":status") or b"502")
        if allowed is None:
            allowed = wire.response_may_have_body(status, self.method)
        self.response_body_allowed = allowed
        if end_of_stream and allowed:
            length = 0
        status, reason, wire_headers = wire.response_to_wire(headers, length, allowed)
        # A reply before the request's end (only a local or proxy reply comes so early): the
        # connection is kept only if the rest of the request can be read first.
        if close or (not _request_read(self.down.conn) and not self._drain_request()):
            # Where Envoy's connection manager puts it: after the reply's headers, before the
            # content-length its codec adds to a reply that has none.
            added_length = wire_headers[-1:] == [(b"content-length", b"0")]
            at = len(wire_headers) - (added_length and b"content-length" not in headers)
            wire_headers.insert(at, (b"connection", b"close"))
            self.close_after = True
        self.record.status = status
        response = h11.Response(status_code=status, reason=reason, headers=wire_headers)
        if end_of_stream:
            self.down.conn.hold(response)
            self.down.conn.send(h11.EndOfMessage(), self.timeouts.client)
        elif body_follows or (length is not None and self._upstream_body_buffered()):
            self.down.conn.hold(response)
        else:
            self.down.conn.send(response, self.timeouts.client)
        self.response_started = True

    def _upstream_body_buffered(self) -> bool:
        """Whether the first piece of the upstream's body is already read and goes out at
        once: then the head waits for it, and both leave in one write. (Only with a
        Content-Length: any byte read of such a body is data, never a partial chunk.)"""
        return (
            self.upstream is not None
            and self.proxy_response is None
            and self.upstream.buffered_event_ready()
            and self.loop.forwards_body_as_read(Direction.RESPONSE)
        )

    def finish(self) -> None:
        """Release everything the request held and record it."""
        if self.upstream is not None:
            if not self.gen.pool.release(self.upstream):
                self.h.stats.upstream_cx_protocol_error.inc()
            self.upstream = None
        self.record.upstream_answered = (
            self.upstream_request is not None and self.proxy_response is None
        )
        self.loop.finish()
