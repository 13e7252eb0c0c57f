"""The one request loop over fakes of its two seams: the HTTP side and the Process stream."""

from __future__ import annotations

from collections import deque
from typing import Any, cast

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.config import ProcessorSettings
from extproc.core.events import (
    Direction,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    RespondLocally,
)
from extproc.core.exchange import Exchange
from extproc.core.record import Ending, RequestRecord
from extproc.core.settings import ExchangeSettings
from extproc.errors import ProcessorTimeout
from extproc.io.processor import ProcessorClient
from extproc.io.request_loop import BodyPiece, RequestLoop
from extproc.io.session import ProcessorSession
from extproc.metrics import Stats
from extproc.models import Headers

EXT_PROC = "http.ingress.ext_proc."


def request_head(method: bytes = b"POST") -> Headers:
    return Headers(
        [(b":authority", b"h"), (b":path", b"/"), (b":method", method), (b":scheme", b"http")]
    )


class FakeStream:
    """A Process stream whose replies are scripted; ``early`` ones are ready at once."""

    def __init__(self) -> None:
        self.sent: list[ep.ProcessingRequest] = []
        self.replies: deque[ep.ProcessingResponse] = deque()
        self.early = False
        self.closed = False
        self.listening = False

    def send(self, request: ep.ProcessingRequest) -> None:
        self.sent.append(request)

    def start_pump(self) -> None:
        pass

    def listen(self) -> None:
        self.listening = True

    def ready(self) -> bool:
        return self.early and bool(self.replies)

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        if not self.replies:
            raise ProcessorTimeout("no reply scripted")
        return self.replies.popleft()

    def close(self) -> None:
        self.closed = True


class FakeClient:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream

    def open_stream(self) -> FakeStream:
        return self.stream


class FakeSource:
    def __init__(self, stream: FakeStream) -> None:
        self.client = FakeClient(stream)

    def processor(self, settings: ProcessorSettings, /) -> ProcessorClient:
        return cast(ProcessorClient, self.client)


class FakeHttp:
    """An HTTP side that hands out scripted body pieces and writes down what it is asked."""

    def __init__(self, pieces: list[BodyPiece]) -> None:
        self.pieces = deque(pieces)
        self.calls: list[tuple[str, Any]] = []
        self.proxy: tuple[int, bytes] | None = None
        self.proxy_details = ""
        self.on_read: list[ep.ProcessingResponse] = []  # replies that arrive during a read
        self.stream: FakeStream | None = None
        self.heads: list[Headers] = []
        self.arrived: deque[BodyPiece] = deque()  # there already, read without waiting

    @property
    def responding_from_proxy(self) -> bool:
        return self.proxy is not None

    def read_body(self, direction: Direction, limit: float) -> BodyPiece | None:
        if self.stream is not None and self.on_read:
            self.stream.replies.extend(self.on_read)
            self.stream.early = True
            self.on_read = []
        piece = self.pieces.popleft()
        self.calls.append(("read", piece[0]))
        return piece

    def read_arrived(self, direction: Direction) -> BodyPiece | None:
        if not self.arrived:
            return None
        piece = self.arrived.popleft()
        self.calls.append(("arrived", piece[0]))
        return piece

    def forward_headers(self, action: ForwardHeaders) -> None:
        self.heads.append(action.headers)
        self.calls.append(("headers", (action.direction, action.end_of_stream)))

    def forward_body(self, action: ForwardBody) -> None:
        self.calls.append(("body", (action.data, action.end_of_stream)))

    def forward_trailers(self, action: ForwardTrailers) -> None:
        self.calls.append(("trailers", action.trailers.regular()))

    def respond_from_proxy(self, status: int, body: bytes, details: str) -> None:
        self.proxy = (status, body)
        self.calls.append(("proxy", status))
        self.proxy_details = details

    def answer_locally(self, reply: RespondLocally) -> None:
        self.calls.append(("local", reply.status))


def make_loop(
    http: FakeHttp, stream: FakeStream, stats: Stats, **settings: Any
) -> tuple[RequestLoop, RequestRecord]:
    exchange_settings = ExchangeSettings(**settings)
    record = RequestRecord(method=b"POST", path=b"/")
    exchange = Exchange(exchange_settings, record=record)
    session = ProcessorSession(FakeSource(stream), ProcessorSettings(target="unused"), 1.0, record)
    http.stream = stream
    return RequestLoop(exchange, session, http, stats, reply_first=False), record


def headers_reply(common: ep.CommonResponse | None = None) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))


def test_request_loop_reads_forwards_and_records_through_its_seams() -> None:
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([(b"ab", False, None), (b"cd", False, [(b"x-t", b"1")])])
    loop, record = make_loop(http, stream, stats)
    stream.replies.append(headers_reply())
    loop.begin(Direction.REQUEST, request_head(), False)
    loop.run(Direction.REQUEST)
    assert http.calls == [
        ("headers", (Direction.REQUEST, False)),
        ("read", b"ab"),
        ("body", (b"ab", False)),
        ("read", b"cd"),
        ("body", (b"cd", False)),
        ("trailers", [(b"x-t", b"1")]),
    ]
    assert not loop.answer()
    loop.finish()
    assert record.bytes_in == 4 and record.messages_sent == 1 and record.messages_received == 1
    assert record.phase_times is not None and set(record.phase_times) == {"request_headers"}
    assert stream.closed
    snapshot = stats.snapshot()
    assert snapshot[EXT_PROC + "streams_started"] == 1
    assert snapshot[EXT_PROC + "processor_time.count"] == 1


def test_request_loop_takes_ready_replies_before_feeding_a_read_piece() -> None:
    # An immediate response that came while the piece was read ends the exchange first: the
    # piece never goes to the processor.
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([(b"ab", False, None)])
    body_mode = ProcessingMode(
        request_header_mode=ProcessingMode.SKIP, request_body_mode=ProcessingMode.STREAMED
    )
    loop, record = make_loop(http, stream, stats, processing_mode=body_mode)
    loop.begin(Direction.REQUEST, request_head(), False)
    assert loop.step(Direction.REQUEST)  # the first piece goes to the processor
    http.pieces.append((b"cd", True, None))
    http.on_read = [
        ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(status={"code": 403}))
    ]
    assert loop.step(Direction.REQUEST)
    assert not loop.step(Direction.REQUEST)
    assert [r.request_body.body for r in stream.sent] == [b"ab"]
    assert loop.answer() and http.calls[-1] == ("local", 403)
    assert record.ending is Ending.IMMEDIATE_RESPONSE and record.answered_locally


def test_request_loop_answers_503_for_a_request_line_a_processor_broke() -> None:
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([])
    loop, _ = make_loop(http, stream, stats)
    mutation = ep.HeaderMutation(
        set_headers=[
            {"header": {"key": ":path", "raw_value": b"/a b"}},
        ]
    )
    stream.replies.append(headers_reply(ep.CommonResponse(header_mutation=mutation)))
    loop.begin(Direction.REQUEST, request_head(b"GET"), True)
    loop.run(Direction.REQUEST)
    assert http.calls == [("proxy", 503)]
    # As Envoy's parity run shows (tests/parity/test_control_parity.py, request-line-unwritable).
    assert http.proxy_details == "upstream_reset_before_response_started{connection_termination}"
    assert not loop.step(Direction.REQUEST)


def test_request_loop_sets_metadata_headers_on_the_request_head() -> None:
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([])
    loop, record = make_loop(
        http,
        stream,
        stats,
        receiving_namespaces=frozenset({"ns"}),
        metadata_headers=(("ns", b"x-ns"),),
    )
    response = headers_reply()
    response.dynamic_metadata.update({"ns": {"user": "alice"}})
    stream.replies.append(response)
    loop.begin(Direction.REQUEST, request_head(b"GET"), True)
    loop.run(Direction.REQUEST)
    assert [h.get(b"x-ns") for h in http.heads] == [b'{"user":"alice"}']
    assert record.dynamic_metadata is not None and set(record.dynamic_metadata) == {"ns"}


def test_request_loop_message_timeout_answers_504_and_counts_it() -> None:
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([])
    loop, record = make_loop(http, stream, stats)
    loop.begin(Direction.REQUEST, request_head(b"GET"), True)
    loop.run(Direction.REQUEST)  # no reply is scripted: the wait times out
    assert loop.local is not None and loop.local.status == 504
    assert record.ending is Ending.MESSAGE_TIMEOUT
    loop.finish()
    assert stats.snapshot()[EXT_PROC + "message_timeouts"] == 1


def test_request_loop_takes_a_message_sent_unasked_before_the_response_phase() -> None:
    # The request went on and no reply is owed: the stream listens, and what came while the
    # upstream answered is spurious before the response headers go to the processor.
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([])
    loop, record = make_loop(http, stream, stats)
    stream.replies.append(headers_reply())
    loop.begin(Direction.REQUEST, request_head(b"GET"), True)
    loop.run(Direction.REQUEST)
    assert stream.listening
    stream.replies.append(ep.ProcessingResponse(response_headers=ep.HeadersResponse()))
    stream.early = True
    response_head = Headers([(b":status", b"200"), (b"content-length", b"0")])
    loop.begin(Direction.RESPONSE, response_head, True)
    assert not loop.step(Direction.RESPONSE)
    assert [r.WhichOneof("request") for r in stream.sent] == ["request_headers"]
    assert loop.answer() and http.calls[-1] == ("local", 500)
    assert record.ending is Ending.BAD_REPLY and record.spurious == 1


def test_request_loop_sends_a_streamed_body_that_arrived_whole_as_one_message() -> None:
    # STREAMED: the body came with the head, before the headers reply; it goes as one message
    # with its end, the head held for that message's reply (BUFFERED semantics, as Envoy).
    stream, stats = FakeStream(), Stats()
    http = FakeHttp([])
    http.arrived.extend([(b"ab", False, None), (b"cd", False, None), (b"", True, None)])
    streamed = ProcessingMode(request_body_mode=ProcessingMode.STREAMED)
    loop, record = make_loop(http, stream, stats, processing_mode=streamed)
    stream.replies.append(headers_reply())
    mutation = ep.HeaderMutation(set_headers=[{"header": {"key": "x-b", "raw_value": b"1"}}])
    stream.replies.append(
        ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=ep.CommonResponse(header_mutation=mutation))
        )
    )
    loop.begin(Direction.REQUEST, request_head(), False)
    loop.run(Direction.REQUEST)
    bodies = [(r.request_body.body, r.request_body.end_of_stream) for r in stream.sent[1:]]
    assert bodies == [(b"abcd", True)]
    assert [c[0] for c in http.calls] == ["arrived", "arrived", "arrived", "headers", "body"]
    assert http.heads[0].get(b"x-b") == b"1"
    assert http.calls[-1] == ("body", (b"abcd", True))
    assert record.bytes_in == 4
