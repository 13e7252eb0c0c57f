"""The gRPC side of ext_proc: one channel per processor target, one stream per HTTP exchange.

Two clients drive a Process stream behind one interface (:class:`ProcessorStream`):

* ``direct`` (the default, :mod:`extproc.io.direct_stream`): the worker thread drives the call
  itself through a grpcio *segregated call*, a call with a completion queue of its own. No
  thread is started per stream and, in the header and BUFFERED modes, no message crosses
  from one thread to another.
* ``stub`` (:mod:`extproc.io.stub_stream`): grpc's synchronous stub fed by a queue-backed
  request iterator, which grpc consumes on a thread it starts for every stream.

Where replies may come while the worker is busy reading a body (STREAMED, FULL_DUPLEX_STREAMED,
observability mode), a task on a shared pool drains the stream into a queue instead
(:meth:`ProcessorStream.start_pump`), so the worker can look for replies without blocking
(:meth:`ProcessorStream.ready`). Late replies are cut short by the client's one
:class:`~extproc.io.watchdog.Watchdog`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.apis import other_api, process_method
from extproc.config import ProcessorSettings
from extproc.io import direct_stream, stub_stream
from extproc.io.watchdog import Watchdog
from extproc.options import GRPC_CLIENTS

log = structlog.get_logger("extproc.processor")

__all__ = ["GRPC_CLIENTS", "ProcessorClient", "ProcessorStream", "client_kind"]


class ProcessorStream(Protocol):
    """One Process stream; opened on the first :meth:`send`."""

    def send(self, request: ep.ProcessingRequest) -> None:
        """Send ``request``, without blocking. A client may hold it until the next
        :meth:`recv`, :meth:`start_pump` or :meth:`close` (the direct client does, to send it
        with the wait for its reply): a message sent and then closed on may never go out."""

    def start_pump(self) -> None:
        """From now on, replies are drained into a queue by a pool thread."""

    def listen(self) -> None:
        """Nothing is owed now: a message that comes all the same must be seen by
        :meth:`ready` (a receive is started, or the stream is pumped)."""

    def ready(self) -> bool:
        """Whether a reply (or the end) is waiting, without waiting for one; only meaningful
        once pumped or listening."""

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        """The next reply, or None when the processor closed the stream with OK.

        Raises :class:`ProcessorTimeout` after ``timeout`` seconds and
        :class:`ProcessorStreamError` when the stream ends with another status.
        """

    def close(self) -> None:
        """Half-close, then cancel, as Envoy does at the end of an exchange."""


_warned_fallback = False


def client_kind(requested: str) -> str:
    """The client that will run: ``requested``, unless it is ``direct`` and the installed
    grpcio lacks what that needs, then ``stub`` (with one warning per process)."""
    global _warned_fallback
    if requested != "direct" or direct_stream.SUPPORTED:
        return requested
    if not _warned_fallback:
        _warned_fallback = True
        log.warning(
            "grpc_client_fallback",
            requested="direct",
            using="stub",
            grpcio=grpc.__version__,
            reason=direct_stream.UNSUPPORTED_REASON,
        )
    return "stub"


class ProcessorClient:
    """One gRPC channel to the processor, shared by every worker thread of the process."""

    def __init__(self, settings: ProcessorSettings, max_streams: int = 64) -> None:
        self.settings = settings
        self.kind = client_kind(settings.grpc_client)
        options: list[tuple[str, str | int]] = list(settings.channel_args)
        if settings.authority:
            options.append(("grpc.default_authority", settings.authority))
        if settings.credentials is None:
            self.channel = grpc.insecure_channel(settings.target, options=options)
        else:
            self.channel = grpc.secure_channel(
                settings.target, settings.credentials, options=options
            )
        self.watchdog = Watchdog()
        self._told_unimplemented = False
        # Pump threads are started on demand and reused: none is started per request.
        self.pumps = ThreadPoolExecutor(max_streams, thread_name_prefix="extproc-pump")
        self._open = (
            direct_stream.opener(self) if self.kind == "direct" else stub_stream.opener(self)
        )

    def open_stream(self) -> ProcessorStream:
        return self._open()

    def unimplemented(self) -> None:
        """A stream ended UNIMPLEMENTED: the processor does not serve the method called. Said
        once per client, with the likely cause, beside each request's processor_stream_error."""
        if self._told_unimplemented:
            return
        self._told_unimplemented = True
        api = self.settings.api
        log.error(
            "processor_api_mismatch",
            target=self.settings.target,
            method=process_method(api),
            hint=f"the processor does not serve this method; if it serves the {other_api(api)}"
            f" API, run extproc with --processor-api {other_api(api)}",
        )

    def close(self) -> None:
        self.watchdog.stop()
        self.channel.close()
        self.pumps.shutdown(wait=True, cancel_futures=True)
