"""Runs HTTP exchanges on one downstream connection: h11 in, ext_proc exchange, upstream out.

The worker thread that owns a connection calls :meth:`ConnectionHandler.serve`; it feeds what
happens on the sockets and the processor stream into :class:`extproc.core.exchange.Exchange`
and carries out the actions it returns. Every wait here has a timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import structlog

from extproc.config import ProxyConfig
from extproc.core import wire
from extproc.core.exchange import (
    Action,
    CloseStream,
    Direction,
    Event,
    Exchange,
    ForwardHeaders,
    MessageTimedOut,
    ProcessorClosed,
    ProcessorReplied,
    RequestHeadersReceived,
    RespondLocally,
    ResponseHeadersReceived,
    SendToProcessor,
)
from extproc.errors import ProcessorStreamError, ProcessorTimeout, UpstreamConnectError
from extproc.io.http1 import Http1Connection
from extproc.io.processor import ProcessorClient, ProcessorStream
from extproc.io.upstream import UpstreamPool
from extproc.models import Headers

access_log = structlog.get_logger("extproc.access")

UPSTREAM_RESET = b"upstream connect error or disconnect/reset before headers. reset reason: "


class ConnectionAborted(Exception):
    """The exchange cannot go on: close the downstream connection without a reply."""


@dataclass(slots=True)
class Downstream:
    """One client connection, kept between requests (and while parked for keep-alive)."""

    conn: Http1Connection
    peer_ip: str
    requests: int = 0

    @classmethod
    def accept(cls, sock: socket.socket, peer: Any, max_head_bytes: int) -> Downstream:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Http1Connection(sock, h11.SERVER, max_head_bytes=max_head_bytes)
        return cls(conn, str(peer[0]) if isinstance(peer, tuple) else "")


class ConnectionHandler:
    """Shared by all workers of one proxy: the config, the upstream pool, the processor."""

    def __init__(self, config: ProxyConfig, pool: UpstreamPool, processor: ProcessorClient):
        self.config = config
        self.pool = pool
        self.processor = processor
        self.draining = threading.Event()
        self.ingress = wire.IngressOptions(
            forwarded_for=config.forwarded_for,
            default_authority=f"{config.upstream.host}:{config.upstream.port}".encode(),
        )

    def serve(self, down: Downstream) -> bool:
        """Serve requests while they are ready; True to park the connection for keep-alive."""
        while True:
            if not self._one_request(down) or self.draining.is_set():
                down.conn.close()
                return False
            h = down.conn.h11
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                down.conn.close()
                return False
            h.start_next_cycle()
            if not down.conn.buffered_event_ready():
                return True

    def _one_request(self, down: Downstream) -> bool:
        """Read and answer one request; whether the connection may be kept."""
        deadline = time.monotonic() + self.config.timeouts.request_headers
        try:
            event = down.conn.next_event(self.config.timeouts.request_headers, deadline)
        except h11.RemoteProtocolError as err:
            _raw_error(down.conn, err.error_status_hint, str(err))
            return False
        except TimeoutError:
            if down.conn.h11.their_state is h11.IDLE and _has_partial_head(down.conn):
                _raw_error(down.conn, 408, "request header timeout")
            return False
        except OSError:
            return False
        if not isinstance(event, h11.Request):
            return False
        down.requests += 1
        run = _RequestRun(self, down, event)
        try:
            run.run()
        except ConnectionAborted:
            return False
        except OSError:
            return False
        finally:
            run.finish()
        return not run.close_after


def _has_partial_head(conn: Http1Connection) -> bool:
    return bool(conn.h11.trailing_data[0])


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


@dataclass(slots=True)
class _Response:
    """The response to pass on: from the upstream, or made by the proxy (e.g. 503)."""

    headers: Headers
    end_of_stream: bool
    length: int | None
    upstream: Http1Connection | None = None
    body: bytes = b""


@dataclass(slots=True)
class _Stats:
    start: float = field(default_factory=time.monotonic)
    processor: float = 0.0
    upstream: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    status: int = 0


class _RequestRun:
    """Everything about one request on a worker thread."""

    def __init__(self, handler: ConnectionHandler, down: Downstream, request: h11.Request):
        self.h = handler
        self.down = down
        self.request = request
        self.exchange = Exchange(handler.config.exchange)
        self.stream: ProcessorStream | None = None
        self.released: dict[Direction, Headers] = {}
        self.local: RespondLocally | None = None
        self.upstream: Http1Connection | None = None
        self.close_after = False
        self.stats = _Stats()
        self.request_id = b""
        self.method = request.method

    # ext_proc ---------------------------------------------------------------------------

    def _drive(self, event: Event) -> RespondLocally | None:
        """Feed one event, then wait on the processor for as long as the exchange awaits it.

        Returns the local reply the exchange decided on, if any.
        """
        self._execute(self.exchange.handle(event))
        timeout = self.h.config.exchange.message_timeout
        while self.exchange.awaiting_reply:
            assert self.stream is not None
            started = time.monotonic()
            reply: Event
            try:
                response = self.stream.recv(timeout)
                reply = ProcessorClosed(0) if response is None else ProcessorReplied(response)
            except ProcessorTimeout:
                reply = MessageTimedOut()
            except ProcessorStreamError as err:
                reply = ProcessorClosed(err.code, err.details)
            self.stats.processor += time.monotonic() - started
            self._execute(self.exchange.handle(reply))
        return self.local

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToProcessor):
                if self.stream is None:
                    self.stream = self.h.processor.open_stream()
                self.stream.send(action.request)
            elif isinstance(action, ForwardHeaders):
                self.released[action.direction] = action.headers
            elif isinstance(action, RespondLocally):
                self.local = action
            elif isinstance(action, CloseStream):
                self._close_stream()

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    # The exchange -----------------------------------------------------------------------

    def run(self) -> None:
        req = self.request
        has_body, length = wire.request_body_framing(req.headers)
        headers = wire.request_from_wire(
            req.method, req.target, req.headers, self.down.peer_ip, self.h.ingress
        )
        self.request_id = headers.get(b"x-request-id") or b""
        if not has_body:
            # h11 yields the EndOfMessage of a bodiless request without reading the socket.
            self.down.conn.next_event(self.h.config.timeouts.client)
        elif self.down.conn.h11.they_are_waiting_for_100_continue:
            self.down.conn.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"),
                self.h.config.timeouts.client,
            )
        local = self._drive(RequestHeadersReceived(headers, not has_body))
        if local is not None:
            self._reply_locally(local)
            return
        response = self._call_upstream(self.released.pop(Direction.REQUEST), has_body, length)
        local = self._drive(ResponseHeadersReceived(response.headers, response.end_of_stream))
        if local is not None:
            if response.upstream is not None:
                response.upstream.close()
                self.upstream = None
            self._reply_locally(local)
            return
        self._send_response(self.released.pop(Direction.RESPONSE), response)

    def _call_upstream(self, headers: Headers, has_body: bool, length: int | None) -> _Response:
        method, target, wire_headers = wire.request_to_wire(headers, length, has_body)
        self.method = method
        started = time.monotonic()
        try:
            conn, reused = self.h.pool.acquire()
        except UpstreamConnectError:
            return _proxy_response(503, UPSTREAM_RESET + b"connection failure")
        self.upstream = conn
        request = h11.Request(method=method, target=target, headers=wire_headers)
        try:
            conn.send(request, self.h.config.timeouts.upstream)
            if has_body:
                self._relay_request_body(conn)
            else:
                conn.send(h11.EndOfMessage(), self.h.config.timeouts.upstream)
            response = self._read_response_head(conn)
        except (OSError, h11.ProtocolError) as err:
            conn.close()
            self.upstream = None
            if reused and not has_body and not isinstance(err, TimeoutError):
                # A kept-alive connection the upstream had just closed: try once more afresh.
                return self._call_upstream(headers, has_body, length)
            if isinstance(err, TimeoutError):
                return _proxy_response(504, b"upstream request timeout")
            return _proxy_response(503, UPSTREAM_RESET + b"connection termination")
        finally:
            self.stats.upstream += time.monotonic() - started
        return response

    def _relay_request_body(self, up: Http1Connection) -> None:
        timeouts = self.h.config.timeouts
        while True:
            try:
                event = self.down.conn.next_event(timeouts.client)
            except (h11.RemoteProtocolError, TimeoutError) as err:
                raise ConnectionAborted("request body") from err
            if isinstance(event, h11.Data):
                self.stats.bytes_in += len(event.data)
                up.send(event, timeouts.upstream)
            elif isinstance(event, h11.EndOfMessage):
                up.send(h11.EndOfMessage(headers=event.headers), timeouts.upstream)
                return
            else:
                raise ConnectionAborted("client closed mid-body")

    def _read_response_head(self, conn: Http1Connection) -> _Response:
        while True:
            event = conn.next_event(self.h.config.timeouts.upstream)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                # PAUSED: a protocol switch, which the proxy never asked for (Upgrade and
                # CONNECT are not forwarded as such).
                raise ConnectionResetError("upstream closed or switched protocols")
            # Other 1xx: Expect was answered here, so these are dropped.
        allowed = wire.response_may_have_body(event.status_code, self.method)
        length = wire.response_body_length(event.headers) if allowed else 0
        return _Response(
            headers=wire.response_from_wire(event.status_code, event.headers),
            end_of_stream=not allowed or length == 0,
            length=length,
            upstream=conn,
        )

    # Downstream -------------------------------------------------------------------------

    def _reply_locally(self, reply: RespondLocally) -> None:
        self.stats.status = reply.status
        allowed = wire.response_may_have_body(reply.status, self.method)
        self._send_head(reply.headers, len(reply.body), body_allowed=allowed)
        self._send_body_and_end(reply.body if allowed else b"")

    def _send_response(self, headers: Headers, response: _Response) -> None:
        status = int(headers.get(b":status") or b"502")
        self.stats.status = status
        allowed = wire.response_may_have_body(status, self.method)
        self._send_head(headers, response.length, body_allowed=allowed)
        up = response.upstream
        if up is None:
            self._send_body_and_end(response.body)
            return
        timeouts = self.h.config.timeouts
        while True:
            try:
                event = up.next_event(timeouts.upstream)
            except (OSError, h11.RemoteProtocolError) as err:
                # Never let a truncated body pass for a complete one: drop the connection.
                up.close()
                self.upstream = None
                raise ConnectionAborted("upstream broke mid-response") from err
            if isinstance(event, h11.Data):
                self.stats.bytes_out += len(event.data)
                self.down.conn.send(event, timeouts.client)
            elif isinstance(event, h11.EndOfMessage):
                self.down.conn.send(h11.EndOfMessage(headers=event.headers), timeouts.client)
                return
            else:
                up.close()
                self.upstream = None
                raise ConnectionAborted("upstream closed mid-response")

    def _send_head(self, headers: Headers, length: int | None, body_allowed: bool) -> None:
        status, reason, wire_headers = wire.response_to_wire(headers, length, body_allowed)
        if self.down.conn.h11.their_state is not h11.DONE:
            # The request body was not read (local reply): the connection cannot be reused.
            wire_headers.append((b"connection", b"close"))
            self.close_after = True
        self.down.conn.send(
            h11.Response(status_code=status, reason=reason, headers=wire_headers),
            self.h.config.timeouts.client,
        )

    def _send_body_and_end(self, body: bytes) -> None:
        timeout = self.h.config.timeouts.client
        if body:
            self.stats.bytes_out += len(body)
            self.down.conn.send(h11.Data(data=body), timeout)
        self.down.conn.send(h11.EndOfMessage(), timeout)

    def finish(self) -> None:
        """Release everything the request held and write its access-log entry."""
        self._close_stream()
        if self.upstream is not None:
            self.h.pool.release(self.upstream)
            self.upstream = None
        outcome = self.exchange.outcome
        access_log.info(
            "request",
            method=self.request.method.decode("latin-1"),
            path=self.request.target.decode("latin-1"),
            status=self.stats.status,
            request_id=self.request_id.decode("latin-1"),
            bytes_in=self.stats.bytes_in,
            bytes_out=self.stats.bytes_out,
            duration_ms=round((time.monotonic() - self.stats.start) * 1000, 3),
            upstream_ms=round(self.stats.upstream * 1000, 3),
            processor_ms=round(self.stats.processor * 1000, 3),
            details=outcome.details,
            failed_open=outcome.failed_open,
        )


def _proxy_response(status: int, body: bytes) -> _Response:
    """A reply the proxy makes in the upstream's place; it still goes through ext_proc."""
    headers = Headers(
        [
            (b":status", str(status).encode()),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"text/plain"),
        ]
    )
    return _Response(headers=headers, end_of_stream=False, length=len(body), body=body)
