"""The exchange's body and trailer phases, event by event (no I/O)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core import modes
from extproc.core.events import (
    Action,
    BodyReceived,
    CloseStream,
    Direction,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    HeadersReceived,
    ProcessorClosed,
    ProcessorReplied,
    RespondFromProxy,
    RespondLocally,
    SendToProcessor,
    TrailersReceived,
)
from extproc.core.exchange import Exchange
from extproc.core.settings import ExchangeSettings
from extproc.models import Headers

REQ = Direction.REQUEST
RESP = Direction.RESPONSE
PM = ProcessingMode


def head(length: int | None = 5) -> Headers:
    h = Headers(
        [(b":authority", b"a"), (b":path", b"/"), (b":method", b"POST"), (b":scheme", b"http")]
    )
    if length is not None:
        h.add(b"content-length", str(length).encode())
    return h


def exchange(**mode: Any) -> Exchange:
    extra = {
        k: mode.pop(k)
        for k in list(mode)
        if k
        in ("buffer_limit", "failure_mode_allow", "allow_mode_override", "allowed_override_modes")
    }
    return Exchange(ExchangeSettings(processing_mode=PM(**mode), **extra))


def reply(**kw: Any) -> ProcessorReplied:
    return ProcessorReplied(ep.ProcessingResponse(**kw))


def body_mutation(data: bytes) -> ep.CommonResponse:
    return ep.CommonResponse(body_mutation=ep.BodyMutation(body=data))


def sent(actions: list[Action]) -> list[tuple[str, Any]]:
    """What went to the processor: (kind, body or end_of_stream)."""
    out = []
    for a in actions:
        if isinstance(a, SendToProcessor):
            kind = a.request.WhichOneof("request")
            msg = getattr(a.request, kind)
            out.append((kind, msg.body if kind.endswith("_body") else None))
    return out


def request_of(actions: list[Action]) -> ep.ProcessingRequest:
    assert isinstance(actions[0], SendToProcessor), actions
    return actions[0].request


def forwarded(actions: list[Action]) -> list[Any]:
    out: list[Any] = []
    for a in actions:
        if isinstance(a, ForwardHeaders):
            out.append(("headers", a.end_of_stream, a.body_length))
        elif isinstance(a, ForwardBody):
            out.append(("body", a.data, a.end_of_stream))
        elif isinstance(a, ForwardTrailers):
            out.append(("trailers", list(a.trailers)))
    return out


def test_none_mode_streams_body_and_sends_trailers() -> None:
    ex = exchange(request_trailer_mode=PM.SEND, response_header_mode=PM.SKIP)
    ex.handle(HeadersReceived(REQ, head(None), False))
    assert not ex.wants_input(REQ)  # held behind the headers reply
    assert forwarded(ex.handle(reply(request_headers=ep.HeadersResponse()))) == [
        ("headers", False, None)
    ]
    assert ex.wants_input(REQ)
    assert forwarded(ex.handle(BodyReceived(REQ, b"abc", False))) == [("body", b"abc", False)]
    actions = ex.handle(TrailersReceived(REQ, Headers([(b"x-t", b"1")])))
    assert sent(actions) == [("request_trailers", None)]
    mutation = ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-u", raw_value=b"2"))
        ]
    )
    actions = ex.handle(reply(request_trailers=ep.TrailersResponse(header_mutation=mutation)))
    assert forwarded(actions) == [("trailers", [(b"x-t", b"1"), (b"x-u", b"2")])]
    assert ex.output_done(REQ)


def test_buffered_holds_headers_until_the_body_reply() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED, response_header_mode=PM.SKIP)
    first = ex.handle(HeadersReceived(REQ, head(5), False))
    assert request_of(first).request_headers.headers.headers[-1].key == "content-length"
    assert ex.handle(reply(request_headers=ep.HeadersResponse())) == []
    assert ex.wants_input(REQ)
    assert ex.handle(BodyReceived(REQ, b"ab", False)) == []
    assert sent(ex.handle(BodyReceived(REQ, b"cde", True))) == [("request_body", b"abcde")]
    assert not ex.wants_input(REQ)
    common = body_mutation(b"X")
    common.header_mutation.set_headers.add(
        header=base_pb2.HeaderValue(key="content-length", raw_value=b"1")
    )
    actions = ex.handle(reply(request_body=ep.BodyResponse(response=common)))
    assert forwarded(actions) == [("headers", False, 1), ("body", b"X", True)]
    assert isinstance(actions[-1], CloseStream)


def test_buffered_mutated_body_with_stale_length_fails() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED)
    ex.handle(HeadersReceived(REQ, head(5), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(BodyReceived(REQ, b"abcde", True))
    actions = ex.handle(reply(request_body=ep.BodyResponse(response=body_mutation(b"X"))))
    assert isinstance(actions[1], RespondLocally)
    assert actions[1].details == (
        "mismatch_between_content_length_and_the_length_of_the_mutated_body"
    )


def test_buffered_length_is_checked_against_the_body_the_mutation_carries() -> None:
    """A mutation that keeps the body (clear_body false) carries none: 0 bytes against a
    content-length of 5 fails, as in Envoy, although the body that would go on has 5."""
    ex = exchange(request_body_mode=PM.BUFFERED)
    ex.handle(HeadersReceived(REQ, head(5), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(BodyReceived(REQ, b"abcde", True))
    common = ep.CommonResponse()
    common.body_mutation.clear_body = False
    actions = ex.handle(reply(request_body=ep.BodyResponse(response=common)))
    assert isinstance(actions[1], RespondLocally)
    assert actions[1].details == (
        "mismatch_between_content_length_and_the_length_of_the_mutated_body"
    )


def test_buffered_overflow_is_413_on_requests_and_500_on_responses() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED, buffer_limit=4, failure_mode_allow=True)
    ex.handle(HeadersReceived(REQ, head(None), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    out = ex.handle(BodyReceived(REQ, b"12345", False))
    # Envoy's 413 comes from its core: the response phase still sees it.
    assert out == [RespondFromProxy(413, b"Payload Too Large", "request_payload_too_large")]
    assert not ex.complete
    response_head = Headers([(b":status", b"413")])
    assert request_of(ex.handle(HeadersReceived(RESP, response_head, False))).HasField(
        "response_headers"
    )
    ex = exchange(response_body_mode=PM.BUFFERED, buffer_limit=4)
    ex.handle(HeadersReceived(REQ, head(None), True))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(HeadersReceived(RESP, Headers([(b":status", b"200")]), False))
    ex.handle(reply(response_headers=ep.HeadersResponse()))
    out = ex.handle(BodyReceived(RESP, b"12345", False))
    assert isinstance(out[1], RespondLocally) and out[1].status == 500


def test_buffered_body_flushed_by_trailers_is_not_end_of_stream() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED, request_trailer_mode=PM.SEND)
    ex.handle(HeadersReceived(REQ, head(None), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(BodyReceived(REQ, b"ab", False))
    actions = ex.handle(TrailersReceived(REQ, Headers([(b"x-t", b"1")])))
    assert request_of(actions).request_body.end_of_stream is False
    out = ex.handle(reply(request_body=ep.BodyResponse()))
    assert forwarded(out) == [("headers", False, None), ("body", b"ab", False)]
    assert sent(out) == [("request_trailers", None)]


def test_streamed_chunks_answered_in_order_with_flow_control() -> None:
    ex = exchange(request_body_mode=PM.STREAMED, buffer_limit=4)
    ex.handle(HeadersReceived(REQ, head(8), False))
    assert forwarded(ex.handle(reply(request_headers=ep.HeadersResponse()))) == [
        ("headers", False, None)
    ]  # content-length stripped: chunked
    assert sent(ex.handle(BodyReceived(REQ, b"abcd", False))) == [("request_body", b"abcd")]
    assert ex.wants_input(REQ)
    ex.handle(BodyReceived(REQ, b"ef", False))
    assert not ex.wants_input(REQ)  # 6 bytes unanswered > 4
    assert forwarded(
        ex.handle(reply(request_body=ep.BodyResponse(response=body_mutation(b"ABCD"))))
    ) == [("body", b"ABCD", False)]
    assert ex.wants_input(REQ)
    ex.handle(BodyReceived(REQ, b"gh", True))
    assert forwarded(ex.handle(reply(request_body=ep.BodyResponse()))) == [("body", b"ef", False)]
    actions = ex.handle(
        reply(
            request_body=ep.BodyResponse(
                response=ep.CommonResponse(body_mutation=ep.BodyMutation(clear_body=True))
            )
        )
    )
    assert forwarded(actions) == [("body", b"", True)]


def test_streamed_body_reply_before_headers_reply_is_spurious() -> None:
    ex = Exchange(
        ExchangeSettings(
            processing_mode=PM(request_body_mode=PM.STREAMED),
            send_body_without_waiting_for_header_response=True,
        )
    )
    ex.handle(HeadersReceived(REQ, head(3), False))
    assert ex.wants_input(REQ)
    ex.handle(BodyReceived(REQ, b"abc", True))
    out = ex.handle(reply(request_body=ep.BodyResponse()))
    assert isinstance(out[1], RespondLocally) and out[1].details == "spurious_message"


def test_buffered_partial_sends_the_first_part_then_passes_through() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED_PARTIAL, buffer_limit=3)
    ex.handle(HeadersReceived(REQ, head(None), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    assert ex.handle(BodyReceived(REQ, b"ab", False)) == []
    actions = ex.handle(BodyReceived(REQ, b"cd", False))
    assert sent(actions) == [("request_body", b"abcd")]
    assert request_of(actions).request_body.end_of_stream is False
    assert not ex.wants_input(REQ)
    out = ex.handle(reply(request_body=ep.BodyResponse(response=body_mutation(b"AB"))))
    assert forwarded(out) == [("headers", False, None), ("body", b"AB", False)]
    assert forwarded(ex.handle(BodyReceived(REQ, b"ef", True))) == [("body", b"ef", True)]


def test_full_duplex_sends_untimed_and_releases_the_head_with_the_first_body() -> None:
    ex = exchange(request_body_mode=PM.FULL_DUPLEX_STREAMED, request_trailer_mode=PM.SEND)
    ex.handle(HeadersReceived(REQ, head(3), False))
    assert ex.wants_input(REQ)  # body goes out without waiting for the headers reply
    actions = ex.handle(BodyReceived(REQ, b"abc", True))
    assert isinstance(actions[0], SendToProcessor) and not actions[0].timed
    assert ex.handle(reply(request_headers=ep.HeadersResponse())) == []
    assert ex.awaiting_reply
    bad = ex.handle(reply(request_body=ep.BodyResponse()))  # not a streamed_response
    assert isinstance(bad[1], RespondLocally)


def test_full_duplex_streamed_response_is_forwarded() -> None:
    ex = exchange(request_body_mode=PM.FULL_DUPLEX_STREAMED, request_trailer_mode=PM.SEND)
    ex.handle(HeadersReceived(REQ, head(3), False))
    ex.handle(BodyReceived(REQ, b"abc", True))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    streamed = ep.BodyResponse(
        response=ep.CommonResponse(
            body_mutation=ep.BodyMutation(
                streamed_response=ep.StreamedBodyResponse(body=b"xyz", end_of_stream=True)
            )
        )
    )
    assert forwarded(ex.handle(reply(request_body=streamed))) == [
        ("headers", False, None),
        ("body", b"xyz", True),
    ]


def test_full_duplex_errors_never_fail_open_once_data_went_out() -> None:
    ex = exchange(
        request_body_mode=PM.FULL_DUPLEX_STREAMED,
        request_trailer_mode=PM.SEND,
        failure_mode_allow=True,
    )
    ex.handle(HeadersReceived(REQ, head(3), False))
    ex.handle(BodyReceived(REQ, b"abc", True))
    out = ex.handle(ProcessorClosed(14, "gone"))
    assert isinstance(out[1], RespondLocally) and out[1].status == 500


def test_continue_and_replace_creates_a_body_and_drops_the_original() -> None:
    ex = exchange(request_body_mode=PM.STREAMED)
    ex.handle(HeadersReceived(REQ, head(3), False))
    common = body_mutation(b"new")
    common.status = ep.CommonResponse.CONTINUE_AND_REPLACE
    out = ex.handle(reply(request_headers=ep.HeadersResponse(response=common)))
    assert forwarded(out) == [("headers", False, None), ("body", b"new", False)]
    assert ex.wants_input(REQ)  # the original is still read, to be dropped
    assert ex.handle(BodyReceived(REQ, b"old", False)) == []
    # Its end ends the new body; its trailers would be forwarded as they are.
    assert forwarded(ex.handle(TrailersReceived(REQ, Headers([(b"x-t", b"1")])))) == [
        ("trailers", [(b"x-t", b"1")])
    ]
    assert not ex.wants_input(REQ)


def test_buffered_trailers_without_body_send_no_body_message() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED, request_trailer_mode=PM.SEND)
    ex.handle(HeadersReceived(REQ, head(None), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    out = ex.handle(TrailersReceived(REQ, Headers([(b"x-t", b"1")])))
    assert forwarded(out) == [("headers", False, None)]
    assert sent(out) == [("request_trailers", None)]


def test_fail_open_releases_a_held_buffer_unmodified() -> None:
    ex = exchange(request_body_mode=PM.BUFFERED, failure_mode_allow=True)
    ex.handle(HeadersReceived(REQ, head(3), False))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(BodyReceived(REQ, b"abc", True))
    out = ex.handle(ProcessorClosed(13, "boom"))
    assert forwarded(out) == [("headers", False, 3), ("body", b"abc", True)]


def test_mode_override_changes_the_response_body_mode() -> None:
    ex = exchange(allow_mode_override=True)
    ex.handle(HeadersReceived(REQ, head(None), True))
    response = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
    response.mode_override.response_body_mode = PM.BUFFERED
    ex.handle(ProcessorReplied(response))
    ex.handle(HeadersReceived(RESP, Headers([(b":status", b"200")]), False))
    ex.handle(reply(response_headers=ep.HeadersResponse()))
    assert sent(ex.handle(BodyReceived(RESP, b"x", True))) == [("response_body", b"x")]


def test_mode_override_ignored_when_not_allowed() -> None:
    for kw in (
        {},
        {
            "allow_mode_override": True,
            "allowed_override_modes": (PM(response_body_mode=PM.STREAMED),),
        },
    ):
        ex = exchange(**kw)
        ex.handle(HeadersReceived(REQ, head(None), True))
        response = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        response.mode_override.response_body_mode = PM.BUFFERED
        ex.handle(ProcessorReplied(response))
        ex.handle(HeadersReceived(RESP, Headers([(b":status", b"200")]), False))
        ex.handle(reply(response_headers=ep.HeadersResponse()))
        assert forwarded(ex.handle(BodyReceived(RESP, b"x", True))) == [("body", b"x", True)]


def test_merge_override_takes_body_modes_always_and_other_modes_unless_default() -> None:
    base = PM(
        request_header_mode=PM.SEND, response_trailer_mode=PM.SEND, request_body_mode=PM.STREAMED
    )
    merged = modes.merge_override(base, PM(response_header_mode=PM.SKIP))
    assert merged.response_header_mode == PM.SKIP
    assert merged.response_trailer_mode == PM.SEND
    assert merged.request_body_mode == PM.NONE
    assert modes.override_allowed(merged, ())
    assert not modes.override_allowed(merged, (PM(),))
    assert modes.override_allowed(
        merged,
        (
            PM(
                request_header_mode=PM.SKIP,
                response_header_mode=PM.SKIP,
                response_trailer_mode=PM.SEND,
            ),
        ),
    )


def test_strips_content_length() -> None:
    assert modes.strips_content_length(PM.STREAMED, PM.SEND)
    assert modes.strips_content_length(PM.BUFFERED, PM.SKIP)
    assert not modes.strips_content_length(PM.BUFFERED, PM.SEND)
    assert not modes.strips_content_length(PM.NONE, PM.SEND)


# STREAMED body that came while the headers reply was pending -----------------------------


def test_streamed_early_part_of_the_body_is_one_message_after_the_headers_reply() -> None:
    ex = exchange(request_body_mode=PM.STREAMED)
    ex.handle(HeadersReceived(REQ, head(None), False))
    assert ex.takes_arrived_input(REQ) and not ex.wants_input(REQ)
    assert ex.handle(BodyReceived(REQ, b"ab", False)) == []
    assert ex.handle(BodyReceived(REQ, b"cd", False)) == []
    actions = ex.handle(reply(request_headers=ep.HeadersResponse()))
    assert forwarded(actions) == [("headers", False, None)]
    assert sent(actions) == [("request_body", b"abcd")]
    assert not ex.takes_arrived_input(REQ) and ex.wants_input(REQ)


def test_streamed_early_whole_body_fails_open_with_nothing_lost() -> None:
    ex = exchange(request_body_mode=PM.STREAMED, failure_mode_allow=True)
    ex.handle(HeadersReceived(REQ, head(None), False))
    ex.handle(BodyReceived(REQ, b"abc", False))
    ex.handle(BodyReceived(REQ, b"", True))
    actions = ex.handle(ProcessorClosed(14, "unavailable"))
    assert forwarded(actions) == [("headers", False, None), ("body", b"abc", True)]


def test_streamed_early_body_after_a_mode_override_to_none_goes_on() -> None:
    ex = exchange(request_body_mode=PM.STREAMED, allow_mode_override=True)
    ex.handle(HeadersReceived(REQ, head(3), False))
    ex.handle(BodyReceived(REQ, b"abc", False))
    ex.handle(BodyReceived(REQ, b"", True))
    override = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(),
        mode_override=PM(request_body_mode=PM.NONE),
    )
    actions = ex.handle(ProcessorReplied(override))
    assert forwarded(actions) == [("headers", False, 3), ("body", b"abc", True)]
    assert sent(actions) == []


def test_streamed_early_trailers_alone_follow_the_head() -> None:
    ex = exchange(request_body_mode=PM.STREAMED, request_trailer_mode=PM.SEND)
    ex.handle(HeadersReceived(REQ, head(None), False))
    assert ex.handle(TrailersReceived(REQ, Headers([(b"x-t", b"1")]))) == []
    actions = ex.handle(reply(request_headers=ep.HeadersResponse()))
    assert forwarded(actions) == [("headers", False, None)]
    assert sent(actions) == [("request_trailers", None)]


def test_streamed_early_body_goes_on_after_continue_and_replace_without_a_body() -> None:
    ex = exchange(request_body_mode=PM.STREAMED)
    ex.handle(HeadersReceived(REQ, head(1), False))
    ex.handle(BodyReceived(REQ, b"x", False))
    ex.handle(BodyReceived(REQ, b"", True))
    replace = ep.CommonResponse(status=ep.CommonResponse.CONTINUE_AND_REPLACE)
    actions = ex.handle(reply(request_headers=ep.HeadersResponse(response=replace)))
    assert forwarded(actions) == [("headers", False, None), ("body", b"x", True)]
    assert sent(actions) == []
