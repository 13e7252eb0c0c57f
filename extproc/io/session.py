"""The processor side of one HTTP exchange, shared by the proxy's driver and the WSGI middleware.

It owns the exchange's Process stream, the message deadline and the feeding of events into the
:class:`~extproc.core.exchange.Exchange`; the actions that concern the HTTP side (forward a
head, a body piece or trailers, answer locally) go to the caller's ``forward`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from extproc.core.events import (
    Action,
    CloseStream,
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
