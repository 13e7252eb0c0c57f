"""The ``direct`` client: a Process stream driven from the worker's own thread.

grpcio can run a call without any thread of its own: a *segregated call* has a completion
queue of its own, ``operate(ops, tag)`` starts a batch of operations on it and ``next_event()``
waits, in the calling thread, for the next batch to complete. grpcio's single-threaded
unary-stream option is built the same way (grpc/grpc#20753). Here a stream runs as:

* the first :meth:`DirectStream.send` opens the call with two batches: SEND (initial metadata
  and the message) and STATUS (the final status, due until the call ends);
* :meth:`DirectStream.recv` starts a RECV batch (with the initial metadata the first time) and
  takes the call's events until a message, or the end, has come;
* gRPC lets one message be on its way at a time, so a message sent while another is still going
  out waits in a backlog and goes when that SEND completes: a send never blocks;
* :meth:`DirectStream.close` half-closes, cancels, and reaps every batch still due: the call
  and its completion queue are freed only when nothing is due any more;
* once pumped (STREAMED, FULL_DUPLEX_STREAMED, observability mode), a pool task owns
  ``next_event()`` and puts the replies in a queue; the worker only starts batches.

A late reply is cut short the same way as with the stub: the client's watchdog cancels the call.
"""

from __future__ import annotations

import importlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf.message import DecodeError

from extproc.errors import ProcessorStreamError, ProcessorTimeout
from extproc.io import pumped
from extproc.io.watchdog import Watchdog

if TYPE_CHECKING:
    from extproc.io.processor import ProcessorClient

METHOD = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# Batch tags: what a completed event was.
_SEND, _RECV, _STATUS, _CLOSE = "send", "recv", "status", "close"
_CYGRPC_NAMES = (
    "PropagationConstants",
    "SendInitialMetadataOperation",
    "SendMessageOperation",
    "SendCloseFromClientOperation",
    "ReceiveInitialMetadataOperation",
    "ReceiveMessageOperation",
    "ReceiveStatusOnClientOperation",
    "StatusCode",
)


def _unsupported() -> str | None:
    """Why the installed grpcio cannot run this client, or None when it can."""
    try:
        cygrpc = importlib.import_module("grpc._cython.cygrpc")
    except ImportError as err:
        return f"grpc._cython.cygrpc cannot be imported: {err}"
    missing = [name for name in _CYGRPC_NAMES if not hasattr(cygrpc, name)]
    missing += [
        f"Channel.{name}"
        for name in ("segregated_call", "get_registered_call_handle")
        if not hasattr(cygrpc.Channel, name)
    ]
    return f"grpcio lacks {', '.join(missing)}" if missing else None


UNSUPPORTED_REASON = _unsupported()
SUPPORTED = UNSUPPORTED_REASON is None
# grpcio's Cython core, untyped: the same module its own channel code drives.
cygrpc: Any = importlib.import_module("grpc._cython.cygrpc") if SUPPORTED else None


def opener(client: ProcessorClient) -> Callable[[], DirectStream]:
    # grpc.Channel keeps its cygrpc channel as _channel; the stub's calls are made on it too.
    channel: Any = client.channel._channel  # type: ignore[attr-defined]
    handle = channel.get_registered_call_handle(METHOD)
    return lambda: DirectStream(client, channel, handle)


class DirectStream:
    """One Process stream as a segregated call; opened on the first :meth:`send`."""

    __slots__ = (
        "_client",
        "_channel",
        "_handle",
        "_call",
        "_lock",
        "_due",
        "_sending",
        "_backlog",
        "_responses",
        "_eof",
        "_status",
        "_expired",
        "_closed",
        "_replies",
        "_ended",
        "_received_any",
    )

    def __init__(self, client: ProcessorClient, channel: Any, handle: int) -> None:
        self._client = client
        self._channel = channel
        self._handle = handle
        self._call: Any = None
        # Guards the bookkeeping below once a pump thread takes the events.
        self._lock = threading.Lock()
        self._due: set[str] = set()  # batches started and not yet taken from the queue
        self._sending = False
        self._backlog: deque[bytes] = deque()
        self._responses: deque[ep.ProcessingResponse] = deque()
        self._eof = False  # no message can come any more
        self._status: tuple[int, str] | None = None
        self._expired = False
        self._closed = False
        self._replies: pumped.Replies | None = None
        self._ended = False  # the pump put the End
        self._received_any = False  # a RECV batch was started

    # Sending --------------------------------------------------------------------------

    def send(self, request: ep.ProcessingRequest) -> None:
        data = request.SerializeToString()
        with self._lock:
            if self._call is None:
                self._open(data)
            elif self._status is not None or self._closed:
                return  # the call is over: the next recv says how
            elif self._sending:
                self._backlog.append(data)
            else:
                self._send(data)

    def _open(self, data: bytes) -> None:
        settings = self._client.settings
        metadata = settings.metadata or None
        timeout = settings.stream_timeout
        self._call = self._channel.segregated_call(
            cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS,
            METHOD,
            None,
            None if timeout is None else time.time() + timeout,
            metadata,
            None,
            (
                (
                    (
                        cygrpc.SendInitialMetadataOperation(metadata, 0),
                        cygrpc.SendMessageOperation(data, 0),
                    ),
                    _SEND,
                ),
                ((cygrpc.ReceiveStatusOnClientOperation(0),), _STATUS),
            ),
            None,
            self._handle,
        )
        self._due.update((_SEND, _STATUS))
        self._sending = True

    def _send(self, data: bytes) -> None:
        self._operate((cygrpc.SendMessageOperation(data, 0),), _SEND)
        self._sending = True

    def _operate(self, operations: tuple[Any, ...], tag: str) -> None:
        # False: the call already ended and freed its queue; nothing was started.
        if self._call.operate(operations, tag):
            self._due.add(tag)

    def _start_recv(self) -> None:
        if _RECV in self._due or self._eof or self._status is not None:
            return
        receive = cygrpc.ReceiveMessageOperation(0)
        if self._received_any:
            self._operate((receive,), _RECV)
        else:
            # The server's initial metadata comes before its first message: one batch.
            self._operate((cygrpc.ReceiveInitialMetadataOperation(0), receive), _RECV)
            self._received_any = True

    # Receiving ------------------------------------------------------------------------

    def _take(self, event: Any) -> None:
        """Account for one completed batch (with the lock held when pumped)."""
        tag = event.tag
        self._due.discard(tag)
        if tag == _RECV:
            message = event.batch_operations[-1].message()
            if message is None:
                self._eof = True
                return
            try:
                self._responses.append(ep.ProcessingResponse.FromString(message))
            except DecodeError:
                # As grpcio's stub answers a reply it cannot parse.
                self._eof = True
                self._call.cancel(cygrpc.StatusCode.internal, "Exception deserializing response!")
        elif tag == _STATUS:
            operation = event.batch_operations[0]
            details = operation.details()
            if isinstance(details, bytes):
                details = details.decode("utf-8", "replace")
            self._status = (int(operation.code()), details or "")
        elif tag == _SEND:
            self._sending = False
            if self._backlog and self._status is None and not self._closed:
                self._send(self._backlog.popleft())

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        if self._replies is not None:
            return pumped.recv(self._replies, timeout)
        call = self._call
        assert call is not None, "recv before send"
        timer = self._client.watchdog.arm(timeout, self._expire)
        try:
            while not self._responses:
                with self._lock:
                    self._start_recv()
                    if _RECV not in self._due and _STATUS not in self._due:
                        break
                event = call.next_event()
                with self._lock:
                    self._take(event)
        finally:
            Watchdog.disarm(timer)
        if self._expired:
            raise ProcessorTimeout(f"no reply within {timeout:g}s")
        if self._responses:
            return self._responses.popleft()
        assert self._status is not None
        code, details = self._status
        if code == 0:
            return None
        raise ProcessorStreamError(code, details)

    def _expire(self) -> None:
        self._expired = True
        if self._call is not None:
            self._call.cancel(cygrpc.StatusCode.cancelled, "message timeout")

    # Pumped ---------------------------------------------------------------------------

    def start_pump(self) -> None:
        with self._lock:
            if self._replies is not None or self._call is None:
                return
            self._replies = queue.SimpleQueue()
            self._deliver()
            if not self._due:
                return
        self._client.pumps.submit(self._pump)

    def ready(self) -> bool:
        return self._replies is not None and not self._replies.empty()

    def _pump(self) -> None:
        call = self._call
        while True:
            with self._lock:
                if not self._due:
                    return
            event = call.next_event()
            with self._lock:
                self._take(event)
                self._deliver()

    def _deliver(self) -> None:
        """Pumped: hand over what came, keep a RECV going, and put the End once it is over."""
        replies = self._replies
        assert replies is not None
        while self._responses:
            replies.put(self._responses.popleft())
        if self._closed:
            return
        self._start_recv()
        if not self._ended and self._status is not None and _RECV not in self._due:
            self._ended = True
            replies.put(pumped.End(*self._status))

    # Closing --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            call = self._call
            if call is None or self._closed:
                return
            self._closed = True
            self._backlog.clear()
            if self._status is None and self._due:
                self._operate((cygrpc.SendCloseFromClientOperation(0),), _CLOSE)
            call.cancel(cygrpc.StatusCode.cancelled, "Cancelled")
            pumped_ = self._replies is not None
        if pumped_:
            return  # the pump takes what is still due, then returns
        # Everything due completes at once after the cancel.
        while self._due:
            self._take(call.next_event())
