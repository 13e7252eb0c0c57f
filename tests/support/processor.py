"""A real gRPC ext_proc processor, scripted per test (the role of Envoy's TestProcessor).

A test hands `ScriptedProcessor` a handler; the handler runs once per Process stream on its own
thread and talks to the client through `ProcessorStream.recv` / `send` / `abort`. Each stream
uses three threads:

* a reader thread drains the gRPC request iterator into an in-queue, so the handler can wait
  for the next message with a timeout (the request iterator itself has none);
* the handler thread runs the test's script;
* the gRPC servicer thread yields whatever the handler put in an out-queue, so `send` reaches
  the wire while the handler keeps running (a sync servicer can only write by yielding).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Final, Literal, Self

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2

__all__ = [
    "CANCELLED",
    "HALF_CLOSED",
    "SERVER_ENDED",
    "EndReason",
    "Handler",
    "ProcessorStream",
    "ScriptedProcessor",
    "continue_all",
    "immediate_on",
    "mutating",
    "on",
    "header_items",
    "header_value",
    "immediate",
    "matching_reply",
    "mutate_headers",
]

EndReason = Literal["half_closed", "cancelled", "server_ended"]
HALF_CLOSED: Final = "half_closed"
CANCELLED: Final = "cancelled"
# The handler returned or aborted before the client half-closed or cancelled; once the server
# has sent its status gRPC no longer reports what the client does, so there is nothing more
# precise to say.
SERVER_ENDED: Final = "server_ended"

DEFAULT_TIMEOUT_S: Final = 10.0
# A script that neither sends nor finishes for this long is stuck; ending the stream beats
# holding a server thread until the test's own timeout kills the whole run.
_PUMP_IDLE_LIMIT_S: Final = 120.0
_STOP_JOIN_S: Final = 5.0

_stream_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class _Send:
    response: Any


@dataclasses.dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    details: str


@dataclasses.dataclass(frozen=True)
class _Finish:
    """The handler returned: end the stream with OK."""


@dataclasses.dataclass(frozen=True)
class _Terminated:
    """The RPC is over (cancelled, or the server stopped): stop yielding."""


_Out = _Send | _Abort | _Finish | _Terminated


class ProcessorStream:
    """One Process stream as the test's handler sees it."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.id = next(_stream_ids)
        self.metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata():
            # -bin values arrive as bytes; latin-1 keeps them byte-for-byte in a str.
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            self.metadata.setdefault(key, text)
        self.requests: list[ep.ProcessingRequest] = []
        # What made the handler fail, kept so a test can assert on it after the stream ended.
        self.error: BaseException | None = None
        self._context = context
        self._lock = threading.Lock()
        self._in: queue.Queue[Any] = queue.Queue()  # requests, then None for "no more"
        self._in_drained = False
        self._out: queue.Queue[_Out] = queue.Queue()
        self._aborted = False
        self._server_ended = threading.Event()
        self._reader_saw: EndReason | None = None
        self._client_ended = threading.Event()
        self._rpc_done = threading.Event()
        self._cancelled_by_termination = False
        self._handler_done = threading.Event()
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return (
            f"<ProcessorStream {self.id} requests={len(self.requests)} "
            f"end={self.end_reason} error={self.error!r}>"
        )

    # -- the handler's API ------------------------------------------------------------------

    def recv(self, timeout: float = DEFAULT_TIMEOUT_S) -> ep.ProcessingRequest | None:
        """The next message; None once the client half-closed or cancelled (or the server
        stopped). Raises TimeoutError when nothing arrives within `timeout` seconds."""
        if self._in_drained:
            return None
        try:
            item = self._in.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no ext_proc message within {timeout}s") from None
        if item is None:
            self._in_drained = True
        return item

    def send(self, response: ep.ProcessingResponse) -> None:
        """Queue one response; the servicer thread writes it right away.

        After the client cancelled the response is dropped, as a real server's would be."""
        with self._lock:
            if self._aborted:
                raise RuntimeError("send() after abort(): the stream is already over")
        self._out.put(_Send(response))

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with `code` and `details`; the handler should return after this."""
        if code == grpc.StatusCode.OK:
            raise ValueError("return from the handler to end the stream with OK")
        with self._lock:
            if self._aborted:
                raise RuntimeError("abort() called twice")
            self._aborted = True
        self._out.put(_Abort(code, details))

    # -- the test's API ---------------------------------------------------------------------

    @property
    def end_reason(self) -> EndReason | None:
        """How the client side ended, None while it has not.

        A cancel that follows a half-close still counts as "cancelled": the RPC was reset
        before the server finished it."""
        if not self._client_ended.is_set():
            return None
        if self._cancelled_by_termination:
            return CANCELLED
        return self._reader_saw

    def wait_ended(self, timeout: float = DEFAULT_TIMEOUT_S) -> EndReason:
        """Wait until the client side ended; returns "half_closed" or "cancelled" (or
        "server_ended" when the handler ended the stream first)."""
        if not self._client_ended.wait(timeout):
            raise TimeoutError(f"stream {self.id}: client side still open after {timeout}s")
        reason = self.end_reason
        assert reason is not None
        return reason

    def wait_terminated(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait until the RPC is over at the gRPC level (status sent, or cancelled); a
        handler may call this to outlive a client cancel."""
        if not self._rpc_done.wait(timeout):
            raise TimeoutError(f"stream {self.id}: RPC still live after {timeout}s")

    def wait_done(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait until the stream is over on every side: the RPC terminated, the client side
        ended and the handler returned (so `requests` and `error` are final)."""
        deadline = time.monotonic() + timeout
        for what, event in (
            ("rpc", self._rpc_done),
            ("client side", self._client_ended),
            ("handler", self._handler_done),
        ):
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"stream {self.id}: {what} not finished after {timeout}s")

    @property
    def done(self) -> bool:
        return all(e.is_set() for e in (self._rpc_done, self._client_ended, self._handler_done))

    # -- plumbing ---------------------------------------------------------------------------

    def _start(self, handler: Handler, request_iterator: Iterator[Any]) -> None:
        if not self._context.add_callback(self._on_rpc_done):
            self._on_rpc_done()
        for name, target, arg in (
            ("reader", self._read, request_iterator),
            ("handler", self._run_handler, handler),
        ):
            thread = threading.Thread(
                target=target,
                args=(arg,),
                name=f"ext-proc-stream-{self.id}-{name}",
                # A handler stuck outside recv() must not keep the interpreter alive.
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _read(self, request_iterator: Iterator[Any]) -> None:
        saw: EndReason = HALF_CLOSED
        try:
            for request in request_iterator:
                with self._lock:
                    self.requests.append(request)
                self._in.put(request)
            # A cancel can surface as a plain end of messages when gRPC handles its
            # receive-message event before its close event. Asking for one more message
            # queues behind that close event, so a cancel now raises RpcError while a
            # half-closed stream just ends again (6000 racing cancels: no misses).
            next(request_iterator, None)
        except grpc.RpcError:
            saw = CANCELLED
        except Exception as exc:  # noqa: BLE001 - a reader thread must not die silently
            self.error = self.error or exc
            saw = CANCELLED
        else:
            if self._server_ended.is_set():
                saw = SERVER_ENDED
        self._reader_saw = saw
        self._client_ended.set()
        self._in.put(None)

    def _run_handler(self, handler: Handler) -> None:
        try:
            handler(self)
        # BaseException too: pytest.fail() and friends raise one, and the test must see it.
        except BaseException as exc:  # noqa: BLE001 - reported to the client and kept
            self.error = exc
            self._out.put(_Abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"))
        else:
            self._out.put(_Finish())
        finally:
            self._handler_done.set()

    def _on_rpc_done(self) -> None:
        # The RPC can only end before the server ended it if the client (or a server stop)
        # cancelled it; after a half-close the RPC stays open until the handler finishes.
        if not self._server_ended.is_set():
            self._cancelled_by_termination = True
        self._rpc_done.set()
        self._out.put(_Terminated())

    def _wake(self) -> None:
        self._in.put(None)
        self._out.put(_Terminated())

    def _responses(self) -> Iterator[Any]:
        """The servicer's response stream: runs on the gRPC server thread."""
        while True:
            try:
                item = self._out.get(timeout=_PUMP_IDLE_LIMIT_S)
            except queue.Empty:
                item = _Abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"scripted handler idle for {_PUMP_IDLE_LIMIT_S}s",
                )
            if isinstance(item, _Send):
                yield item.response
            elif isinstance(item, _Abort):
                self._server_ended.set()
                self._context.abort(item.code, item.details)
            elif isinstance(item, _Finish):
                self._server_ended.set()
                return
            else:
                return


Handler = Callable[[ProcessorStream], None]


class _Servicer:
    """Duck-typed ExternalProcessorServicer (the generated base class is untyped)."""

    def __init__(self, processor: ScriptedProcessor) -> None:
        self._processor = processor

    def Process(  # noqa: N802 - the gRPC method name
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        stream = ProcessorStream(context)
        self._processor._register(stream)
        stream._start(self._processor.handler, request_iterator)
        return stream._responses()


class ScriptedProcessor:
    """A gRPC ext_proc server on 127.0.0.1 whose streams run `handler`."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler: Handler = handler or continue_all
        self.streams: list[ProcessorStream] = []
        self._changed = threading.Condition()
        self._stopped = False
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="ext-proc-server")
        self._server = grpc.server(self._executor, options=[("grpc.so_reuseport", 0)])
        ep_grpc.add_ExternalProcessorServicer_to_server(_Servicer(self), self._server)
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        if not self.port:
            self._executor.shutdown(wait=False)
            raise RuntimeError("could not bind the ext_proc test server on 127.0.0.1")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _register(self, stream: ProcessorStream) -> None:
        with self._changed:
            self.streams.append(stream)
            self._changed.notify_all()
        if self._stopped:
            # Accepted while stop() was running: make sure it cannot linger.
            stream._wake()

    @property
    def errors(self) -> list[BaseException]:
        """Every handler failure so far, in stream order."""
        with self._changed:
            streams = list(self.streams)
        return [s.error for s in streams if s.error is not None]

    def wait_streams(self, n: int, timeout: float = DEFAULT_TIMEOUT_S) -> list[ProcessorStream]:
        """Wait until `n` streams were opened and each is done; returns the first `n`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.streams) >= n, timeout):
                raise TimeoutError(
                    f"{len(self.streams)} ext_proc stream(s) opened, wanted {n} in {timeout}s"
                )
            streams = self.streams[:n]
        for stream in streams:
            stream.wait_done(max(0.0, deadline - time.monotonic()))
        return streams

    def stop(self) -> None:
        """Stop the server, wake every handler and wait (bounded) for all threads."""
        with self._changed:
            if self._stopped:
                return
            self._stopped = True
        deadline = time.monotonic() + _STOP_JOIN_S
        # grace=0 cancels every live RPC, which ends each reader and so each recv().
        self._server.stop(grace=0).wait(_STOP_JOIN_S)
        with self._changed:
            streams = list(self.streams)
        for stream in streams:
            stream._wake()
        for stream in streams:
            for thread in stream._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        # grpc.server never shuts its executor down; do it off-thread so the wait is bounded.
        shutdown = threading.Thread(
            target=self._executor.shutdown, name="ext-proc-server-shutdown", daemon=True
        )
        shutdown.start()
        shutdown.join(max(0.0, deadline - time.monotonic()))


# -- replies -------------------------------------------------------------------------------

_REPLY_TYPES: Final = {
    "request_headers": ep.HeadersResponse,
    "response_headers": ep.HeadersResponse,
    "request_body": ep.BodyResponse,
    "response_body": ep.BodyResponse,
    "request_trailers": ep.TrailersResponse,
    "response_trailers": ep.TrailersResponse,
}


def matching_reply(
    request: ep.ProcessingRequest, common: ep.CommonResponse | None = None
) -> ep.ProcessingResponse:
    """The empty (CONTINUE) reply to `request`; `common` fills a headers/body reply's
    `response`."""
    kind = request.WhichOneof("request")
    if kind not in _REPLY_TYPES:
        raise ValueError(f"no reply type for a ProcessingRequest carrying {kind!r}")
    reply_type = _REPLY_TYPES[kind]
    if reply_type is ep.TrailersResponse:
        if common is not None:
            raise ValueError("a TrailersResponse has no CommonResponse; build it by hand")
        reply = reply_type()
    else:
        reply = reply_type(response=common) if common is not None else reply_type()
    return ep.ProcessingResponse(**{kind: reply})


def continue_all(stream: ProcessorStream) -> None:
    """Answer every message with its CONTINUE reply until the client ends the stream."""
    while (request := stream.recv()) is not None:
        stream.send(matching_reply(request))


def _raw(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def mutate_headers(
    set_headers: Sequence[tuple[str, str | bytes]] = (),
    append_headers: Sequence[tuple[str, str | bytes]] = (),
    remove: Sequence[str] = (),
) -> ep.CommonResponse:
    """A CommonResponse whose header mutation sets, appends and removes headers.

    `append` stays unset for set_headers (which the filter treats as overwrite) and is
    BoolValue(true) for append_headers."""
    options = [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=_raw(v)))
        for k, v in set_headers
    ]
    for key, value in append_headers:
        option = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, raw_value=_raw(value))
        )
        option.append.value = True
        options.append(option)
    return ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=options, remove_headers=list(remove))
    )


def immediate(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    details: str = "",
) -> ep.ProcessingResponse:
    """An ImmediateResponse reply: answer the downstream client directly."""
    response = ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status), body=body, details=details
    )
    if headers:
        response.headers.CopyFrom(mutate_headers(set_headers=headers).header_mutation)
    return ep.ProcessingResponse(immediate_response=response)


def _header_values(headers: Any) -> Iterable[Any]:
    # HttpHeaders wraps a HeaderMap in .headers; a HeaderMap's .headers is the list itself.
    if headers.DESCRIPTOR.full_name == ep.HttpHeaders.DESCRIPTOR.full_name:
        headers = headers.headers
    values: Iterable[Any] = headers.headers
    return values


def header_items(headers: ep.HttpHeaders | base_pb2.HeaderMap) -> list[tuple[str, bytes]]:
    """(key, raw value) pairs in order; falls back to `value` when `raw_value` is empty."""
    return [
        (h.key, bytes(h.raw_value) if h.raw_value or not h.value else h.value.encode())
        for h in _header_values(headers)
    ]


def header_value(headers: ep.HttpHeaders | base_pb2.HeaderMap, name: str) -> bytes | None:
    """The first value of header `name` (case-insensitive), or None when absent."""
    wanted = name.lower()
    for key, value in header_items(headers):
        if key.lower() == wanted:
            return value
    return None


ReplyFor = Callable[[ep.ProcessingRequest], ep.ProcessingResponse]


def on(kind: str, reply: ReplyFor, recv_timeout: float = 30.0) -> Handler:
    """Answer messages of ``kind`` with ``reply(message)``, every other one with CONTINUE."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv(recv_timeout)) is not None:
            if message.WhichOneof("request") == kind:
                stream.send(reply(message))
            else:
                stream.send(matching_reply(message))

    return handler


def mutating(kind: str, common: ep.CommonResponse) -> Handler:
    """Answer messages of ``kind`` with ``common`` (a CommonResponse), others plainly."""
    return on(kind, lambda message: matching_reply(message, common))


def immediate_on(kind: str, response: ep.ProcessingResponse) -> Handler:
    """Answer the first message of ``kind`` with ``response`` and end the stream."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == kind:
                stream.send(response)
                return
            stream.send(matching_reply(message))

    return handler
