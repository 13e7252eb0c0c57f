"""Processor faults in the log: one line per fault, with the request id, at warning level or
above, so that an operator who runs with ``--log-level warning`` sees them (Envoy's ext_proc
logs the same faults at those levels; tests/parity/test_control_parity.py compares which)."""

from __future__ import annotations

import json
import signal
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream
from tests.support import parity
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    header_value,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import request
from tests.support.proxyproc import ProxyProcess, listening_socket, proxy_args
from tests.support.wsgi_relay import relaying_middleware

pytestmark = pytest.mark.integration

RECV_TIMEOUT_S = 30.0


def faulty(stream: ProcessorStream) -> None:
    """A fault chosen by the request path: /spurious answers the request headers with a
    response_headers reply, /abort ends the stream with INTERNAL, /mutation sets a header
    value with a CR LF, /late asks for a longer timeout (no maximum is set, so none is
    allowed); anything else is answered plainly."""
    while (message := stream.recv(RECV_TIMEOUT_S)) is not None:
        if message.WhichOneof("request") != "request_headers":
            stream.send(matching_reply(message))
            continue
        path = header_value(message.request_headers.headers, ":path")
        if path == b"/spurious":
            stream.send(ep.ProcessingResponse(response_headers=ep.HeadersResponse()))
        elif path == b"/abort":
            stream.abort(grpc.StatusCode.INTERNAL, "processor  broke")
            return
        elif path == b"/mutation":
            bad = mutate_headers(set_headers=[("x-bad", "a\r\nb")])
            stream.send(matching_reply(message, bad))
        else:
            if path == b"/late":
                extend = ep.ProcessingResponse()
                extend.override_message_timeout.FromSeconds(5)
                stream.send(extend)
            stream.send(matching_reply(message))


# (path, request id, status, the fault's event, its level, its details); /fine has none.
CASES = [
    ("/spurious", "rid-spurious", 500, "processor_spurious_message", "warning", "spurious_message"),
    (
        "/abort",
        "rid-abort",
        500,
        "processor_stream_error",
        "warning",
        "ext_proc_error_gRPC_error_13{processor__broke{via_upstream}}",
    ),
    (
        "/mutation",
        "rid-mutation",
        500,
        "processor_mutation_error",
        "error",
        "header_mutation_set_contains_invalid_character",
    ),
    ("/late", "rid-late", 200, "processor_timeout_override_out_of_range", "warning", None),
    ("/fine", "rid-fine", 200, None, None, None),
]


def send_cases(address: tuple[str, int]) -> None:
    for path, request_id, status, *_ in CASES:
        reply = request(address, "GET", path, headers=[("x-request-id", request_id)])
        assert reply.status == status, (path, reply)


def expected_faults() -> list[dict[str, Any]]:
    faults = []
    for _, request_id, _, event, level, details in CASES:
        if event is None:
            continue
        fault: dict[str, Any] = {"event": event, "level": level, "request_id": request_id}
        if details is not None:
            fault["details"] = details
            fault["failed_open"] = False
        if event == "processor_stream_error":
            fault["grpc_status"] = 13
        faults.append(fault)
    return faults


def test_the_proxy_at_warning_level_logs_each_fault_once_with_the_request_id(
    upstream: EchoUpstream,
) -> None:
    with (
        ScriptedProcessor(faulty) as processor,
        listening_socket() as held,
        ProxyProcess(
            *proxy_args(upstream.address, processor.address),
            "--log-level",
            "warning",
            activate=[held],
        ) as proxy,
    ):
        send_cases(held.getsockname())
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
        lines = [json.loads(line) for line in proxy.lines if line.startswith("{")]
    faults = [
        {k: v for k, v in line.items() if k != "timestamp"}
        for line in lines
        if str(line["event"]).startswith("processor_")
    ]
    assert faults == expected_faults()
    # Nothing at info level: not the access line, not the start-up lines.
    assert all(line["level"] in ("warning", "error") for line in lines), lines


def test_the_wsgi_middleware_logs_the_same_faults(upstream: EchoUpstream) -> None:
    """The middleware runs the proxy's request loop: the same events, fields and levels (its
    host's logging decides what is kept; here every line is captured)."""
    with (
        ScriptedProcessor(faulty) as processor,
        parity.extproc_log() as logged,
        relaying_middleware(
            upstream.address,
            ("127.0.0.1", processor.port),
            {"message_timeout": "10s"},
        ) as (address, _),
    ):
        send_cases(address)
    faults = [
        {"level": e["log_level"], **{k: v for k, v in e.items() if k != "log_level"}}
        for e in logged.entries
        if str(e["event"]).startswith("processor_")
    ]
    assert faults == expected_faults()
