"""The gRPC side of ext_proc: one channel per processor target, one stream per HTTP exchange.

The synchronous stub takes a request iterator and gRPC pulls it on a thread of its own, so each
stream is fed through a queue-backed generator that ends on a ``None`` sentinel (the half-close).
``next(call)`` cannot time out (grpc/grpc#20562): a single shared watchdog thread cancels a
call whose reply is late, and :meth:`ProcessorStream.recv` reports that as a timeout.

Where replies may come while the worker is busy reading a body (STREAMED, FULL_DUPLEX_STREAMED),
a pump task on a shared pool drains the call into a queue instead, so the worker can look for
replies without blocking (:meth:`ProcessorStream.ready`).
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.config import ProcessorSettings
from extproc.errors import ProcessorStreamError, ProcessorTimeout


class _Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False


class Watchdog:
    """Runs callbacks at deadlines on one thread, so no thread is started per message."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Timer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + delay, callback)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="extproc-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (timer.deadline, next(self._counter), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()
        return timer

    @staticmethod
    def disarm(timer: _Timer) -> None:
        # Left in the heap and skipped when due: cheaper than removing it now.
        timer.cancelled = True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while not self._stopped:
                # Nearly every timer is disarmed by its reply long before it is due: drop
                # those at the top now, so the thread wakes only for a live deadline, not
                # once per message.
                while heap and heap[0][2].cancelled:
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                delay = heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(heap)[2].callback()


@dataclass(frozen=True, slots=True)
class _End:
    """The pump's last item: how the stream ended."""

    code: int
    details: str


class ProcessorClient:
    """One gRPC channel to the processor, shared by every worker thread of the process."""

    def __init__(self, settings: ProcessorSettings, max_streams: int = 64) -> None:
        self.settings = settings
        options: list[tuple[str, str | int]] = list(settings.channel_args)
        if settings.authority:
            options.append(("grpc.default_authority", settings.authority))
        if settings.credentials is None:
            self._channel = grpc.insecure_channel(settings.target, options=options)
        else:
            self._channel = grpc.secure_channel(
                settings.target, settings.credentials, options=options
            )
        self._process = ep_grpc.ExternalProcessorStub(self._channel).Process
        self.watchdog = Watchdog()
        # Pump threads are started on demand and reused: none is started per request.
        self.pumps = ThreadPoolExecutor(max_streams, thread_name_prefix="extproc-pump")

    def open_stream(self) -> ProcessorStream:
        return ProcessorStream(self)

    def start_call(self, requests: Iterator[ep.ProcessingRequest]) -> Any:
        # A grpc _MultiThreadedRendezvous: both the response iterator and the call.
        return self._process(
            requests,
            timeout=self.settings.stream_timeout,
            metadata=self.settings.metadata or None,
        )

    def close(self) -> None:
        self.watchdog.stop()
        self._channel.close()
        self.pumps.shutdown(wait=True, cancel_futures=True)


class ProcessorStream:
    """One Process stream; opened on the first :meth:`send`."""

    __slots__ = ("_client", "_queue", "_call", "_expired", "_replies")

    def __init__(self, client: ProcessorClient) -> None:
        self._client = client
        self._queue: queue.SimpleQueue[ep.ProcessingRequest | None] = queue.SimpleQueue()
        self._call: Any = None
        self._expired = False
        self._replies: queue.SimpleQueue[ep.ProcessingResponse | _End] | None = None

    def _requests(self) -> Iterator[ep.ProcessingRequest]:
        while (request := self._queue.get()) is not None:
            yield request

    def send(self, request: ep.ProcessingRequest) -> None:
        self._queue.put(request)
        if self._call is None:
            self._call = self._client.start_call(self._requests())

    def start_pump(self) -> None:
        """From now on, replies are drained into a queue by a pool thread."""
        if self._replies is None and self._call is not None:
            self._replies = queue.SimpleQueue()
            self._client.pumps.submit(_pump, self._call, self._replies)

    def ready(self) -> bool:
        """Whether a reply (or the end) is waiting; only meaningful once pumped."""
        return self._replies is not None and not self._replies.empty()

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        """The next reply, or None when the processor closed the stream with OK.

        Raises :class:`ProcessorTimeout` after ``timeout`` seconds and
        :class:`ProcessorStreamError` when the stream ends with another status.
        """
        if self._replies is not None:
            return self._recv_pumped(timeout)
        call = self._call
        assert call is not None, "recv before send"
        timer = self._client.watchdog.arm(timeout, self._expire)
        try:
            response: ep.ProcessingResponse = next(call)
        except StopIteration:
            return None
        except grpc.RpcError as err:
            if self._expired:
                raise ProcessorTimeout(f"no reply within {timeout:g}s") from None
            code: grpc.StatusCode = err.code()
            raise ProcessorStreamError(code.value[0], err.details() or "") from None
        finally:
            Watchdog.disarm(timer)
        if self._expired:
            raise ProcessorTimeout(f"no reply within {timeout:g}s")
        return response

    def _recv_pumped(self, timeout: float) -> ep.ProcessingResponse | None:
        assert self._replies is not None
        try:
            item = self._replies.get(timeout=max(timeout, 0))
        except queue.Empty:
            raise ProcessorTimeout(f"no reply within {timeout:g}s") from None
        if isinstance(item, _End):
            self._replies.put(item)  # the end stays the answer to every later recv
            if item.code == 0:
                return None
            raise ProcessorStreamError(item.code, item.details)
        return item

    def _expire(self) -> None:
        self._expired = True
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        """Half-close, then cancel, as Envoy does at the end of an exchange."""
        if self._call is not None:
            self._queue.put(None)
            self._call.cancel()
            self._call = None


def _pump(call: Any, replies: queue.SimpleQueue[ep.ProcessingResponse | _End]) -> None:
    try:
        for response in call:
            replies.put(response)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        replies.put(_End(code.value[0], err.details() or ""))
        return
    replies.put(_End(0, ""))
