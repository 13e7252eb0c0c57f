"""The Process stream of one HTTP exchange, with the deadline of its oldest unanswered message.

The stream is opened with the first message, on the client the request's processor settings
name. Waiting turns what the stream says into the exchange's events, and writes what the wait
cost into the request's record. :class:`~extproc.io.request_loop.RequestLoop` decides when to
send and when to wait.
"""

from __future__ import annotations

import time
from typing import Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.config import ProcessorSettings
from extproc.core.events import (
    Event,
    MessageTimedOut,
    ProcessorClosed,
    ProcessorHttpFailed,
    ProcessorReplied,
)
from extproc.core.record import RequestRecord
from extproc.errors import ProcessorHttpError, ProcessorStreamError, ProcessorTimeout
from extproc.io.clients import Client
from extproc.io.processor import ProcessorClient, ProcessorStream

# An untimed wait (FULL_DUPLEX_STREAMED replies) still has a bound: nothing hangs.
UNTIMED_WAIT = 300.0
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]


class ProcessorSource(Protocol):
    """Where a request's processor client comes from: the proxy's generation, or the WSGI
    middleware (which makes its channels lazily, after a fork)."""

    def processor(self, settings: ProcessorSettings, /) -> Client: ...


class ProcessorSession:
    """One exchange's Process stream and message deadline."""

    __slots__ = (
        "_source",
        "_target",
        "_message_timeout",
        "_record",
        "client",
        "stream",
        "deadline",
    )

    def __init__(
        self,
        source: ProcessorSource,
        target: ProcessorSettings,
        message_timeout: float,
        record: RequestRecord,
    ) -> None:
        self._source = source
        self._target = target
        self._message_timeout = message_timeout
        self._record = record
        self.client: Client | None = None  # asked for with the first message
        self.stream: ProcessorStream | None = None
        self.deadline: float | None = None  # when the oldest unanswered message times out

    def send(self, request: ep.ProcessingRequest, timed: bool) -> None:
        if self.stream is None:
            self.client = self._source.processor(self._target)
            self.stream = self.client.open_stream()
            self._record.over_http = self._target.http is not None
        self.stream.send(request)
        if timed:
            self.deadline = time.monotonic() + self._message_timeout

    def restart_timer(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout

    def stop_timer(self) -> None:
        self.deadline = None

    def start_pump(self) -> None:
        """Replies may now come while the worker reads input: have them drained as they do."""
        if self.stream is not None:
            self.stream.start_pump()

    def listen(self) -> None:
        """No reply is owed: have one that comes unasked noticed by :meth:`replies_ready`."""
        if self.stream is not None:
            self.stream.listen()

    def time_left(self) -> float:
        if self.deadline is None:
            return UNTIMED_WAIT
        return self.deadline - time.monotonic()

    def replies_ready(self) -> bool:
        return self.stream is not None and self.stream.ready()

    def wait(self, timeout: float) -> Event:
        """What the processor did within ``timeout``: a reply, the stream's end, or the
        message timeout."""
        assert self.stream is not None
        started = time.monotonic()
        event: Event
        phase = "stream_end"
        try:
            response = self.stream.recv(timeout)
            if response is None:
                event = ProcessorClosed(0)
            else:
                event = ProcessorReplied(response)
                phase = response.WhichOneof("response") or "empty"
        except ProcessorTimeout:
            event = MessageTimedOut()
            phase = "message_timeout"
        except ProcessorStreamError as err:
            event = ProcessorClosed(err.code, err.details)
            if err.code == _UNIMPLEMENTED and isinstance(self.client, ProcessorClient):
                self.client.unimplemented()
        except ProcessorHttpError as err:
            event = ProcessorHttpFailed(str(err))
        waited = time.monotonic() - started
        record = self._record
        record.processor_time += waited
        if record.phase_times is None:
            record.phase_times = {}
        record.phase_times[phase] = record.phase_times.get(phase, 0.0) + waited
        return event

    def close(self) -> None:
        self.deadline = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def close_later(self, delay: float) -> None:
        """Close after ``delay`` (deferred_close_timeout): observability mode lets the stream
        outlive the exchange, so messages still queued reach the processor."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        if isinstance(self.client, ProcessorClient):
            self.client.watchdog.arm(delay, stream.close)
        else:
            stream.close()  # an HTTP POST is answered before the next: nothing is queued
