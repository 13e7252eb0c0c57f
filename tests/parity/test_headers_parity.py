"""Headers-phase parity: the same scenario through real Envoy 1.40 and through extproc.

Each scenario gets, per side, a fresh EchoUpstream and a ScriptedProcessor running the same
handler; the same client request goes through Envoy and through extproc, and what the client,
the upstream and the processor saw must be equal once normalised (tests/support/parity.py says
what is dropped or masked, and why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream
from tests.support import parity
from tests.support.envoy import EnvoyProxy, require_envoy
from tests.support.processor import (
    Handler,
    ProcessorStream,
    ScriptedProcessor,
    continue_all,
    immediate,
    mutate_headers,
    mutating,
    on,
)
from tests.support.proxy import request, running_proxy

pytestmark = pytest.mark.parity

# Handlers wait this long for the next message; the proxy ends every stream well before.
RECV_TIMEOUT_S = 30.0
STREAMS_DONE_S = 30.0
# Envoy's default message_timeout is 200 ms, short enough for a loaded machine to miss with a
# Python processor. Scenarios that do not test the timeout give both proxies this instead; it
# changes nothing else about them.
GENEROUS: dict[str, Any] = {"message_timeout": "20s"}
DEFAULT_TIMEOUT: dict[str, Any] = {"message_timeout": "0.2s"}


# Handlers ----------------------------------------------------------------------------------


def abort_internal(stream: ProcessorStream) -> None:
    if stream.recv(RECV_TIMEOUT_S) is not None:
        stream.abort(grpc.StatusCode.INTERNAL, "scripted failure")


def close_ok(stream: ProcessorStream) -> None:
    """End the stream with OK without answering the first message."""
    stream.recv(RECV_TIMEOUT_S)


def never_answer(stream: ProcessorStream) -> None:
    """Take every message, answer none, and return once the proxy ends the stream."""
    while stream.recv(RECV_TIMEOUT_S) is not None:
        pass


def value_only_set() -> ep.CommonResponse:
    """Sets x-value-only with the string `value` filled and `raw_value` left empty."""
    option = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="x-value-only", value="from-value")
    )
    return ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=[option]))


def immediate_without_status() -> ep.ProcessingResponse:
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(body=b"no status given"))


def replacing(set_headers: list[tuple[str, str]]) -> Handler:
    """CONTINUE_AND_REPLACE on the request headers with ``set_headers`` (which may change
    :method)."""
    common = mutate_headers(set_headers=set_headers)
    common.status = ep.CommonResponse.CONTINUE_AND_REPLACE
    return on(
        "request_headers",
        lambda _: ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common)),
    )


def setting(phase: str, *pairs: tuple[str, str]) -> Handler:
    return mutating(phase, mutate_headers(set_headers=list(pairs)))


# Scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    id: str
    handler: Handler = continue_all
    ext_proc: dict[str, Any] = field(default_factory=lambda: dict(GENEROUS))
    method: str = "GET"
    target: str = "/"
    headers: tuple[tuple[str, str], ...] = (("x-custom", "a"), ("x-custom", "b"))
    body: bytes | None = None
    # The processor address refuses connections instead of reaching the ScriptedProcessor.
    unreachable: bool = False
    # Process streams to wait for before reading what the processor saw (more are reported).
    streams: int = 1


def _ext(**fields: Any) -> dict[str, Any]:
    return {**GENEROUS, **fields}


SCENARIOS = [
    Scenario(
        "get-repeated-headers",
        headers=(("x-custom", "a"), ("x-other", "1"), ("x-custom", "b"), ("accept", "*/*")),
    ),
    Scenario("post-content-length", method="POST", body=b"hello, upstream"),
    Scenario(
        "set-append-remove",
        handler=mutating(
            "request_headers",
            mutate_headers(
                set_headers=[("x-set", "one")],
                append_headers=[("x-custom", "c"), ("x-appended", "new")],
                remove=["x-remove-me"],
            ),
        ),
        headers=(("x-custom", "a"), ("x-remove-me", "gone"), ("x-keep", "k")),
    ),
    Scenario(
        "set-path",
        handler=mutating("request_headers", mutate_headers(set_headers=[(":path", "/new?x=1")])),
        target="/old",
    ),
    Scenario(
        "set-response-status",
        handler=mutating("response_headers", mutate_headers(set_headers=[(":status", "201")])),
    ),
    Scenario(
        "rejected-by-default-rules",
        handler=mutating(
            "request_headers",
            mutate_headers(
                set_headers=[
                    ("x-envoy-foo", "bar"),
                    ("host", "elsewhere.example"),
                    (":method", "PUT"),
                    ("x-allowed", "yes"),
                ],
                remove=[":path"],
            ),
        ),
    ),
    Scenario("value-without-raw-value", handler=mutating("request_headers", value_only_set())),
    Scenario(
        "crlf-value-500",
        handler=mutating("request_headers", mutate_headers(set_headers=[("x-bad", "a\r\nb")])),
    ),
    Scenario(
        "immediate-on-request",
        handler=on(
            "request_headers",
            lambda _: immediate(
                403, b"denied", headers=[("x-denied-by", "test")], details="blocked by test"
            ),
        ),
    ),
    Scenario(
        "immediate-on-response",
        handler=on(
            "response_headers",
            lambda _: immediate(418, b"teapot", headers=[("x-late", "yes")], details="late"),
        ),
    ),
    Scenario(
        "immediate-without-status",
        handler=on("request_headers", lambda _: immediate_without_status()),
    ),
    Scenario(
        "request-header-mode-skip",
        ext_proc=_ext(processing_mode={"request_header_mode": "SKIP"}),
    ),
    Scenario(
        "response-header-mode-skip",
        ext_proc=_ext(processing_mode={"response_header_mode": "SKIP"}),
    ),
    # Nothing at all goes to the processor: extproc runs no exchange (PassThrough).
    Scenario(
        "both-header-modes-skip",
        ext_proc=_ext(
            processing_mode={"request_header_mode": "SKIP", "response_header_mode": "SKIP"}
        ),
        streams=0,
    ),
    Scenario(
        "both-header-modes-skip-post",
        ext_proc=_ext(
            processing_mode={"request_header_mode": "SKIP", "response_header_mode": "SKIP"}
        ),
        method="POST",
        body=b"hello, upstream",
        streams=0,
    ),
    Scenario("abort-internal", handler=abort_internal),
    Scenario(
        "abort-internal-failure-mode-allow",
        handler=abort_internal,
        ext_proc=_ext(failure_mode_allow=True),
    ),
    Scenario("processor-unreachable", unreachable=True, streams=0),
    Scenario(
        "processor-unreachable-failure-mode-allow",
        unreachable=True,
        streams=0,
        ext_proc=_ext(failure_mode_allow=True),
    ),
    # Envoy's default 200 ms message_timeout is what is tested here. It is spelled out because
    # running_proxy raises an unset timeout to 10 s for extproc.
    Scenario("message-timeout", handler=never_answer, ext_proc=dict(DEFAULT_TIMEOUT)),
    Scenario(
        "message-timeout-failure-mode-allow",
        handler=never_answer,
        ext_proc={**DEFAULT_TIMEOUT, "failure_mode_allow": True},
    ),
    Scenario(
        "spurious-reply",
        handler=on(
            "request_headers",
            lambda _: ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
        ),
    ),
    Scenario("processor-closes-ok", handler=close_ok),
    Scenario(
        "status-on-error-503",
        handler=abort_internal,
        ext_proc=_ext(status_on_error={"code": 503}),
    ),
    # Hostile processor output (docs/guarantees.md, Processor output).
    Scenario(
        "hop-by-hop-set-on-request-forwarded",
        handler=setting(
            "request_headers",
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
            ("te", "chunked"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
        ),
    ),
    Scenario(
        "value-whitespace-trimmed-request",
        handler=setting("request_headers", ("x-a", " lead"), ("x-b", "trail\t")),
    ),
    Scenario(
        "value-whitespace-trimmed-response",
        handler=setting("response_headers", ("x-a", " lead"), ("x-b", "trail ")),
    ),
    Scenario("control-character-value-500", handler=setting("request_headers", ("x-c", "a\x01"))),
    Scenario("nul-value-500", handler=setting("response_headers", ("x-c", "a\x00b"))),
    Scenario("method-with-space-503", handler=replacing([(":method", "G T")])),
    Scenario("method-empty-503", handler=replacing([(":method", "")])),
    Scenario("path-with-space-503", handler=setting("request_headers", (":path", "/a b"))),
    Scenario("path-empty-503", handler=setting("request_headers", (":path", ""))),
    Scenario(
        "over-100-set-operations-500",
        handler=setting("request_headers", *[(f"x-n{i}", "v") for i in range(101)]),
    ),
    Scenario(
        "result-over-100-headers-500",
        handler=setting("request_headers", *[(f"x-n{i}", "v") for i in range(99)]),
    ),
    Scenario(
        "result-over-60-kib-500",
        handler=setting("request_headers", ("x-big", "v" * 61 * 1024)),
    ),
    Scenario(
        "remove-host-and-framing-refused",
        handler=mutating(
            "request_headers", mutate_headers(remove=["host", ":authority", "transfer-encoding"])
        ),
        method="POST",
        body=b"kept",
    ),
    Scenario(
        "immediate-with-framing-headers",
        handler=on(
            "request_headers",
            lambda _: immediate(
                200,
                b"body",
                headers=[
                    ("content-length", "1"),
                    ("transfer-encoding", "chunked"),
                    ("connection", "keep-alive"),
                ],
            ),
        ),
    ),
    Scenario(
        "immediate-204-drops-body", handler=on("request_headers", lambda _: immediate(204, b"x"))
    ),
    Scenario("immediate-101-is-200", handler=on("request_headers", lambda _: immediate(101, b"x"))),
    Scenario(
        "immediate-invalid-header-skipped",
        handler=on("request_headers", lambda _: immediate(403, b"no", headers=[("x-a", "a\r\nb")])),
    ),
]


# Running one side --------------------------------------------------------------------------

ProxyFactory = Callable[
    [Scenario, tuple[str, int], tuple[str, int], Path],
    contextlib.AbstractContextManager[tuple[str, int]],
]


@contextlib.contextmanager
def through_envoy(
    scenario: Scenario, upstream: tuple[str, int], processor: tuple[str, int], workdir: Path
) -> Iterator[tuple[str, int]]:
    with EnvoyProxy(
        upstream=upstream,
        processor=processor,
        ext_proc=scenario.ext_proc,
        workdir=workdir / "envoy",
    ) as envoy:
        yield envoy.address


@contextlib.contextmanager
def through_extproc(
    scenario: Scenario, upstream: tuple[str, int], processor: tuple[str, int], workdir: Path
) -> Iterator[tuple[str, int]]:
    # xff=False matches Envoy's default of not appending X-Forwarded-For.
    target = f"{processor[0]}:{processor[1]}"
    with running_proxy(upstream, target, ext_proc=scenario.ext_proc, xff=False) as server:
        yield server.address


@contextlib.contextmanager
def processor_address(
    scenario: Scenario, processor: ScriptedProcessor
) -> Iterator[tuple[str, int]]:
    if scenario.unreachable:
        with parity.refused_port() as address:
            yield address
    else:
        yield ("127.0.0.1", processor.port)


def observe(scenario: Scenario, proxy: ProxyFactory, workdir: Path) -> dict[str, Any]:
    """Run the scenario through one proxy; what the client, upstream and processor saw."""
    with (
        EchoUpstream() as upstream,
        ScriptedProcessor(scenario.handler) as processor,
        processor_address(scenario, processor) as processor_at,
    ):
        with proxy(scenario, upstream.address, processor_at, workdir) as address:
            reply = request(
                address,
                scenario.method,
                scenario.target,
                headers=list(scenario.headers),
                body=scenario.body,
            )
        # The proxy is stopped, so every stream it opened has ended on its side; waiting for
        # the expected count covers a stream the gRPC server has not handed to us yet.
        opened = max(scenario.streams, len(processor.streams))
        streams = processor.wait_streams(opened, STREAMS_DONE_S)
        assert processor.errors == []
        received = list(upstream.requests)
    for r in received:
        assert parity.has_request_id(r.headers), f"no x-request-id upstream: {r.headers}"
    echo = parity.echo_length(received[0]) if len(received) == 1 else None
    return {
        "client": parity.client_view(reply),
        "upstream": parity.upstream_view(received),
        "processor": parity.processor_view(streams, echo),
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_headers_parity(scenario: Scenario, tmp_path: Path) -> None:
    require_envoy()
    envoy = observe(scenario, through_envoy, tmp_path)
    extproc = observe(scenario, through_extproc, tmp_path)
    assert envoy == extproc, parity.readable_diff(envoy, extproc, ("envoy", "extproc"))
