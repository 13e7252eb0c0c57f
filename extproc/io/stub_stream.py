"""The ``stub`` client: grpc's synchronous stub, each stream fed by a queue-backed iterator.

The stub takes a request iterator and grpc pulls it on a thread it starts for the call, so each
stream is fed through a generator over a queue that ends on a ``None`` sentinel (the
half-close). ``next(call)`` cannot time out (grpc/grpc#20562): the client's watchdog cancels a
call whose reply is late, and :meth:`StubStream.recv` reports that as a timeout.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.apis import process_method
from extproc.errors import ProcessorStreamError, ProcessorTimeout
from extproc.io import pumped
from extproc.io.watchdog import Watchdog

if TYPE_CHECKING:
    from extproc.io.processor import ProcessorClient


def opener(client: ProcessorClient) -> Callable[[], StubStream]:
    settings = client.settings
    # What the generated stub does, on the method path of the processor's API version.
    process = client.channel.stream_stream(
        process_method(settings.api),
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )

    def start_call(requests: Iterator[ep.ProcessingRequest]) -> Any:
        # A grpc _MultiThreadedRendezvous: both the response iterator and the call.
        return process(
            requests, timeout=settings.stream_timeout, metadata=settings.metadata or None
        )

    return lambda: StubStream(client, start_call)


class StubStream:
    """One Process stream through the stub; opened on the first :meth:`send`."""

    __slots__ = ("_client", "_start_call", "_queue", "_call", "_expired", "_replies")

    def __init__(
        self, client: ProcessorClient, start_call: Callable[[Iterator[ep.ProcessingRequest]], Any]
    ) -> None:
        self._client = client
        self._start_call = start_call
        self._queue: queue.SimpleQueue[ep.ProcessingRequest | None] = queue.SimpleQueue()
        self._call: Any = None
        self._expired = False
        self._replies: pumped.Replies | None = None

    def _requests(self) -> Iterator[ep.ProcessingRequest]:
        while (request := self._queue.get()) is not None:
            yield request

    def send(self, request: ep.ProcessingRequest) -> None:
        self._queue.put(request)
        if self._call is None:
            self._call = self._start_call(self._requests())

    def start_pump(self) -> None:
        if self._replies is None and self._call is not None:
            self._replies = queue.SimpleQueue()
            self._client.pumps.submit(_pump, self._call, self._replies)

    def listen(self) -> None:
        # A blocking iterator cannot be asked whether a reply came: a pool thread drains it.
        self.start_pump()

    def ready(self) -> bool:
        return self._replies is not None and not self._replies.empty()

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        if self._replies is not None:
            return pumped.recv(self._replies, timeout)
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

    def _expire(self) -> None:
        self._expired = True
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        if self._call is not None:
            self._queue.put(None)
            self._call.cancel()
            self._call = None


def _pump(call: Any, replies: pumped.Replies) -> None:
    try:
        for response in call:
            replies.put(response)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        replies.put(pumped.End(code.value[0], err.details() or ""))
        return
    replies.put(pumped.End(0, ""))
