"""The ext_proc exchange as a pure state machine: events in, actions out, no I/O."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.events import (
    Action,
    BodyReceived,
    CloseStream,
    Direction,
    ForwardHeaders,
    HeadersReceived,
    MessageTimedOut,
    ProcessorClosed,
    ProcessorReplied,
    RespondLocally,
    SendToProcessor,
)
from extproc.core.exchange import Exchange
from extproc.core.mutations import MutationRules
from extproc.core.record import Ending
from extproc.core.settings import ExchangeSettings
from extproc.models import Headers

REQUEST = Headers(
    [
        (b":authority", b"example.com"),
        (b":path", b"/"),
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"x-a", b"1"),
    ]
)
RESPONSE = Headers([(b":status", b"200"), (b"content-length", b"2")])


def settings(**kw: object) -> ExchangeSettings:
    return ExchangeSettings(**kw)  # type: ignore[arg-type]


def mode(**kw: int) -> ProcessingMode:
    return ProcessingMode(**kw)


def set_header(name: str, value: bytes) -> ep.CommonResponse:
    return ep.CommonResponse(
        header_mutation=ep.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, raw_value=value))
            ]
        )
    )


def reply(**kw: object) -> ProcessorReplied:
    return ProcessorReplied(ep.ProcessingResponse(**kw))


def sent(actions: list[Action]) -> ep.ProcessingRequest:
    assert len(actions) == 1 and isinstance(actions[0], SendToProcessor), actions
    return actions[0].request


def test_default_mode_sends_both_header_phases_then_closes() -> None:
    ex = Exchange(settings())
    first = sent(ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), True)))
    assert first.WhichOneof("request") == "request_headers"
    assert first.request_headers.end_of_stream
    assert first.HasField("protocol_config") and first.HasField("metadata_context")
    assert [(h.key, h.raw_value, h.value) for h in first.request_headers.headers.headers][:2] == [
        (":authority", b"example.com", ""),
        (":path", b"/", ""),
    ]
    assert bool(ex.awaiting_reply)

    actions = ex.handle(reply(request_headers=ep.HeadersResponse(response=set_header("x-b", b"2"))))
    assert len(actions) == 1 and isinstance(actions[0], ForwardHeaders)
    assert actions[0].direction is Direction.REQUEST
    assert actions[0].headers.get(b"x-b") == b"2"
    assert not ex.awaiting_reply

    second = sent(ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE.copy(), False)))
    assert second.WhichOneof("request") == "response_headers"
    assert not second.HasField("protocol_config")
    assert not second.response_headers.end_of_stream

    actions = ex.handle(reply(response_headers=ep.HeadersResponse()))
    assert [type(a) for a in actions] == [ForwardHeaders, CloseStream]
    assert ex.complete and ex.record.messages_sent == 2 and ex.record.messages_received == 2


def test_skip_both_sends_nothing() -> None:
    ex = Exchange(
        settings(
            processing_mode=mode(
                request_header_mode=ProcessingMode.SKIP, response_header_mode=ProcessingMode.SKIP
            )
        )
    )
    assert ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True)) == [
        ForwardHeaders(Direction.REQUEST, REQUEST, True, None)
    ]
    assert ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, True)) == [
        ForwardHeaders(Direction.RESPONSE, RESPONSE, True, None)
    ]
    assert not ex.stream_open


def test_skip_response_closes_after_request_headers_reply() -> None:
    ex = Exchange(settings(processing_mode=mode(response_header_mode=ProcessingMode.SKIP)))
    sent(ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), True)))
    actions = ex.handle(reply(request_headers=ep.HeadersResponse()))
    assert [type(a) for a in actions] == [ForwardHeaders, CloseStream]


def test_skip_request_headers_opens_stream_on_response_with_protocol_config() -> None:
    ex = Exchange(settings(processing_mode=mode(request_header_mode=ProcessingMode.SKIP)))
    assert isinstance(
        ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))[0], ForwardHeaders
    )
    message = sent(ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, True)))
    assert message.HasField("protocol_config")


def immediate(code: int = 403, body: bytes = b"denied", details: str = "x y") -> ProcessorReplied:
    response = ep.ImmediateResponse(
        body=body, details=details, headers=set_header("x-i", b"1").header_mutation
    )
    if code:
        response.status.code = code
    return reply(immediate_response=response)


def local(actions: list[Action]) -> RespondLocally:
    assert isinstance(actions[0], CloseStream), actions
    assert isinstance(actions[1], RespondLocally), actions
    return actions[1]


def test_immediate_response_on_request_headers() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(immediate()))
    assert out.status == 403 and out.body == b"denied" and out.details == "x_y"
    assert out.headers.regular() == [
        (b"x-i", b"1"),
        (b"content-length", b"6"),
        (b"content-type", b"text/plain"),
    ]
    assert ex.complete and ex.record.ending is Ending.IMMEDIATE_RESPONSE
    assert ex.handle(reply(request_headers=ep.HeadersResponse())) == []


def test_immediate_response_without_status_or_below_200_is_200() -> None:
    for code in (0, 100):
        ex = Exchange(settings())
        ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
        assert local(ex.handle(immediate(code))).status == 200


def test_immediate_response_empty_body_has_no_length_or_type() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(immediate(302, b"")))
    assert out.headers.get(b"content-length") is None
    assert out.headers.get(b"content-type") is None


def test_immediate_response_on_response_headers() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, False))
    assert local(ex.handle(immediate(401))).status == 401


def test_disabled_immediate_response_is_spurious() -> None:
    ex = Exchange(settings(disable_immediate_response=True))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(immediate()))
    assert out.status == 500
    assert out.details == "unhandled_immediate_response_due_to_config_disabled_it"
    assert ex.record.spurious == 1


def test_spurious_reply_fails_closed_with_status_on_error() -> None:
    ex = Exchange(settings(status_on_error=503))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(reply(response_headers=ep.HeadersResponse())))
    assert (out.status, out.details, out.body) == (503, "spurious_message", b"")


def test_empty_reply_is_unhandled() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    assert local(ex.handle(reply())).details == "unhandled_message"


def _body_reply(streamed: bool) -> ProcessorReplied:
    common = ep.CommonResponse()
    if streamed:
        common.body_mutation.streamed_response.body = b"x"
    else:
        common.body_mutation.body = b"x"
    return reply(request_body=ep.BodyResponse(response=common))


def test_body_reply_of_the_wrong_kind_has_envoys_text_while_streamed_replies_are_due() -> None:
    """Envoy's texts, as its access log has them (parity: spurious-*-body-reply-in-*)."""
    for body_mode, streamed, details in (
        (
            ProcessingMode.FULL_DUPLEX_STREAMED,
            False,
            "spurious_message:_Normal_body_mutation_response_is_received_while_body_mode__is"
            "_FULL_DUPLEX_STREAMED",
        ),
        (
            ProcessingMode.STREAMED,
            True,
            "spurious_message:_streamed_response_is_received_while_body_mode__is_not"
            "_FULL_DUPLEX_STREAMED",
        ),
    ):
        trailer_mode = ProcessingMode.SEND
        ex = Exchange(
            settings(
                processing_mode=mode(request_body_mode=body_mode, request_trailer_mode=trailer_mode)
            )
        )
        ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), False))
        ex.handle(reply(request_headers=ep.HeadersResponse()))
        ex.handle(BodyReceived(Direction.REQUEST, b"body", False))
        assert local(ex.handle(_body_reply(streamed))).details == details
        assert ex.record.fault == details


def test_body_reply_while_the_headers_reply_is_due_is_plainly_spurious() -> None:
    ex = Exchange(settings(processing_mode=mode(request_body_mode=ProcessingMode.STREAMED)))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), False))
    assert local(ex.handle(_body_reply(streamed=True))).details == "spurious_message"


def test_immediate_response_details_keep_each_whitespace_character() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(immediate(details=" a  b\tc ")))
    assert out.details == "_a__b_c_"  # as Envoy's access log writes it


def test_spurious_reply_fails_open_with_failure_mode_allow() -> None:
    ex = Exchange(settings(failure_mode_allow=True))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), True))
    actions = ex.handle(reply(response_headers=ep.HeadersResponse()))
    assert actions == [CloseStream(), ForwardHeaders(Direction.REQUEST, REQUEST, True, None)]
    assert ex.record.failed_open
    # The response will be the upstream's, and so its details: the fault is kept apart.
    assert (ex.record.details, ex.record.fault) == ("", "spurious_message")
    assert ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, True)) == [
        ForwardHeaders(Direction.RESPONSE, RESPONSE, True, None)
    ]


def test_grpc_error_fails_closed() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(ProcessorClosed(13, "boom")))
    assert (out.status, out.details) == (500, "ext_proc_error_gRPC_error_13{boom{via_upstream}}")


def test_grpc_error_fails_open_unmodified() -> None:
    ex = Exchange(settings(failure_mode_allow=True))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    assert ex.handle(ProcessorClosed(14, "down")) == [
        CloseStream(),
        ForwardHeaders(Direction.REQUEST, REQUEST, True, None),
    ]
    assert ex.record.stream_error == 14


def test_timeout_is_504_not_status_on_error() -> None:
    ex = Exchange(settings(status_on_error=503))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    out = local(ex.handle(MessageTimedOut()))
    assert (out.status, out.details) == (504, "ext_proc_error_per-message_timeout_exceeded")


def test_timeout_fails_open_with_failure_mode_allow() -> None:
    ex = Exchange(settings(failure_mode_allow=True))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, True))
    assert ex.handle(MessageTimedOut()) == [
        CloseStream(),
        ForwardHeaders(Direction.RESPONSE, RESPONSE, True, None),
    ]


def test_ok_close_releases_unmodified_and_stops_processing() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    assert ex.handle(ProcessorClosed(0)) == [
        CloseStream(),
        ForwardHeaders(Direction.REQUEST, REQUEST, True, None),
    ]
    assert ex.record.ending is Ending.PROCESSOR_CLOSED and not ex.record.failed_open
    assert ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, True)) == [
        ForwardHeaders(Direction.RESPONSE, RESPONSE, True, None)
    ]


def test_mutation_error_fails_closed_even_with_failure_mode_allow() -> None:
    ex = Exchange(settings(failure_mode_allow=True))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), True))
    out = local(
        ex.handle(
            reply(request_headers=ep.HeadersResponse(response=set_header("x-a", b"bad\r\nvalue")))
        )
    )
    assert (out.status, out.details) == (500, "header_mutation_set_contains_invalid_character")


def test_rejected_mutations_are_counted_and_request_continues() -> None:
    ex = Exchange(settings(rules=MutationRules()))
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), True))
    actions = ex.handle(
        reply(request_headers=ep.HeadersResponse(response=set_header("x-envoy-a", b"1")))
    )
    assert isinstance(actions[0], ForwardHeaders)
    assert ex.record.rejected_mutations == 1


def test_continue_and_replace_may_change_method() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST.copy(), True))
    common = set_header(":method", b"POST")
    common.status = ep.CommonResponse.CONTINUE_AND_REPLACE
    actions = ex.handle(reply(request_headers=ep.HeadersResponse(response=common)))
    assert isinstance(actions[0], ForwardHeaders)
    assert actions[0].headers.get(b":method") == b"POST"


def test_override_message_timeout_is_not_the_reply() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    response = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
    response.override_message_timeout.FromMilliseconds(500)
    assert ex.handle(ProcessorReplied(response)) == []
    assert ex.awaiting_reply


def test_late_error_after_completion_changes_nothing() -> None:
    ex = Exchange(settings())
    ex.handle(HeadersReceived(Direction.REQUEST, REQUEST, True))
    ex.handle(reply(request_headers=ep.HeadersResponse()))
    ex.handle(HeadersReceived(Direction.RESPONSE, RESPONSE, True))
    ex.handle(reply(response_headers=ep.HeadersResponse()))
    assert ex.handle(ProcessorClosed(1, "cancelled")) == []
    assert ex.handle(MessageTimedOut()) == []
