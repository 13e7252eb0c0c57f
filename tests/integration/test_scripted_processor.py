"""The scripted ext_proc processor, driven by a real gRPC client."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.support.processor import (
    CANCELLED,
    HALF_CLOSED,
    SERVER_ENDED,
    ProcessorStream,
    ScriptedProcessor,
    continue_all,
    header_items,
    header_value,
    immediate,
    matching_reply,
    mutate_headers,
)

pytestmark = pytest.mark.integration

CALL_DEADLINE_S = 20.0
THREAD_EXIT_S = 5.0


class ClientStream:
    """One Process call whose requests the test feeds one at a time."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        # The deadline bounds every blocking read of the response iterator.
        self.call: Any = stub.Process(self._iterate(), metadata=metadata, timeout=CALL_DEADLINE_S)

    def _iterate(self) -> Iterator[Any]:
        while True:
            try:
                item = self._requests.get(timeout=CALL_DEADLINE_S)
            except queue.Empty:
                return
            if item is None:
                return
            yield item

    def send(self, request: Any) -> None:
        self._requests.put(request)

    def half_close(self) -> None:
        self._requests.put(None)

    def next(self) -> Any:
        return next(self.call)

    def close(self) -> None:
        # Ends the request iterator so gRPC's consumer thread exits, whatever state we're in.
        self._requests.put(None)
        self.call.cancel()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_EXIT_S
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    leaked = [t.name for t in set(threading.enumerate()) - before]
    assert not leaked, f"threads outlived the test: {leaked}"


@pytest.fixture
def processor() -> Iterator[ScriptedProcessor]:
    with ScriptedProcessor() as server:
        yield server


@pytest.fixture
def channel(processor: ScriptedProcessor) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(processor.address) as chan:
        yield chan


@pytest.fixture
def open_stream(channel: grpc.Channel) -> Iterator[Any]:
    stub = ep_grpc.ExternalProcessorStub(channel)
    opened: list[ClientStream] = []

    def open_(metadata: tuple[tuple[str, str], ...] = ()) -> ClientStream:
        stream = ClientStream(stub, metadata)
        opened.append(stream)
        return stream

    yield open_
    for stream in opened:
        stream.close()


def headers_request(**pairs: str) -> Any:
    header_map = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=header_map))


def test_continue_all_answers_request_headers(processor, open_stream):
    client = open_stream((("x-test", "one"),))
    client.send(headers_request(host="example"))
    reply = client.next()
    assert reply.WhichOneof("response") == "request_headers"
    assert reply.request_headers == ep.HeadersResponse()

    client.send(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"x", end_of_stream=True)))
    assert client.next().WhichOneof("response") == "request_body"
    client.half_close()
    with pytest.raises(StopIteration):
        client.next()
    assert client.call.code() == grpc.StatusCode.OK

    (stream,) = processor.wait_streams(1)
    assert stream.metadata["x-test"] == "one"
    assert [r.WhichOneof("request") for r in stream.requests] == [
        "request_headers",
        "request_body",
    ]
    assert stream.wait_ended() == HALF_CLOSED
    assert stream.error is None


def test_abort_reaches_the_client(processor, open_stream):
    def deny(stream: ProcessorStream) -> None:
        stream.recv()
        stream.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")

    processor.handler = deny
    client = open_stream()
    client.send(headers_request())
    with pytest.raises(grpc.RpcError) as raised:
        client.next()
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == "not you"
    (stream,) = processor.wait_streams(1)
    assert stream.error is None


def test_half_close_and_cancel_are_told_apart(processor, open_stream):
    closing = open_stream()
    closing.send(headers_request())
    closing.next()
    closing.half_close()
    assert processor.wait_streams(1)[0].wait_ended() == HALF_CLOSED

    cancelling = open_stream()
    cancelling.send(headers_request())
    cancelling.next()
    cancelling.call.cancel()
    stream = processor.wait_streams(2)[1]
    assert stream.wait_ended() == CANCELLED
    assert len(stream.requests) == 1


def test_half_close_is_seen_while_the_stream_stays_open(processor, open_stream):
    verdicts: list[str] = []

    def reply_after_half_close(stream: ProcessorStream) -> None:
        request = stream.recv()
        assert request is not None
        assert stream.recv() is None
        verdicts.append(stream.wait_ended())
        stream.send(matching_reply(request))

    processor.handler = reply_after_half_close
    client = open_stream()
    client.send(headers_request())
    client.half_close()
    assert client.next().WhichOneof("response") == "request_headers"
    with pytest.raises(StopIteration):
        client.next()
    assert verdicts == [HALF_CLOSED]
    assert processor.wait_streams(1)[0].end_reason == HALF_CLOSED


def test_cancel_after_half_close_counts_as_cancel(processor, open_stream):
    received = threading.Event()

    def linger(stream: ProcessorStream) -> None:
        assert stream.recv() is not None
        assert stream.recv() is None
        received.set()
        stream.wait_terminated()

    processor.handler = linger
    client = open_stream()
    client.send(headers_request())
    client.half_close()
    assert received.wait(10)
    client.call.cancel()
    (stream,) = processor.wait_streams(1)
    assert stream.end_reason == CANCELLED
    assert stream.error is None


def test_handler_that_returns_early_ends_the_stream(processor, open_stream):
    def reply_and_leave(stream: ProcessorStream) -> None:
        stream.send(immediate(403, b"no"))

    processor.handler = reply_and_leave
    client = open_stream()
    client.send(headers_request())
    assert client.next().immediate_response.status.code == 403
    with pytest.raises(StopIteration):
        client.next()
    assert client.call.code() == grpc.StatusCode.OK
    (stream,) = processor.wait_streams(1)
    assert stream.end_reason == SERVER_ENDED


def test_handler_exception_is_unknown_and_recorded(processor, open_stream):
    def explode(stream: ProcessorStream) -> None:
        stream.recv()
        raise RuntimeError("boom")

    processor.handler = explode
    client = open_stream()
    client.send(headers_request())
    with pytest.raises(grpc.RpcError) as raised:
        client.next()
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert "boom" in (raised.value.details() or "")
    (stream,) = processor.wait_streams(1)
    assert isinstance(stream.error, RuntimeError)
    assert processor.errors == [stream.error]


def test_send_is_written_while_the_handler_waits(processor, open_stream):
    """Ping-pong: each reply must reach the client before the next request exists."""

    def ping_pong(stream: ProcessorStream) -> None:
        for _ in range(3):
            request = stream.recv()
            assert request is not None
            stream.send(matching_reply(request, mutate_headers(set_headers=[("x-n", "1")])))
        assert stream.recv() is None

    processor.handler = ping_pong
    client = open_stream()
    for _ in range(3):
        client.send(headers_request())
        reply = client.next()
        option = reply.request_headers.response.header_mutation.set_headers[0]
        assert (option.header.key, option.header.raw_value) == ("x-n", b"1")
    client.half_close()
    (stream,) = processor.wait_streams(1)
    assert stream.error is None


def test_recv_times_out(processor, open_stream):
    outcome: list[BaseException] = []

    def impatient(stream: ProcessorStream) -> None:
        try:
            stream.recv(timeout=0.2)
        except TimeoutError as exc:
            outcome.append(exc)

    processor.handler = impatient
    client = open_stream()
    with pytest.raises(StopIteration):
        client.next()
    assert len(outcome) == 1


def test_stop_wakes_a_handler_blocked_in_recv(processor, open_stream):
    entered = threading.Event()
    got: list[object] = []

    def blocked(stream: ProcessorStream) -> None:
        entered.set()
        got.append(stream.recv(timeout=30))

    processor.handler = blocked
    client = open_stream()
    assert entered.wait(10)
    started = time.monotonic()
    processor.stop()
    assert time.monotonic() - started < 3
    assert got == [None]
    with pytest.raises(grpc.RpcError):
        client.next()
    processor.stop()  # idempotent


def test_wait_streams_times_out_without_streams(processor):
    with pytest.raises(TimeoutError):
        processor.wait_streams(1, timeout=0.1)


def test_reply_builders():
    request = headers_request()
    assert matching_reply(request).WhichOneof("response") == "request_headers"
    trailers = ep.ProcessingRequest(response_trailers=ep.HttpTrailers())
    assert matching_reply(trailers).WhichOneof("response") == "response_trailers"
    with pytest.raises(ValueError, match="TrailersResponse"):
        matching_reply(trailers, ep.CommonResponse())

    common = mutate_headers(set_headers=[("a", "1")], append_headers=[("b", b"\xff")], remove=["c"])
    set_opt, append_opt = common.header_mutation.set_headers
    assert not set_opt.HasField("append")
    assert append_opt.append.value is True
    assert append_opt.header.raw_value == b"\xff"
    assert list(common.header_mutation.remove_headers) == ["c"]
    body = matching_reply(ep.ProcessingRequest(response_body=ep.HttpBody()), common)
    assert body.response_body.response == common

    reply = immediate(418, b"tea", headers=[("x-a", "b")], details="short")
    assert reply.immediate_response.status.code == 418
    assert reply.immediate_response.body == b"tea"
    assert reply.immediate_response.details == "short"
    (option,) = reply.immediate_response.headers.set_headers
    assert (option.header.key, option.header.raw_value) == ("x-a", b"b")
    assert not immediate(200).immediate_response.HasField("headers")


def test_header_lookup():
    request = headers_request(host="h", **{"x-a": "1"})
    http_headers = request.request_headers
    assert header_value(http_headers, "X-A") == b"1"
    assert header_value(http_headers.headers, "host") == b"h"
    assert header_value(http_headers, "missing") is None
    assert header_items(http_headers) == [("host", b"h"), ("x-a", b"1")]
    legacy = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="k", value="v")])
    assert header_items(legacy) == [("k", b"v")]


def test_default_handler_is_continue_all():
    with ScriptedProcessor() as server:
        assert server.handler is continue_all
        assert server.address == f"127.0.0.1:{server.port}"
