"""The exchange loop of one HTTP request, shared by the proxy's driver and the WSGI middleware.

:class:`RequestLoop` feeds what happens into the :class:`~extproc.core.exchange.Exchange` and
carries out what it returns: the processor's actions on the
:class:`~extproc.io.session.ProcessorSession`, the HTTP side's through :class:`HttpSide`, which
the driver implements over sockets and the middleware over WSGI. The HTTP side never calls
back into the loop: it reads and writes when the loop asks it to.

Each direction runs in steps: read a piece of body while the exchange wants input, else wait
for the processor. Replies that came during a read are taken before the piece is fed, as
Envoy takes events in arrival order. When the request is over, :meth:`RequestLoop.finish`
writes the access-log line and counts the stats from the request's
:class:`~extproc.core.record.RequestRecord`, the same for both, so an operator reads a
middleware as a proxy.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from google.protobuf import json_format

from extproc import logs
from extproc.config import ProcessorSettings
from extproc.core import attributes, wire
from extproc.core.events import (
    BodyReceived,
    CloseStream,
    Direction,
    Event,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    HeadersReceived,
    RespondFromProxy,
    RespondLocally,
    RestartTimer,
    SendToProcessor,
    TrailersReceived,
)
from extproc.core.exchange import ERR_LENGTH_MISMATCH, Exchange
from extproc.core.record import Ending, RequestRecord
from extproc.core.settings import ExchangeSettings
from extproc.io.session import ProcessorSession, ProcessorSource
from extproc.metrics import Stats, record_exchange
from extproc.models import Header, Headers

access_log = structlog.get_logger("extproc.access")
# Processor faults, as Envoy's ext_proc logs them: a warning for a spurious reply, a failed
# stream or an override_message_timeout out of range, an error for a header mutation that fails
# the request (mutation_utils.cc). A message timeout is only counted, as in Envoy.
fault_log = structlog.get_logger("extproc.processor")
_FAULT_EVENTS = {
    Ending.BAD_REPLY: ("warning", "processor_spurious_message"),
    Ending.STREAM_ERROR: ("warning", "processor_stream_error"),
    Ending.MUTATION_ERROR: ("error", "processor_mutation_error"),
    Ending.HTTP_ERROR: ("error", "processor_http_error"),
}

# A piece of body: its bytes, whether it ends the body, and the trailers that end it instead.
BodyPiece = tuple[bytes, bool, list[Header] | None]


class HttpSide(Protocol):
    """The HTTP I/O of one request, as the loop drives it."""

    @property
    def responding_from_proxy(self) -> bool:
        """Whether the proxy answers in the upstream's place: the request goes no further."""
        ...

    def read_body(self, direction: Direction, limit: float) -> BodyPiece | None:
        """The next piece of the direction's body, or None when ``limit`` seconds (the
        message deadline) passed first. A side whose reads cannot be bounded ignores it."""
        ...

    def read_arrived(self, direction: Direction) -> BodyPiece | None:
        """The next piece of the direction's body that has already arrived, without waiting;
        None when nothing has (or the side cannot tell)."""
        ...

    def forward_headers(self, action: ForwardHeaders) -> None: ...

    def forward_body(self, action: ForwardBody) -> None: ...

    def forward_trailers(self, action: ForwardTrailers) -> None: ...

    def respond_from_proxy(self, status: int, body: bytes, details: str) -> None:
        """Answer in the upstream's place, with Envoy's response code details; the reply
        still goes through the response phase."""
        ...

    def answer_locally(self, reply: RespondLocally) -> None:
        """Send ext_proc's reply to the client, or abort if the response already started."""
        ...


class RequestLoop:
    """Runs one request's exchange between its HTTP side and its processor session."""

    __slots__ = (
        "exchange",
        "session",
        "record",
        "local",
        "_http",
        "_stats",
        "_reply_first",
        "_listened",
    )

    def __init__(
        self,
        exchange: Exchange,
        session: ProcessorSession,
        http: HttpSide,
        stats: Stats,
        *,
        reply_first: bool,
    ) -> None:
        self.exchange = exchange
        self.session = session
        self.record = exchange.record
        self.local: RespondLocally | None = None  # ext_proc's reply, once it made one
        self._http = http
        self._stats = stats
        # Await a timed reply before reading more input: for input that may be slow to come
        # (WSGI reads cannot be bounded) and must not hold up what was already read.
        self._reply_first = reply_first
        self._listened = False  # see _listen

    def begin(self, direction: Direction, headers: Headers, end_of_stream: bool) -> None:
        """The direction's head arrived."""
        # What the processor sent unasked while the upstream answered goes first, as Envoy
        # takes it as it comes: a spurious message ends the exchange before this head is sent.
        if direction is Direction.RESPONSE and not self._take_ready_replies():
            return
        self._feed(HeadersReceived(direction, headers, end_of_stream))

    def step(self, direction: Direction) -> bool:
        """One turn of a direction: read a piece, or wait for the processor; False once the
        direction has nothing more to do."""
        ex = self.exchange
        # Input is read to its end even once the output is done: a replaced body is drained.
        if self.local is not None or (ex.output_done(direction) and not ex.wants_input(direction)):
            return False
        if direction is Direction.REQUEST and self._http.responding_from_proxy:
            return False  # the upstream is gone: nothing more to send it
        if self._reply_first and ex.awaiting_reply and ex.timer_running:
            self._wait_reply(self.session.time_left(), direction)
        elif ex.wants_input(direction):
            self._read(direction)
        elif ex.awaiting_reply:
            self._wait_reply(self.session.time_left(), direction)
        else:
            raise RuntimeError(f"exchange stuck in the {direction.value} direction")
        return True

    def run(self, direction: Direction) -> None:
        """Steps until the direction is done."""
        while self.step(direction):
            pass

    def forwards_body_as_read(self, direction: Direction) -> bool:
        """Whether each body piece read now goes out at once (see the exchange's)."""
        return self.exchange.forwards_body_as_read(direction)

    def answer(self) -> bool:
        """Carry out ext_proc's reply, if it made one; whether it did."""
        if self.local is None:
            return False
        self._http.answer_locally(self.local)
        return True

    def finish(self) -> None:
        """Close the processor stream and record the request (access log and stats)."""
        if self.exchange.observing:
            self.session.close_later(self.exchange.settings.deferred_close_timeout)
        self.session.close()
        if self.record.override_timeout_out_of_range:
            _log_overrides_out_of_range(self.record)
        _record(self.record, self._stats)

    # The loop ---------------------------------------------------------------------------

    def _read(self, direction: Direction) -> None:
        left = self.session.time_left()
        if left <= 0:
            self._wait_reply(0)  # the message deadline passed: a reply now, or the timeout
            return
        piece = self._http.read_body(direction, left)
        if piece is None:
            self._wait_reply(0)  # the message deadline passed while reading
            return
        if direction is Direction.REQUEST:
            self.record.bytes_in += len(piece[0])
        # Replies that came while the read blocked go first, as Envoy takes events in arrival
        # order: an ImmediateResponse among them ends the exchange before this piece is sent.
        if not self._take_ready_replies():
            return
        self._feed_piece(direction, piece)
        self._take_ready_replies()

    def _feed_piece(self, direction: Direction, piece: BodyPiece) -> None:
        data, eos, trailers = piece
        self._feed(BodyReceived(direction, data, eos))
        if trailers is not None and self.local is None:
            self._feed(TrailersReceived(direction, Headers(trailers)))

    def _take_arrived(self, direction: Direction) -> None:
        """Feed the body that arrived while a reply was awaited, ahead of that reply, when
        the exchange takes it (see Exchange.takes_arrived_input)."""
        while self.exchange.takes_arrived_input(direction):
            piece = self._http.read_arrived(direction)
            if piece is None:
                return
            if direction is Direction.REQUEST:
                self.record.bytes_in += len(piece[0])
            self._feed_piece(direction, piece)

    def _listen(self) -> None:
        """The request's end went on and the upstream's answer is awaited: when no reply is
        owed but the stream stays open for the response phase, a message that comes
        meanwhile must be seen before that phase begins (see begin)."""
        self._listened = True
        ex = self.exchange
        if ex.stream_open and not (ex.complete or ex.awaiting_reply or ex.observing):
            self.session.listen()

    def _take_ready_replies(self) -> bool:
        """Feed the replies already waiting; False once the exchange is answered locally."""
        while self.local is None and self.session.replies_ready():
            self._wait_reply(0)
        return self.local is None

    def _wait_reply(self, timeout: float, direction: Direction | None = None) -> None:
        """Wait up to ``timeout`` for the processor, and feed what happened (after the
        ``direction``'s body that arrived meanwhile, when the exchange takes it)."""
        event = self.session.wait(timeout)
        if direction is not None:
            self._take_arrived(direction)
        self._feed(event)
        if not self.exchange.timer_running:
            self.session.stop_timer()

    def _feed(self, event: Event) -> None:
        session, http = self.session, self._http
        for action in self.exchange.handle(event):
            if isinstance(action, SendToProcessor):
                session.send(action.request, action.timed)
            elif isinstance(action, ForwardBody):
                http.forward_body(action)
            elif isinstance(action, ForwardHeaders):
                self._forward_headers(action)
            elif isinstance(action, ForwardTrailers):
                http.forward_trailers(action)
            elif isinstance(action, CloseStream):
                session.close()
                if self.record.ending in _FAULT_EVENTS:
                    # Once per exchange: the stream closes once, at the fault if there is one.
                    _log_fault(self.record)
            elif isinstance(action, RestartTimer):
                session.restart_timer(action.timeout)
            elif isinstance(action, RespondLocally):
                self.local = action
            elif isinstance(action, RespondFromProxy):
                http.respond_from_proxy(action.status, action.body, action.details)
        self._watch_replies()

    def _watch_replies(self) -> None:
        """Have replies that may come while the worker is busy elsewhere noticed: pumped while
        a body is read (STREAMED, duplex), listened for while the upstream answers."""
        if self.exchange.streams_replies:
            self.session.start_pump()
        elif not self._listened and self.exchange.output_done(Direction.REQUEST):
            self._listen()

    def _forward_headers(self, action: ForwardHeaders) -> None:
        if action.direction is Direction.RESPONSE:
            self._http.forward_headers(action)
            return
        headers = action.headers
        for namespace, header in self.exchange.settings.metadata_headers:
            # What Envoy users do with request_headers_to_add: "%DYNAMIC_METADATA(ns)%".
            value = self.exchange.metadata_json(namespace)
            if value is not None:
                headers.set(header, value.encode())
        _forward_request_head(self._http, action)


def _forward_request_head(http: HttpSide, action: ForwardHeaders) -> None:
    """Forward the request head, unless its request line cannot be written: Envoy's codec
    refuses to encode one a processor broke, and answers 503; the upstream (or the app) never
    sees it."""
    headers = action.headers
    if wire.request_line_is_valid(headers.get(b":method") or b"", headers.get(b":path") or b""):
        http.forward_headers(action)
    else:
        failure = wire.upstream_reset(wire.CONNECTION_TERMINATION)
        http.respond_from_proxy(failure.status, failure.body, failure.details)


def open_loop(
    settings: ExchangeSettings,
    processor: ProcessorSettings,
    source: ProcessorSource,
    http: HttpSide,
    record: RequestRecord,
    stats: Stats,
    connection: Callable[[], attributes.Connection],
    *,
    reply_first: bool,
) -> RequestLoop | PassThrough:
    """The loop for one request: no exchange at all when its settings can send the processor
    nothing, else the exchange with its processor session (``connection`` is called only if
    attributes are sent)."""
    if settings.passes_through:
        return PassThrough(record, http, stats)
    return RequestLoop(
        Exchange(settings, connection, record),
        ProcessorSession(source, processor, settings.message_timeout, record),
        http,
        stats,
        reply_first=reply_first,
    )


class PassThrough:
    """The loop of a request no message of which can go to the processor (both header modes
    SKIP, every body mode NONE, no trailer mode SEND, not observing): the HTTP side's head,
    body pieces and trailers go on as they come, in the order and with the framing the
    exchange would give them, with no exchange, processor session or events in between."""

    __slots__ = ("record", "local", "_http", "_stats", "_input_done")

    def __init__(self, record: RequestRecord, http: HttpSide, stats: Stats) -> None:
        self.record = record
        self.local: RespondLocally | None = None  # never: there is no processor to reply
        self._http = http
        self._stats = stats
        self._input_done = {Direction.REQUEST: False, Direction.RESPONSE: False}

    def begin(self, direction: Direction, headers: Headers, end_of_stream: bool) -> None:
        self._input_done[direction] = end_of_stream
        length = None
        if not end_of_stream:
            value = headers.get(b"content-length")
            length = int(value) if value is not None and value.isdigit() else None
        action = ForwardHeaders(direction, headers, end_of_stream, length)
        if direction is Direction.RESPONSE:
            self._http.forward_headers(action)
        else:
            _forward_request_head(self._http, action)

    def step(self, direction: Direction) -> bool:
        http = self._http
        if self._input_done[direction]:
            return False
        if direction is Direction.REQUEST and http.responding_from_proxy:
            return False  # the upstream is gone: nothing more to send it
        piece = http.read_body(direction, _NO_DEADLINE)
        assert piece is not None, "no message deadline to pass"
        data, eos, trailers = piece
        if direction is Direction.REQUEST:
            self.record.bytes_in += len(data)
        if data or eos:
            http.forward_body(ForwardBody(direction, data, eos))
        if trailers is not None:
            http.forward_trailers(ForwardTrailers(direction, Headers(trailers)))
        self._input_done[direction] = eos or trailers is not None
        return True

    def run(self, direction: Direction) -> None:
        while self.step(direction):
            pass

    def forwards_body_as_read(self, direction: Direction) -> bool:
        return True

    def answer(self) -> bool:
        return False

    def finish(self) -> None:
        _record(self.record, self._stats)


# A read with no message deadline: the HTTP side's own timeouts bound it.
_NO_DEADLINE = float("inf")


def _record(record: RequestRecord, stats: Stats) -> None:
    record.duration = time.monotonic() - record.started
    # The line's fields cost a few µs to gather: not for a level that drops it.
    if logs.keeps(logging.INFO):
        _log_request(record)
    record_exchange(stats, record)


def wall_clock(started: float) -> datetime.datetime:
    """The wall-clock time of the monotonic moment ``started``: worked out when attributes
    ask for it, so a request reads the wall clock only then."""
    return datetime.datetime.fromtimestamp(time.time() - (time.monotonic() - started), datetime.UTC)


def _log_fault(record: RequestRecord) -> None:
    assert record.ending is not None
    if record.fault == ERR_LENGTH_MISMATCH:
        return  # not a header mutation: Envoy logs nothing for it
    level, event = _FAULT_EVENTS[record.ending]
    fields: dict[str, Any] = {
        "request_id": record.request_id.decode("latin-1"),
        "details": record.fault,
        "failed_open": record.failed_open,
    }
    if record.stream_error is not None:
        fields["grpc_status"] = record.stream_error
    if record.http_failure:
        fields["reason"] = record.http_failure
    getattr(fault_log, level)(event, **fields)


def _log_overrides_out_of_range(record: RequestRecord) -> None:
    for _ in range(record.override_timeout_out_of_range):
        fault_log.warning(
            "processor_timeout_override_out_of_range",
            request_id=record.request_id.decode("latin-1"),
        )


def _log_request(record: RequestRecord) -> None:
    phases = record.phase_times or {}
    access_log.info(
        "request",
        method=record.method.decode("latin-1"),
        path=record.path.decode("latin-1"),
        status=record.status,
        request_id=record.request_id.decode("latin-1"),
        bytes_in=record.bytes_in,
        bytes_out=record.bytes_out,
        duration_ms=round(record.duration * 1000, 3),
        upstream_ms=round(record.upstream_time * 1000, 3),
        processor_ms=round(record.processor_time * 1000, 3),
        processor_phases_ms={phase: round(t * 1000, 3) for phase, t in phases.items()},
        details=record.details or ("via_upstream" if record.upstream_answered else ""),
        failed_open=record.failed_open,
        **_metadata_fields(record),
    )


def _metadata_fields(record: RequestRecord) -> dict[str, Any]:
    """The request's dynamic metadata for the access log, when a processor set some."""
    metadata = record.dynamic_metadata
    if not metadata:
        return {}
    return {"dynamic_metadata": {ns: json_format.MessageToDict(v) for ns, v in metadata.items()}}
