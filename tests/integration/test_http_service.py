"""Envoy's http_service transport: each event POSTed as JSON to a real HTTP processor, with
the failure rules, the counters and the connection reuse the proxy owes it."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream
from tests.support.certs import CertAuthority
from tests.support.http_processor import Answer, HttpProcessor, http_service
from tests.support.processor import immediate, matching_reply, mutate_headers
from tests.support.proxy import request, running_proxy


def tagging(message: ep.ProcessingRequest) -> Answer:
    kind = message.WhichOneof("request")
    return matching_reply(message, mutate_headers(set_headers=[(f"x-{kind}", "tagged")]))


def both_ways(uri: str, **extra: Any) -> dict[str, Any]:
    return {
        "http_service": http_service(uri, **extra),
        "processing_mode": {"response_header_mode": "SEND"},
        "message_timeout": "10s",
    }


def counters(proxy: Any) -> dict[str, float]:
    return {
        k.rsplit(".", 1)[1]: v
        for k, v in proxy.stats.snapshot().items()
        if k.startswith("http.ingress.ext_proc.") and k.count(".") == 3 and v
    }


def test_header_mutations_both_ways(upstream: EchoUpstream) -> None:
    extra = {"request_headers_to_add": [{"header": {"key": "x-token", "value": "t1"}}]}
    with (
        HttpProcessor(tagging) as proc,
        running_proxy(
            upstream.address, None, ext_proc=both_ways(proc.uri("/p?v=1"), **extra)
        ) as proxy,
    ):
        reply = request(proxy.address, "GET", "/hello")
    assert reply.status == 200
    assert reply.header("x-response_headers") == "tagged"
    assert ("x-request_headers", "tagged") in upstream.requests[0].headers
    first, second = proc.posts
    assert [first.message.WhichOneof("request"), second.message.WhichOneof("request")] == [
        "request_headers",
        "response_headers",
    ]
    # As Envoy sends them: the URI's path and host, JSON with the proto field names, one
    # x-request-id for the exchange, and the configured headers.
    assert first.path == "/p?v=1"
    assert first.headers["host"] == f"127.0.0.1:{proc.port}"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-token"] == "t1"
    assert first.headers["x-request-id"] == second.headers["x-request-id"]
    assert first.headers["x-request-id"].isdigit()
    assert "end_of_stream" in first.json["request_headers"]
    assert counters(proxy) == {"stream_msgs_sent": 2, "stream_msgs_received": 2}


def test_an_immediate_response(upstream: EchoUpstream) -> None:
    with (
        HttpProcessor(lambda m: immediate(403, b"no", details="denied")) as proc,
        running_proxy(upstream.address, None, ext_proc=both_ways(proc.uri())) as proxy,
    ):
        reply = request(proxy.address, "GET", "/hello")
    assert (reply.status, reply.body) == (403, b"no")
    assert upstream.requests == []
    assert counters(proxy)["immediate_responses_sent"] == 1


FAILURES: dict[str, Answer] = {
    "status-500": (500, b""),
    "not-json": (200, b"{x}"),
    "empty-200": (200, b""),
    "not-a-reply": (200, b'{"no_such_field": 1, "request_headers": 5}'),
}


@pytest.mark.parametrize("allow", [False, True], ids=["fail-closed", "failure-mode-allow"])
@pytest.mark.parametrize("answer", FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_post_follows_the_failure_rules(
    upstream: EchoUpstream, answer: Answer, allow: bool
) -> None:
    with HttpProcessor(lambda m: answer) as proc:
        config = {**both_ways(proc.uri()), "failure_mode_allow": allow}
        with running_proxy(upstream.address, None, ext_proc=config) as proxy:
            reply = request(proxy.address, "GET", "/hello")
    expected = {"stream_msgs_sent": 1, "http_not_ok_resp_received": 1}
    if allow:
        assert reply.status == 200 and len(upstream.requests) == 1
        # Processing ends there, as in Envoy: the response headers are not sent.
        expected["failure_mode_allowed"] = 1
    else:
        assert reply.status == 500 and upstream.requests == []
        expected["immediate_responses_sent"] = 1
    assert counters(proxy) == expected


def test_status_on_error_applies(upstream: EchoUpstream) -> None:
    with HttpProcessor(lambda m: (503, b"")) as proc:
        config = {**both_ways(proc.uri()), "status_on_error": {"code": 502}}
        with running_proxy(upstream.address, None, ext_proc=config) as proxy:
            assert request(proxy.address, "GET", "/").status == 502


def slow(release: threading.Event) -> Any:
    def handler(message: ep.ProcessingRequest) -> Answer:
        release.wait(30)
        return matching_reply(message)

    return handler


def test_the_http_timeout_is_an_http_error(upstream: EchoUpstream) -> None:
    """http_uri.timeout before the message timeout: Envoy's async client gives up with a 504
    of its own, which the filter counts as an HTTP error (500)."""
    release = threading.Event()
    with HttpProcessor(slow(release)) as proc:
        config = both_ways(proc.uri(), timeout="0.3s")
        with running_proxy(upstream.address, None, ext_proc=config) as proxy:
            reply = request(proxy.address, "GET", "/")
            release.set()
    assert reply.status == 500
    assert counters(proxy)["http_not_ok_resp_received"] == 1


def test_the_message_timeout_still_applies(upstream: EchoUpstream) -> None:
    release = threading.Event()
    with HttpProcessor(slow(release)) as proc:
        config = {**both_ways(proc.uri(), timeout="10s"), "message_timeout": "0.3s"}
        with running_proxy(upstream.address, None, ext_proc=config) as proxy:
            reply = request(proxy.address, "GET", "/")
            release.set()
    assert reply.status == 504
    assert counters(proxy)["message_timeouts"] == 1


def test_connections_are_kept_and_reused_without_a_thread_per_call(
    upstream: EchoUpstream,
) -> None:
    with (
        HttpProcessor(tagging) as proc,
        running_proxy(upstream.address, None, ext_proc=both_ways(proc.uri()), threads=1) as proxy,
    ):
        request(proxy.address, "GET", "/warm")
        threads = threading.active_count()
        for i in range(20):
            assert request(proxy.address, "GET", f"/{i}").status == 200
        assert threading.active_count() == threads
    assert len(proc.posts) == 42
    assert proc.connections == 1


def test_the_cluster_resolves_the_uri(upstream: EchoUpstream) -> None:
    """The URI names a host that does not resolve; --cluster ext_proc=HOST:PORT says where it is,
    and the Host header stays the URI's."""
    with HttpProcessor(tagging) as proc:
        uri = "http://processor.invalid/process"
        with running_proxy(
            upstream.address,
            None,
            ext_proc=both_ways(uri),
            cluster={"ext_proc": f"127.0.0.1:{proc.port}"},
        ) as proxy:
            assert request(proxy.address, "GET", "/").status == 200
    assert proc.posts[0].headers["host"] == "processor.invalid"


def test_https_with_the_processor_tls_flags(upstream: EchoUpstream, tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path / "ca")
    server = ca.issue("processor", dns=("processor.internal",), loopback=False)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server.cert, server.key)
    with HttpProcessor(tagging, tls=tls) as proc:
        uri = proc.uri(scheme="https", host="processor.internal")
        with running_proxy(
            upstream.address,
            None,
            ext_proc=both_ways(uri),
            cluster={"ext_proc": f"127.0.0.1:{proc.port}"},
            processor_ca=str(ca.cert),
        ) as proxy:
            assert request(proxy.address, "GET", "/").status == 200
        with running_proxy(
            upstream.address,
            None,
            ext_proc=both_ways(uri),
            cluster={"ext_proc": f"127.0.0.1:{proc.port}"},
        ) as untrusting:
            assert request(untrusting.address, "GET", "/").status == 500
    assert len(proc.posts) == 2
