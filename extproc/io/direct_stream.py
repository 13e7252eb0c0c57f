"""The ``direct`` client: a Process stream driven from the worker's own thread.

grpcio can run a call without any thread of its own: a *segregated call* has a completion
queue of its own, ``operate(ops, tag)`` starts a batch of operations on it and ``next_event()``
waits, in the calling thread, for the next batch to complete. grpcio's single-threaded
unary-stream option is built the same way (grpc/grpc#20753). Here a stream runs as:

* :meth:`DirectStream.send` holds the message until the worker next waits for a reply, pumps or
  closes: in the header and BUFFERED modes a reply is awaited after every message, so the
  message and the wait for its reply go out as one batch (EXCHANGE). The first also opens the
  call, with a second batch (STATUS) due until the call ends;
* :meth:`DirectStream.recv` takes the call's events until a message, or the end, has come;
* gRPC lets one message be on its way at a time: a message sent while another is still going
  out waits in a backlog and goes when that one's batch completes, so a send never blocks;
* :meth:`DirectStream.close` half-closes, cancels, and reaps every batch still due: the call
  and its completion queue are freed only when nothing is due any more;
* once pumped (STREAMED, FULL_DUPLEX_STREAMED, observability mode), a pool task owns
  ``next_event()``, puts the replies in a queue and starts what follows a completed batch (the
  next message of the backlog, the next receive); the worker never waits on the call.

The cost that remains is grpcio's: each batch and each event takes the channel's condition
(shared by every call of the channel) once. A late reply is cut short the same way as with
the stub: the client's watchdog cancels the call.
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

from extproc.apis import process_method
from extproc.errors import ProcessorStreamError, ProcessorTimeout
from extproc.io import pumped
from extproc.io.watchdog import Watchdog

if TYPE_CHECKING:
    from extproc.io.processor import ProcessorClient

# Batch tags: what a completed event was. EXCHANGE sends a message and receives the next one.
_SEND, _RECV, _EXCHANGE, _STATUS, _CLOSE = "send", "recv", "exchange", "status", "close"
# An empty batch: it completes at once, behind every batch that completed before it started.
_PROBE = "probe"
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
    method = process_method(client.settings.api).encode()
    handle = channel.get_registered_call_handle(method)
    return lambda: DirectStream(client, channel, method, handle)


class DirectStream:
    """One Process stream as a segregated call; opened when its first message goes out."""

    __slots__ = (
        "_client",
        "_channel",
        "_method",
        "_handle",
        "_call",
        "_lock",
        "_due",
        "_held",
        "_sending",
        "_backlog",
        "_responses",
        "_eof",
        "_status",
        "_expired",
        "_closed",
        "_replies",
        "_ended",
        "_metadata_asked",
    )

    def __init__(self, client: ProcessorClient, channel: Any, method: bytes, handle: int) -> None:
        self._client = client
        self._channel = channel
        self._method = method
        self._handle = handle
        self._call: Any = None
        # Guards the bookkeeping below once a pump thread takes the events.
        self._lock = threading.Lock()
        self._due: set[str] = set()  # batches started and not yet taken from the queue
        self._held: bytes | None = None  # sent, not yet started (see send)
        self._sending = False  # a batch with a message in it is in flight
        self._backlog: deque[bytes] = deque()
        self._responses: deque[ep.ProcessingResponse] = deque()
        self._eof = False  # no message can come any more
        self._status: tuple[int, str] | None = None
        self._expired = False
        self._closed = False
        self._replies: pumped.Replies | None = None
        self._ended = False  # the pump put the End
        self._metadata_asked = False

    # Sending --------------------------------------------------------------------------

    def send(self, request: ep.ProcessingRequest) -> None:
        """Send ``request``; it may be held until the next :meth:`recv`, :meth:`start_pump`
        or :meth:`close`, so that it leaves in one batch with the wait for its reply."""
        data = request.SerializeToString()
        with self._lock:
            if self._closed or self._status is not None:
                return  # the call is over: the next recv says how
            if self._replies is not None:
                self._start(data, receive=False)
                return
            if self._held is not None:
                self._start(self._held, receive=False)  # two in a row: the first goes now
            self._held = data

    def _start(self, data: bytes, *, receive: bool) -> None:
        """Start a batch sending ``data`` (and, with ``receive``, taking the next message)."""
        if self._call is None:
            self._open(data, receive)
        elif self._sending:
            self._backlog.append(data)
        elif receive and not self._receiving():
            self._operate((cygrpc.SendMessageOperation(data, 0), *self._receive_ops()), _EXCHANGE)
            self._sending = True
        else:
            self._operate((cygrpc.SendMessageOperation(data, 0),), _SEND)
            self._sending = True

    def _open(self, data: bytes, receive: bool) -> None:
        settings = self._client.settings
        metadata = settings.metadata or None
        timeout = settings.stream_timeout
        first: tuple[Any, ...] = (
            cygrpc.SendInitialMetadataOperation(metadata, 0),
            cygrpc.SendMessageOperation(data, 0),
        )
        tag = _SEND
        if receive:
            first, tag = (*first, *self._receive_ops()), _EXCHANGE
        self._call = self._channel.segregated_call(
            cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS,
            self._method,
            None,
            None if timeout is None else time.time() + timeout,
            metadata,
            None,
            ((first, tag), ((cygrpc.ReceiveStatusOnClientOperation(0),), _STATUS)),
            None,
            self._handle,
        )
        self._due.update((tag, _STATUS))
        self._sending = True

    def _operate(self, operations: tuple[Any, ...], tag: str) -> None:
        # False: the call already ended and freed its queue; nothing was started.
        if self._call.operate(operations, tag):
            self._due.add(tag)

    def _receiving(self) -> bool:
        return _RECV in self._due or _EXCHANGE in self._due

    def _receive_ops(self) -> tuple[Any, ...]:
        """What takes the next message; the message must stay the batch's last operation."""
        if self._metadata_asked:
            return (cygrpc.ReceiveMessageOperation(0),)
        # The server's initial metadata comes before its first message. Not asked for with
        # the first send: a server that never answers never sends it either, and that batch
        # would then never complete.
        self._metadata_asked = True
        return (cygrpc.ReceiveInitialMetadataOperation(0), cygrpc.ReceiveMessageOperation(0))

    def _start_recv(self) -> None:
        if not (self._receiving() or self._eof or self._status is not None):
            self._operate(self._receive_ops(), _RECV)

    # Receiving ------------------------------------------------------------------------

    def _take(self, event: Any) -> None:
        """Account for one completed batch (with the lock held when pumped)."""
        tag = event.tag
        self._due.discard(tag)
        if tag == _STATUS:
            operation = event.batch_operations[0]
            details = operation.details()
            if isinstance(details, bytes):
                details = details.decode("utf-8", "replace")
            self._status = (int(operation.code()), details or "")
            return
        if tag in (_CLOSE, _PROBE):
            return
        if tag != _RECV:
            self._sending = False
            if self._backlog and self._status is None and not self._closed:
                self._start(self._backlog.popleft(), receive=False)
        if tag == _SEND:
            return
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

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        if self._replies is not None:
            return pumped.recv(self._replies, timeout)
        with self._lock:
            if self._held is not None:
                held, self._held = self._held, None
                self._start(held, receive=True)
        call = self._call
        assert call is not None, "recv before send"
        if not self._responses and not self._over():
            # Armed once the call exists, so that a timer running out can cancel it.
            timer = self._client.watchdog.arm(timeout, self._expire)
            try:
                while not self._responses:
                    with self._lock:
                        self._start_recv()
                        if self._over():
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

    def _over(self) -> bool:
        """Whether nothing more can come: no receive and no status due."""
        return not self._receiving() and _STATUS not in self._due

    def listen(self) -> None:
        with self._lock:
            if self._replies is None and self._call is not None and not self._closed:
                self._start_recv()

    def _expire(self) -> None:
        self._expired = True
        if self._call is not None:
            self._call.cancel(cygrpc.StatusCode.cancelled, "message timeout")

    # Pumped ---------------------------------------------------------------------------

    def start_pump(self) -> None:
        with self._lock:
            if self._replies is not None:
                return
            if self._held is not None:
                held, self._held = self._held, None
                self._start(held, receive=False)
            if self._call is None:
                return
            self._replies = queue.SimpleQueue()
            self._deliver()
            if not self._due:
                return
        self._client.pumps.submit(self._pump)

    def ready(self) -> bool:
        if self._replies is not None:
            return not self._replies.empty()
        if not self._responses and self._receiving() and not self._closed:
            self._probe()
        return bool(self._responses) or (self._status is not None and self._over())

    def _probe(self) -> None:
        """Take every batch that completed before now: an empty batch is started, and the
        call's events are taken up to its own, which completes at once."""
        call = self._call
        with self._lock:
            if not call.operate((), _PROBE):
                return
            self._due.add(_PROBE)
        while _PROBE in self._due:
            event = call.next_event()
            with self._lock:
                self._take(event)

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
        if not self._ended and self._status is not None and not self._receiving():
            self._ended = True
            replies.put(pumped.End(*self._status))

    # Closing --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            call = self._call
            self._held = None  # never started: nothing of it reached the processor
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
