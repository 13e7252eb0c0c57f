"""Processor output that contradicts HTTP/1.1 framing never reaches the wire inconsistent.

Each test reads the raw bytes on the wire with h11 (a strict parser): the upstream's capture
and the client's bytes must each be exactly one message whose framing matches its body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import h11
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import Client, raw_exchange, request, running_proxy, status_of
from tests.support.rawpeer import (
    CapturingUpstream,
    FaultyUpstream,
    answer_then_serve,
    assert_one_message,
)

pytestmark = pytest.mark.integration

WAIT_S = 30.0


def modes(request_body: str = "NONE", response_body: str = "NONE", **more: Any) -> dict[str, Any]:
    return {
        "processing_mode": {"request_body_mode": request_body, "response_body_mode": response_body},
        **more,
    }


def replying(replies: dict[str, Any]) -> Any:
    """A handler answering each message kind with ``replies[kind](message)`` (CONTINUE when
    absent)."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv(WAIT_S)) is not None:
            reply = replies.get(message.WhichOneof("request"))
            stream.send(reply(message) if reply else matching_reply(message))

    return handler


def replace_and_continue(body: bytes, *headers: tuple[str, str]) -> ep.CommonResponse:
    common = mutate_headers(set_headers=list(headers))
    common.status = ep.CommonResponse.CONTINUE_AND_REPLACE
    common.body_mutation.body = body
    return common


@pytest.fixture
def capturing() -> Iterator[CapturingUpstream]:
    with CapturingUpstream() as upstream:
        yield upstream


def upstream_request(upstream: CapturingUpstream) -> tuple[h11.Request, bytes]:
    """The one request the upstream got, checked to be exactly one complete message."""
    (capture,) = upstream.collect(WAIT_S)
    assert_one_message(h11.Connection(h11.SERVER), capture, h11.Request)
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(capture)
    head = parser.next_event()
    assert isinstance(head, h11.Request)
    body = b""
    while isinstance(event := parser.next_event(), h11.Data):
        body += event.data
    return head, body


def test_streamed_body_grows_with_a_stale_content_length(capturing: CapturingUpstream) -> None:
    """Each piece replaced by one ten times larger, past the 1 KiB buffer limit, while the
    processor also sets content-length: 3: the upstream gets every byte, chunked."""
    handler = replying(
        {
            "request_headers": lambda m: matching_reply(
                m, mutate_headers(set_headers=[("content-length", "3")])
            ),
            "request_body": lambda m: matching_reply(
                m, ep.CommonResponse(body_mutation=ep.BodyMutation(body=m.request_body.body * 10))
            ),
        }
    )
    body = bytes(range(256)) * 20
    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(
            capturing.address,
            proc.address,
            ext_proc=modes(request_body="STREAMED"),
            buffer_limit_bytes=1024,
        ) as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=body).status == 200
    head, received = upstream_request(capturing)
    names = [n for n, _ in head.headers]
    assert b"content-length" not in names and (b"transfer-encoding", b"chunked") in head.headers
    assert len(received) == 10 * len(body)


def test_buffered_body_replaced_with_a_matching_length_past_the_limit(
    capturing: CapturingUpstream,
) -> None:
    """A replacement larger than the buffer limit, with its content-length set: sent whole."""
    new = b"x" * 5000
    handler = replying(
        {
            "request_body": lambda m: matching_reply(
                m,
                ep.CommonResponse(
                    header_mutation=mutate_headers(
                        set_headers=[("content-length", str(len(new)))]
                    ).header_mutation,
                    body_mutation=ep.BodyMutation(body=new),
                ),
            )
        }
    )
    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(
            capturing.address,
            proc.address,
            ext_proc=modes(request_body="BUFFERED"),
            buffer_limit_bytes=1024,
        ) as proxy,
    ):
        assert request(proxy.address, "POST", "/", body=b"small").status == 200
    head, received = upstream_request(capturing)
    assert (b"content-length", b"5000") in head.headers and received == new


@pytest.mark.parametrize("set_length", [None, "2", "999"], ids=["no-length", "short", "long"])
def test_continue_and_replace_on_a_bodiless_request(
    capturing: CapturingUpstream, set_length: str | None
) -> None:
    """A body given to a GET, with no, a short or a long content-length from the processor:
    the upstream gets the body with framing of its own."""
    headers = [("content-length", set_length)] if set_length else []
    handler = replying(
        {"request_headers": lambda m: matching_reply(m, replace_and_continue(b"new", *headers))}
    )
    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(capturing.address, proc.address) as proxy,
    ):
        assert request(proxy.address, "GET", "/").status == 200
    _, received = upstream_request(capturing)
    assert received == b"new"


def keep_alive_exchange(address: tuple[str, int], method: str) -> list[Any]:
    """``method`` then a GET on one connection: the first reply must leave the connection in
    step, so the second one parses."""
    with Client(address, timeout=WAIT_S) as client:
        first = client.request(method, "/first")
        second = client.request("GET", "/second")
    return [first, second]


@pytest.mark.parametrize(
    ("method", "upstream_status"),
    [("HEAD", 200), ("GET", 204), ("GET", 304)],
    ids=["head", "204", "304"],
)
def test_body_set_on_a_response_that_cannot_have_one(method: str, upstream_status: int) -> None:
    """CONTINUE_AND_REPLACE with a body and content-length: 9 on the response headers of a
    HEAD, 204 or 304: nothing of the body goes out, and the next response on the connection
    is read correctly."""
    status_line = f"HTTP/1.1 {upstream_status} X\r\n".encode()
    answer = status_line + b"content-length: 0\r\n\r\n" if upstream_status != 304 else status_line
    if upstream_status == 304:
        answer += b"\r\n"
    handler = replying(
        {
            "response_headers": lambda m: matching_reply(
                m, replace_and_continue(b"forbidden", ("content-length", "9"))
            )
        }
    )
    with (
        FaultyUpstream(answer_then_serve(answer)) as upstream,
        ScriptedProcessor(handler) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        first, second = keep_alive_exchange(proxy.address, method)
    assert (first.status, first.body) == (upstream_status, b"")
    assert second.status == 200


def test_buffered_response_replaced_on_head_request(upstream: EchoUpstream) -> None:
    """A HEAD request's response has no body phase to replace; a local body on it is dropped
    (the immediate response to a HEAD gets the head only), and keep-alive holds."""
    handler = replying(
        {
            "response_headers": lambda m: ep.ProcessingResponse(
                immediate_response=ep.ImmediateResponse(body=b"local body")
            )
        }
    )
    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(upstream.address, proc.address, ext_proc=modes("NONE", "BUFFERED")) as proxy,
    ):
        first, second = keep_alive_exchange(proxy.address, "HEAD")
    assert (first.status, first.body, first.header("content-length")) == (200, b"", "10")
    assert second.status == 200


def test_processor_added_upgrade_never_opens_a_tunnel(processor: ScriptedProcessor) -> None:
    """Upgrade and Connection set by a processor are forwarded, as Envoy forwards them; an
    upstream that then switches protocols gets its connection dropped and the client 503:
    nothing it sends after the 101 reaches the client."""
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"
    )
    handler = replying(
        {
            "request_headers": lambda m: matching_reply(
                m, mutate_headers(set_headers=[("connection", "upgrade"), ("upgrade", "h2c")])
            )
        }
    )
    with (
        FaultyUpstream(answer_then_serve(switch)) as upstream,
        ScriptedProcessor(handler) as proc,
        running_proxy(upstream.address, proc.address) as proxy,
    ):
        data = raw_exchange(
            proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        )
        assert request(proxy.address, "GET", "/next").body == b"good"
    assert status_of(data) == 503
    assert b"smuggled" not in data


def test_split_attempt_in_a_value_is_refused_before_the_wire(capturing: CapturingUpstream) -> None:
    """A value carrying CRLF and a whole second request: 500, and the upstream sees nothing."""
    smuggle = b"x\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: evil\r\n\r\n"
    handler = replying(
        {
            "request_headers": lambda m: matching_reply(
                m, mutate_headers(set_headers=[("x-a", smuggle)])
            )
        }
    )
    with (
        ScriptedProcessor(handler) as proc,
        running_proxy(capturing.address, proc.address) as proxy,
    ):
        assert request(proxy.address, "GET", "/").status == 500
        assert proxy.wait_idle(WAIT_S)
        rejected = proxy.stats.snapshot()["http.ingress.ext_proc.rejected_header_mutations"]
    assert capturing.collect(WAIT_S) == [] and rejected == 1
