"""Control semantics over real sockets: forward rules, attributes, dynamic metadata,
observability mode, timer overrides and per-route behaviour."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from extproc.demo.upstream import EchoUpstream
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    header_items,
    immediate,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import request, running_proxy

pytestmark = pytest.mark.integration


def test_forward_rules_filter_what_the_processor_sees(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    ext_proc = {
        "forward_rules": {
            "allowed_headers": {"patterns": [{"prefix": "x-"}, {"exact": ":path"}]},
            "disallowed_headers": {"patterns": [{"exact": "x-secret"}]},
        }
    }
    with running_proxy(upstream.address, processor.address, ext_proc=ext_proc, xff=False) as proxy:
        request(proxy.address, "GET", "/p", headers=[("x-a", "1"), ("x-secret", "s"), ("y-b", "2")])
    first = processor.wait_streams(1)[0].requests[0]
    assert [k for k, _ in header_items(first.request_headers)] == [
        ":path",
        "x-a",
        "x-forwarded-proto",
        "x-request-id",
    ]
    seen = upstream.requests[0]
    assert seen.header("x-secret") == "s" and seen.header("y-b") == "2"  # the message is intact


def test_attributes_on_the_first_message_of_each_direction(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    ext_proc = {
        "request_attributes": [
            "request.path",
            "request.url_path",
            "request.query",
            "request.method",
            "request.size",
            "source.address",
            "request.headers",
            "connection.mtls",
            "request.time",
        ],
        "response_attributes": ["response.code", "request.method"],
        "processing_mode": {"request_body_mode": "BUFFERED"},
    }
    with running_proxy(upstream.address, processor.address, ext_proc=ext_proc) as proxy:
        request(proxy.address, "POST", "/a/b?x=1", body=b"hello")
    messages = processor.wait_streams(1)[0].requests
    key = "envoy.filters.http.ext_proc"
    first = json_format.MessageToDict(messages[0].attributes[key])
    assert first["request.path"] == "/a/b?x=1"
    assert (first["request.url_path"], first["request.query"]) == ("/a/b", "x=1")
    assert (first["request.method"], first["request.size"]) == ("POST", 5)
    assert first["source.address"].startswith("127.0.0.1:")
    assert (first["request.headers"], first["connection.mtls"]) == ("CelMap value", False)
    assert first["request.time"].endswith("+00:00")
    assert key not in messages[1].attributes  # the request body: not the first message
    response = [m for m in messages if m.WhichOneof("request") == "response_headers"][0]
    assert json_format.MessageToDict(response.attributes[key]) == {
        "response.code": 200,
        "request.method": "POST",
    }


def metadata_handler(stream: ProcessorStream) -> None:
    while (message := stream.recv()) is not None:
        response = matching_reply(message)
        if message.WhichOneof("request") == "request_headers":
            response.dynamic_metadata.update(
                {"ns": {"k": "v", "n": 1, "o": {"x": [1, "a"]}}, "other": {"z": 1}}
            )
        stream.send(response)


def test_dynamic_metadata_received_forwarded_and_handed_upstream(upstream: EchoUpstream) -> None:
    file = {
        "ext_proc": {
            "metadata_options": {
                "receiving_namespaces": {"untyped": ["ns"]},
                "forwarding_namespaces": {"untyped": ["ns"]},
            }
        },
        "metadata_headers": {"ns": "x-ext-proc-dm"},
    }
    with (
        ScriptedProcessor(metadata_handler) as proc,
        running_proxy(upstream.address, proc.address, ext_proc=file) as proxy,
    ):
        request(proxy.address, "GET", "/")
    response_headers = proc.wait_streams(1)[0].requests[1]
    assert json_format.MessageToDict(response_headers.metadata_context) == {
        "filterMetadata": {"ns": {"k": "v", "n": 1.0, "o": {"x": [1.0, "a"]}}}
    }
    assert upstream.requests[0].header("x-ext-proc-dm") == '{"k":"v","n":1,"o":{"x":[1,"a"]}}'


def test_unlisted_namespaces_are_dropped(upstream: EchoUpstream) -> None:
    file = {
        "ext_proc": {"metadata_options": {"forwarding_namespaces": {"untyped": ["ns"]}}},
        "metadata_headers": {"ns": "x-ext-proc-dm"},
    }
    with (
        ScriptedProcessor(metadata_handler) as proc,
        running_proxy(upstream.address, proc.address, ext_proc=file) as proxy,
    ):
        request(proxy.address, "GET", "/")
    assert not proc.wait_streams(1)[0].requests[1].metadata_context.filter_metadata
    assert upstream.requests[0].header("x-ext-proc-dm") is None


def test_observability_mode_sends_without_waiting_and_ignores_replies(
    upstream: EchoUpstream,
) -> None:
    release = threading.Event()
    seen: list[ep.ProcessingRequest] = []

    def mute(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            seen.append(message)
            if message.WhichOneof("request") == "request_headers":
                stream.send(immediate(403, b"ignored"))
                stream.send(matching_reply(message, mutate_headers(set_headers=[("x-n", "1")])))
        release.set()

    ext_proc = {
        "observability_mode": True,
        "deferred_close_timeout": "0.2s",
        "processing_mode": {"request_body_mode": "STREAMED"},
    }
    with (
        ScriptedProcessor(mute) as proc,
        running_proxy(upstream.address, proc.address, ext_proc=ext_proc) as proxy,
    ):
        reply = request(proxy.address, "POST", "/", body=b"abc")
        assert release.wait(10)  # the stream is closed after deferred_close_timeout
    assert reply.status == 200
    assert upstream.requests[0].header("x-n") is None
    assert all(m.observability_mode and not m.HasField("protocol_config") for m in seen)
    assert [m.WhichOneof("request") for m in seen][:2] == ["request_headers", "request_body"]


def test_override_message_timeout_within_the_maximum(upstream: EchoUpstream) -> None:
    def slow(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_headers":
                extend = ep.ProcessingResponse()
                extend.override_message_timeout.FromMilliseconds(5000)
                stream.send(extend)
                threading.Event().wait(1.5)  # past message_timeout: the override must hold
            stream.send(matching_reply(message))

    for max_timeout, status in (("10s", 200), ("2s", 504)):
        ext_proc: dict[str, Any] = {"message_timeout": "1s", "max_message_timeout": max_timeout}
        with (
            EchoUpstream() as up,
            ScriptedProcessor(slow) as proc,
            running_proxy(up.address, proc.address, ext_proc=ext_proc) as proxy,
        ):
            assert request(proxy.address, "GET", "/").status == status


def test_routes_disable_and_override_by_prefix(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    file = {
        "ext_proc": {},
        "routes": [
            {"prefix": "/health", "disabled": True},
            {"prefix": "/api", "overrides": {"processing_mode": {"response_header_mode": "SKIP"}}},
        ],
    }
    with running_proxy(upstream.address, processor.address, ext_proc=file) as proxy:
        assert request(proxy.address, "GET", "/health/live").status == 200
        assert request(proxy.address, "GET", "/api/x").status == 200
        assert request(proxy.address, "GET", "/other").status == 200
    streams = processor.wait_streams(2)
    assert len(processor.streams) == 2  # /health opened none
    assert [m.WhichOneof("request") for m in streams[0].requests] == ["request_headers"]
    assert [m.WhichOneof("request") for m in streams[1].requests] == [
        "request_headers",
        "response_headers",
    ]
