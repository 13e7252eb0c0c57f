"""The SDK's hooks, context and views, and the examples, run through extproc.processor.testing."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from examples.auth import AuthProcessor
from examples.json_only import JsonOnlyProcessor
from examples.json_rewrite import JsonRewriteProcessor
from examples.redact import RedactProcessor, redact
from examples.response_headers import ResponseHeadersProcessor
from extproc.demo.processor import DemoTagger
from extproc.processor import Body, Headers, Processor, StreamContext
from extproc.processor.testing import (
    Exchange,
    body_of,
    removed_headers,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
    run,
    set_headers,
)

HEAD = {":method": "GET", ":path": "/p?q=1", ":authority": "h", ":scheme": "http"}


def test_headers_view():
    headers = Headers.of([("A", "1"), ("b", "2"), ("a", "3")])
    assert headers["a"] == "1" and headers.get("A") == "1" and headers.get("z") is None
    assert headers.get_all("a") == ["1", "3"] and "B" in headers
    assert not headers.__contains__(3)
    assert list(headers) == ["a", "b"] and len(headers) == 2
    assert headers.pairs() == [("a", "1"), ("b", "2"), ("a", "3")]


def test_context_carries_request_facts_to_the_response_phase():
    seen: list[StreamContext] = []

    class Recorder(Processor):
        def on_response_headers(self, ctx, headers):
            seen.append(ctx)

    first = request_headers({**HEAD, "x-request-id": "rid"})
    first.attributes["envoy.filters.http.ext_proc"].CopyFrom(
        struct_pb2.Struct(fields={"request.path": struct_pb2.Value(string_value="/p")})
    )
    replies = run(Recorder(), [first, response_headers({":status": "404"})])
    assert [r.WhichOneof("response") for r in replies if r] == [
        "request_headers",
        "response_headers",
    ]
    (ctx,) = seen
    assert (ctx.method, ctx.path, ctx.authority, ctx.scheme) == ("GET", "/p?q=1", "h", "http")
    assert (ctx.request_id, ctx.status) == ("rid", 404)
    assert ctx.attributes == {"envoy.filters.http.ext_proc": {"request.path": "/p"}}
    assert ctx.request_headers is not None and ctx.request_headers["x-request-id"] == "rid"


def test_every_hook_gets_its_view():
    calls: list[tuple[str, object]] = []

    class Recorder(Processor):
        def on_request_body(self, ctx, body):
            calls.append(("request_body", body))

        def on_request_trailers(self, ctx, trailers):
            calls.append(("request_trailers", trailers.pairs()))

        def on_response_body(self, ctx, body):
            calls.append(("response_body", body))

        def on_response_trailers(self, ctx, trailers):
            calls.append(("response_trailers", trailers.pairs()))

    run(
        Recorder(),
        [
            request_body(b"a", end_of_stream=False),
            request_trailers({"t": "1"}),
            response_body(b"b"),
            response_trailers({"u": "2"}),
        ],
    )
    assert calls == [
        ("request_body", Body(b"a", False)),
        ("request_trailers", [("t", "1")]),
        ("response_body", Body(b"b", True)),
        ("response_trailers", [("u", "2")]),
    ]


def test_raw_reply_passes_through_and_bad_return_is_an_error():
    raw = ep.ProcessingResponse(request_headers=ep.HeadersResponse())

    class Raw(Processor):
        def on_request_headers(self, ctx, headers):
            return raw

        def on_response_headers(self, ctx, headers):
            return "yes"

    exchange = Exchange(Raw())
    assert exchange.send(request_headers(HEAD)) is raw
    with pytest.raises(TypeError, match="not a decision"):
        exchange.send(response_headers({":status": "200"}))


def test_observability_mode_sends_no_reply():
    message = request_headers(HEAD)
    message.observability_mode = True
    exchange = Exchange(DemoTagger())
    assert exchange.send(message) is None and exchange.ctx.observability_mode


def test_auth_example():
    denied = run(AuthProcessor(), [request_headers(HEAD), response_headers({":status": "200"})])
    assert len(denied) == 1 and denied[0] is not None
    assert denied[0].immediate_response.status.code == 403
    assert denied[0].immediate_response.details == "auth_missing"
    exchange = Exchange(AuthProcessor())
    reply = exchange.send(request_headers({**HEAD, "authorization": "Bearer alice"}))
    assert set_headers(reply) == {"x-user": "alice", "x-auth": "checked", "via-processor": "auth"}
    assert removed_headers(reply) == ["authorization", "x-debug"]
    assert not exchange.finished


def test_exchange_refuses_messages_after_an_immediate_response():
    exchange = Exchange(AuthProcessor())
    exchange.send(request_headers(HEAD))
    assert exchange.finished
    with pytest.raises(RuntimeError, match="immediate"):
        exchange.send(response_headers({":status": "200"}))


def test_redact_buffered_and_streamed_pieces():
    text = b"pay 4111 1111 1111 1111 now, ref 12345"
    assert redact(text) == b"pay XXXX XXXX XXXX XXXX now, ref 12345"
    pieces = [text[:10], text[10:17], text[17:], b""]
    exchange = Exchange(RedactProcessor())
    out = [
        body_of(exchange.send(response_body(p, end_of_stream=i == len(pieces) - 1)))
        for i, p in enumerate(pieces)
    ]
    assert b"".join(o or b"" for o in out) == redact(text)
    assert out[0] == b"pay "  # the digits that may start a number wait for the next piece


def test_json_rewrite_sets_content_length():
    exchange = Exchange(JsonRewriteProcessor())
    exchange.send(request_headers({**HEAD, "content-type": "application/json"}))
    reply = exchange.send(request_body(b'{"a": 1}'))
    body = body_of(reply)
    assert body is not None and json.loads(body) == {"a": 1, "processed_by": "extproc"}
    assert set_headers(reply) == {"content-length": str(len(body))}
    plain = Exchange(JsonRewriteProcessor())
    plain.send(request_headers(HEAD))
    assert body_of(plain.send(request_body(b'{"a": 1}'))) is None


def test_response_headers_example():
    exchange = Exchange(ResponseHeadersProcessor())
    exchange.send(request_headers(HEAD))
    reply = exchange.send(response_headers({":status": "200", "server": "x"}))
    assert set_headers(reply)["x-request-path"] == "/p?q=1"
    assert removed_headers(reply) == ["server", "x-powered-by"]


@pytest.mark.parametrize(
    ("content_type", "override"), [("application/json; charset=utf-8", True), ("text/plain", False)]
)
def test_json_only_overrides_the_mode_for_json(content_type, override):
    reply = Exchange(JsonOnlyProcessor()).send(
        response_headers({":status": "200", "content-type": content_type})
    )
    assert reply is not None and reply.HasField("mode_override") is override
    if override:
        assert reply.mode_override.response_body_mode == reply.mode_override.BUFFERED


def test_demo_tagger():
    (blocked,) = run(DemoTagger(), [request_headers({**HEAD, ":path": "/blocked/x"})])
    assert blocked is not None and blocked.immediate_response.details == "demo_blocked"
    replies = run(DemoTagger(), [request_headers(HEAD), response_headers({":status": "200"})])
    assert [set_headers(r) for r in replies] == [
        {"x-extproc-demo": "request-seen"},
        {"x-extproc-demo": "response-seen"},
    ]
