"""Request and response bodies and trailers through every body mode, over real sockets."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream, pattern
from tests.support.bodies import body_reply, duplex, transform
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    immediate,
    immediate_on,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import Client, raw_exchange, request, running_proxy

pytestmark = pytest.mark.integration

UPPER = transform(bytes.upper)
MODES = ["buffered", "streamed", "buffered_partial"]


def kinds(proc: ScriptedProcessor, n: int = 1) -> list[str]:
    return [m.WhichOneof("request") for m in proc.wait_streams(n)[-1].requests]


def bodies(proc: ScriptedProcessor, kind: str) -> list[tuple[bytes, bool]]:
    return [
        (getattr(m, kind).body, getattr(m, kind).end_of_stream)
        for m in proc.wait_streams(1)[0].requests
        if m.WhichOneof("request") == kind
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("body", "trailers"),
    [
        (b"hello world", None),
        ([b"hello ", b"world"], None),
        ([b"hello ", b"world"], [("x-t", "1")]),
    ],
    ids=["length", "chunked", "chunked-trailers"],
)
def test_request_body_transformed(
    upstream: EchoUpstream, mode: str, body: Any, trailers: Any
) -> None:
    with (
        ScriptedProcessor(UPPER) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode=mode) as proxy,
    ):
        reply = request(proxy.address, "POST", "/", body=body, trailers=trailers)
    assert reply.status == 200
    seen = upstream.requests[0]
    assert seen.body == b"HELLO WORLD"
    assert seen.trailers == (trailers or [])
    sent = bodies(proc, "request_body")
    assert b"".join(b for b, _ in sent) == b"hello world"
    assert sent[-1][1] is (trailers is None)  # end_of_stream only when no trailers follow
    if mode == "buffered" and not isinstance(body, list):
        assert seen.header("content-length") == "11"  # BUFFERED keeps the length
    else:
        assert seen.header("transfer-encoding") == "chunked"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_response_body_transformed(upstream: EchoUpstream, mode: str, chunked: bool) -> None:
    target = f"/?size=5000&writes=4{'&chunked=1' if chunked else ''}"
    with (
        ScriptedProcessor(UPPER) as proc,
        running_proxy(upstream.address, proc.address, response_body_mode=mode) as proxy,
    ):
        reply = request(proxy.address, "GET", target)
    assert reply.status == 200
    assert reply.body == pattern(5000).upper()
    assert reply.trailers == ([("x-echo-trailer", "done")] if chunked else [])
    sent = bodies(proc, "response_body")
    assert b"".join(b for b, _ in sent) == pattern(5000)


def test_none_mode_with_trailers_sent_and_mutated(upstream: EchoUpstream) -> None:
    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request").endswith("_trailers"):
                response = matching_reply(message)
                kind = message.WhichOneof("request")
                getattr(response, kind).header_mutation.CopyFrom(
                    mutate_headers(set_headers=[("x-added", "yes")]).header_mutation
                )
                stream.send(response)
            else:
                stream.send(matching_reply(message))

    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(
            upstream.address,
            proc.address,
            request_trailer_mode="send",
            response_trailer_mode="send",
        ) as proxy,
    ):
        reply = request(proxy.address, "POST", "/?chunked=1", body=[b"ab"], trailers=[("x-t", "1")])
    assert upstream.requests[0].trailers == [("x-t", "1"), ("x-added", "yes")]
    assert reply.trailers == [("x-echo-trailer", "done"), ("x-added", "yes")]
    assert kinds(proc) == [
        "request_headers",
        "request_trailers",
        "response_headers",
        "response_trailers",
    ]


def test_trailer_mode_send_without_trailers_sends_none(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with running_proxy(
        upstream.address,
        processor.address,
        request_trailer_mode="send",
        response_trailer_mode="send",
    ) as proxy:
        assert request(proxy.address, "POST", "/", body=b"abc").status == 200
    assert kinds(processor) == ["request_headers", "response_headers"]


@pytest.mark.parametrize("trailers", [None, [("x-t", "1")]], ids=["no-trailers", "trailers"])
def test_full_duplex_streamed_both_ways(upstream: EchoUpstream, trailers: Any) -> None:
    ext_proc = {
        "processing_mode": {
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SEND",
        }
    }
    with (
        ScriptedProcessor(duplex(lambda b: b[::-1])) as proc,
        running_proxy(upstream.address, proc.address, ext_proc=ext_proc) as proxy,
    ):
        reply = request(
            proxy.address, "POST", "/?size=300&chunked=1", body=[b"abc", b"def"], trailers=trailers
        )
    assert upstream.requests[0].body == b"fedcba"
    assert upstream.requests[0].trailers == (trailers or [])
    assert reply.body == pattern(300)[::-1]
    assert reply.trailers == [("x-echo-trailer", "done")]


def test_buffered_request_over_the_limit_is_413(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with running_proxy(
        upstream.address, processor.address, request_body_mode="buffered", buffer_limit_bytes=1000
    ) as proxy:
        reply = request(proxy.address, "POST", "/", body=[b"x" * 600, b"y" * 600])
    assert (reply.status, reply.body) == (413, b"Payload Too Large")
    assert upstream.requests == []


def test_buffered_response_over_the_limit_is_500(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with (
        running_proxy(
            upstream.address,
            processor.address,
            response_body_mode="buffered",
            buffer_limit_bytes=1000,
        ) as proxy,
        Client(proxy.address) as client,
    ):
        reply = client.request("GET", "/?size=5000&writes=5")
        assert client.request("GET", "/?size=10").status == 200
    assert reply.status == 500


def length_fixing(stream: ProcessorStream) -> None:
    while (message := stream.recv()) is not None:
        if message.WhichOneof("request") == "request_body":
            response = body_reply(message, b"new body!")
            response.request_body.response.header_mutation.CopyFrom(
                mutate_headers(
                    set_headers=[("content-length", "9"), ("x-in-body", "1")]
                ).header_mutation
            )
            stream.send(response)
        else:
            stream.send(matching_reply(message))


def test_buffered_body_reply_sets_length_and_headers(upstream: EchoUpstream) -> None:
    with (
        ScriptedProcessor(length_fixing) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="buffered") as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"old").status == 200
    seen = upstream.requests[0]
    assert (seen.body, seen.header("content-length"), seen.header("x-in-body")) == (
        b"new body!",
        "9",
        "1",
    )


def test_buffered_body_replaced_with_a_stale_length_is_500(upstream: EchoUpstream) -> None:
    with (
        ScriptedProcessor(transform(lambda b: b + b"!")) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="buffered") as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"old").status == 500
    assert upstream.requests == []


def test_buffered_with_headers_skipped_forwards_the_head_without_length(
    upstream: EchoUpstream,
) -> None:
    with (
        ScriptedProcessor(transform(lambda b: b + b"!")) as proc,
        running_proxy(
            upstream.address,
            proc.address,
            request_body_mode="buffered",
            request_header_mode="skip",
        ) as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"old").status == 200
    seen = upstream.requests[0]
    assert (seen.body, seen.header("transfer-encoding")) == (b"old!", "chunked")
    assert kinds(proc)[:1] == ["request_body"]


def test_buffered_partial_over_the_limit_processes_only_the_first_part(
    upstream: EchoUpstream,
) -> None:
    with (
        ScriptedProcessor(UPPER) as proc,
        running_proxy(
            upstream.address,
            proc.address,
            request_body_mode="buffered_partial",
            buffer_limit_bytes=1000,
        ) as proxy,
        Client(proxy.address) as client,
    ):
        # More than one socket read can hold, so the limit is crossed before the end.
        body = pattern(300_000)
        client.request("POST", "/", body=[body[:150_000], body[150_000:]])
    sent = bodies(proc, "request_body")
    assert len(sent) == 1 and sent[0][1] is False
    first = sent[0][0]
    assert 1000 < len(first) < len(body) and body.startswith(first)
    assert upstream.requests[0].body == first.upper() + body[len(first) :]


def test_streamed_chunk_cleared(upstream: EchoUpstream) -> None:
    def clear(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_body":
                stream.send(
                    matching_reply(
                        message, ep.CommonResponse(body_mutation=ep.BodyMutation(clear_body=True))
                    )
                )
            else:
                stream.send(matching_reply(message))

    with (
        ScriptedProcessor(clear) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="streamed") as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"secret").status == 200
    assert upstream.requests[0].body == b""


def test_streamed_replies_may_lag_behind_chunks(upstream: EchoUpstream) -> None:
    """Envoy pipelines STREAMED chunks: a processor may read ahead before answering."""
    chunks = [b"one ", b"two ", b"three"]

    def read_ahead(stream: ProcessorStream) -> None:
        pending: list[ep.ProcessingRequest] = []
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") != "request_body":
                stream.send(matching_reply(message))
                continue
            pending.append(message)
            if message.request_body.end_of_stream:
                for held in pending:
                    stream.send(body_reply(held, held.request_body.body.upper()))

    with (
        ScriptedProcessor(read_ahead) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="streamed") as proxy,
        Client(proxy.address) as client,
    ):
        assert client.request("POST", "/", body=chunks).status == 200
    assert upstream.requests[0].body == b"ONE TWO THREE"


@pytest.mark.parametrize("has_body", [False, True], ids=["get", "post"])
def test_continue_and_replace_supplies_the_body(upstream: EchoUpstream, has_body: bool) -> None:
    def replace(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_headers":
                common = ep.CommonResponse(
                    status=ep.CommonResponse.CONTINUE_AND_REPLACE,
                    body_mutation=ep.BodyMutation(body=b"replaced"),
                )
                stream.send(matching_reply(message, common))
            else:
                stream.send(matching_reply(message))

    with (
        ScriptedProcessor(replace) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="buffered") as proxy,
        Client(proxy.address) as client,
    ):
        body = [b"original ", b"body"] if has_body else None
        assert client.request("POST" if has_body else "GET", "/", body=body).status == 200
        assert client.request("GET", "/next").status == 200  # the original body was drained
    assert upstream.requests[0].body == b"replaced"
    assert kinds(proc, 2)[:1] == ["request_headers"]
    assert "request_body" not in kinds(proc, 1)


def test_immediate_response_on_the_request_body(upstream: EchoUpstream) -> None:
    with (
        ScriptedProcessor(immediate_on("request_body", immediate(403, b"no"))) as proc,
        running_proxy(upstream.address, proc.address, request_body_mode="buffered") as proxy,
    ):
        reply = request(proxy.address, "POST", "/", body=b"bad words")
    assert (reply.status, reply.body) == (403, b"no")
    assert upstream.requests == []


def test_immediate_response_on_the_buffered_response_body(upstream: EchoUpstream) -> None:
    with (
        ScriptedProcessor(immediate_on("response_body", immediate(502, b"hidden"))) as p,
        running_proxy(upstream.address, p.address, response_body_mode="buffered") as proxy,
    ):
        reply = request(proxy.address, "GET", "/?size=100")
    assert (reply.status, reply.body) == (502, b"hidden")


def test_immediate_response_after_the_response_started_resets_the_connection(
    upstream: EchoUpstream,
) -> None:
    # A body over the buffer limit: a whole one that came with the head would be sent as one
    # message with the head still held (as Envoy does), and the reply would replace it.
    handler = immediate_on("response_body", immediate(502, b"too late"))
    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(
            upstream.address,
            proc.address,
            response_body_mode="streamed",
            buffer_limit_bytes=1024,
        ) as proxy,
    ):
        data = raw_exchange(proxy.address, b"GET /?size=100000 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n")  # the chunked body never ends: the client can tell


def test_mode_override_asks_for_the_response_body(upstream: EchoUpstream) -> None:
    def override(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            response = matching_reply(message)
            if message.WhichOneof("request") == "request_headers":
                response.mode_override.response_body_mode = response.mode_override.BUFFERED
            elif message.WhichOneof("request") == "response_body":
                response = body_reply(message, b"rewritten")
            stream.send(response)

    for allowed, expected in ((None, b"rewritten"), ([{"response_body_mode": "STREAMED"}], None)):
        ext_proc: dict[str, Any] = {"allow_mode_override": True}
        if allowed:
            ext_proc["allowed_override_modes"] = allowed
        with (
            EchoUpstream() as up,
            ScriptedProcessor(override) as proc,
            running_proxy(up.address, proc.address, ext_proc=ext_proc) as proxy,
        ):
            reply = request(proxy.address, "GET", "/?size=20&chunked=1")
        assert reply.body == (expected or pattern(20))


def test_send_body_without_waiting_for_header_response(upstream: EchoUpstream) -> None:
    seen_before_reply: list[str] = []

    def late_headers(stream: ProcessorStream) -> None:
        first = stream.recv()
        assert first is not None
        second = stream.recv()
        assert second is not None
        seen_before_reply.append(second.WhichOneof("request"))
        stream.send(matching_reply(first))
        stream.send(matching_reply(second))
        while (message := stream.recv()) is not None:
            stream.send(matching_reply(message))

    ext_proc = {
        "send_body_without_waiting_for_header_response": True,
        "processing_mode": {"request_body_mode": "STREAMED"},
    }
    with (
        ScriptedProcessor(late_headers) as proc,
        running_proxy(upstream.address, proc.address, ext_proc=ext_proc) as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"early").status == 200
    assert seen_before_reply == ["request_body"]
    assert upstream.requests[0].body == b"early"


@pytest.mark.parametrize("mode", MODES)
def test_empty_bodies(upstream: EchoUpstream, processor: ScriptedProcessor, mode: str) -> None:
    with (
        running_proxy(upstream.address, processor.address, request_body_mode=mode) as proxy,
        Client(proxy.address) as client,
    ):
        assert client.request("POST", "/", body=b"").status == 200
        assert client.request("POST", "/", body=[]).status == 200
    first, second = processor.wait_streams(2)
    assert [m.WhichOneof("request") for m in first.requests] == [
        "request_headers",
        "response_headers",
    ]
    chunked = [m for m in second.requests if m.WhichOneof("request") == "request_body"]
    assert [(m.request_body.body, m.request_body.end_of_stream) for m in chunked] == [(b"", True)]


def test_body_message_timeout_is_504(upstream: EchoUpstream) -> None:
    release = threading.Event()

    def stall_on_body(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_body":
                release.wait(30)
                return
            stream.send(matching_reply(message))

    with (
        ScriptedProcessor(stall_on_body) as proc,
        running_proxy(
            upstream.address, proc.address, request_body_mode="buffered", message_timeout="300ms"
        ) as proxy,
    ):
        try:
            reply = request(proxy.address, "POST", "/", body=b"abc")
        finally:
            release.set()
    assert reply.status == 504
    assert upstream.requests == []


def test_fail_open_releases_held_body_unmodified(upstream: EchoUpstream) -> None:
    def die_on_body(stream: ProcessorStream) -> None:
        import grpc

        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_body":
                stream.abort(grpc.StatusCode.UNAVAILABLE, "gone")
                return
            stream.send(matching_reply(message))

    with (
        ScriptedProcessor(die_on_body) as proc,
        running_proxy(
            upstream.address, proc.address, request_body_mode="buffered", failure_mode_allow=True
        ) as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"keep me").status == 200
    assert upstream.requests[0].body == b"keep me"
    assert upstream.requests[0].header("content-length") == "7"
