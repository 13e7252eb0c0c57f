"""The processor side of one HTTP exchange, shared by the proxy's driver and the WSGI middleware.

It owns the exchange's Process stream, the message deadline and the feeding of events into the
:class:`~extproc.core.exchange.Exchange`; the actions that concern the HTTP side (forward a
head, a body piece or trailers, answer locally) go to the caller's ``forward`` callback. When
the request is over, :func:`record_request` writes the access-log line and counts the stats,
the same for both, so an operator reads a middleware as a proxy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from google.protobuf import json_format

from extproc import logs
from extproc.core.events import (
    Action,
    CloseStream,
    Direction,
    Event,
    MessageTimedOut,
    ProcessorClosed,
    ProcessorReplied,
    RestartTimer,
    SendToProcessor,
)
from extproc.core.exchange import Exchange
from extproc.errors import ProcessorStreamError, ProcessorTimeout
from extproc.io.processor import ProcessorClient, ProcessorStream
from extproc.metrics import ExchangeFacts, Stats, record_exchange

access_log = structlog.get_logger("extproc.access")

# An untimed wait (FULL_DUPLEX_STREAMED replies) still has a bound: nothing hangs.
UNTIMED_WAIT = 300.0


class ProcessorSession:
    """Feeds one exchange and carries out its processor-side actions."""

    __slots__ = (
        "exchange",
        "_client",
        "_forward",
        "stream",
        "deadline",
        "processor_time",
        "phase_times",
    )

    def __init__(
        self,
        exchange: Exchange,
        client: Callable[[], ProcessorClient],
        forward: Callable[[Action], None],
    ) -> None:
        self.exchange = exchange
        self._client = client  # called once, when the first message is due
        self._forward = forward
        self.stream: ProcessorStream | None = None
        self.deadline: float | None = None  # when the oldest unanswered message times out
        self.processor_time = 0.0
        # Time waited for replies, by the ProcessingResponse field that ended the wait
        # ("request_headers", ...; "message_timeout" and "stream_end" otherwise): the access
        # log's per-phase durations.
        self.phase_times: dict[str, float] = {}

    def feed(self, event: Event) -> None:
        for action in self.exchange.handle(event):
            if isinstance(action, SendToProcessor):
                self._send(action)
            elif isinstance(action, RestartTimer):
                self.deadline = time.monotonic() + action.timeout
            elif isinstance(action, CloseStream):
                self.close()
            else:
                self._forward(action)
        if self.stream is not None and self.exchange.streams_replies:
            self.stream.start_pump()

    def turn(self, direction: Direction, read: Callable[[], None], reply_first: bool) -> None:
        """One turn of a direction's loop: ``read`` a piece of input while the exchange wants
        it, else wait for the processor. With ``reply_first`` a timed reply is awaited before
        more input is read (for input that may be slow to come and must not hold up what was
        already read)."""
        ex = self.exchange
        if reply_first and ex.awaiting_reply and ex.timer_running:
            self.wait_reply(self.time_left())
        elif ex.wants_input(direction):
            read()
        elif ex.awaiting_reply:
            self.wait_reply(self.time_left())
        else:
            raise RuntimeError(f"exchange stuck in the {direction.value} direction")

    def time_left(self) -> float:
        if self.deadline is None:
            return UNTIMED_WAIT
        return self.deadline - time.monotonic()

    def replies_ready(self) -> bool:
        return self.stream is not None and self.stream.ready()

    def wait_reply(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the processor, and feed what happened."""
        assert self.stream is not None
        started = time.monotonic()
        reply: Event
        phase = "stream_end"
        try:
            response = self.stream.recv(timeout)
            if response is None:
                reply = ProcessorClosed(0)
            else:
                reply = ProcessorReplied(response)
                phase = response.WhichOneof("response") or "empty"
        except ProcessorTimeout:
            reply = MessageTimedOut()
            phase = "message_timeout"
        except ProcessorStreamError as err:
            reply = ProcessorClosed(err.code, err.details)
        waited = time.monotonic() - started
        self.processor_time += waited
        self.phase_times[phase] = self.phase_times.get(phase, 0.0) + waited
        self.feed(reply)
        if not self.exchange.timer_running:
            self.deadline = None

    def _send(self, action: SendToProcessor) -> None:
        if self.stream is None:
            self.stream = self._client().open_stream()
        self.stream.send(action.request)
        if action.timed:
            self.deadline = time.monotonic() + self.exchange.settings.message_timeout

    def close(self) -> None:
        self.deadline = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def close_later(self, client: ProcessorClient) -> None:
        """Close after deferred_close_timeout: observability mode lets the stream outlive the
        exchange, so messages still queued reach the processor."""
        stream, self.stream = self.stream, None
        if stream is not None:
            client.watchdog.arm(self.exchange.settings.deferred_close_timeout, stream.close)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the HTTP side knows of a finished request, for its log line and stats."""

    method: bytes
    path: bytes
    status: int  # sent to the client; 0 when nothing was
    request_id: bytes
    bytes_in: int
    bytes_out: int
    started: float  # time.monotonic() when the request began
    upstream_time: float  # until the upstream's (or the app's) response head
    upstream_answered: bool
    local_reply: bool  # a RespondLocally was carried out
    request_too_large: bool  # answered 413 for the request body


def record_request(stats: Stats, session: ProcessorSession, facts: RequestFacts) -> None:
    """The request's access-log line (``extproc.access``) and its stats."""
    duration = time.monotonic() - facts.started
    outcome = session.exchange.outcome
    # The line's fields cost a few µs to gather: not for a level that drops it.
    if logs.keeps(logging.INFO):
        _log_request(session, facts, duration)
    record_exchange(
        stats,
        ExchangeFacts.from_outcome(
            outcome,
            local_reply=facts.local_reply,
            request_too_large=facts.request_too_large,
            status=facts.status,
            duration=duration,
            upstream_time=facts.upstream_time if facts.upstream_answered else None,
            processor_time=session.processor_time,
        ),
    )


def _log_request(session: ProcessorSession, facts: RequestFacts, duration: float) -> None:
    outcome = session.exchange.outcome
    access_log.info(
        "request",
        method=facts.method.decode("latin-1"),
        path=facts.path.decode("latin-1"),
        status=facts.status,
        request_id=facts.request_id.decode("latin-1"),
        bytes_in=facts.bytes_in,
        bytes_out=facts.bytes_out,
        duration_ms=round(duration * 1000, 3),
        upstream_ms=round(facts.upstream_time * 1000, 3),
        processor_ms=round(session.processor_time * 1000, 3),
        processor_phases_ms={phase: round(t * 1000, 3) for phase, t in session.phase_times.items()},
        details=outcome.details,
        failed_open=outcome.failed_open,
        **_metadata_fields(session.exchange),
    )


def _metadata_fields(exchange: Exchange) -> dict[str, Any]:
    """The request's dynamic metadata for the access log, when a processor set some."""
    metadata = exchange.dynamic_metadata
    if not metadata:
        return {}
    return {"dynamic_metadata": {ns: json_format.MessageToDict(v) for ns, v in metadata.items()}}
