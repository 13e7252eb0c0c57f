"""Normalising what the client, the upstream and the processor saw, for parity comparisons.

A parity test runs one scenario through real Envoy and through extproc and compares the two
observations with ``==``. These helpers turn raw observations into plain dicts and lists with
the differences that are there by design removed or masked, each for a stated reason, and
render a readable diff when the two still differ.
"""

from __future__ import annotations

import difflib
import json
import pprint
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format
from structlog.testing import LogCapture

from extproc import logs
from extproc.demo.upstream import ReceivedRequest
from extproc.io import request_loop
from tests.support.processor import ProcessorStream
from tests.support.proxy import Reply

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UUID_MASK = "<uuid>"
BODY_LENGTH_MASK = "<length of the body>"
ECHO_LENGTH_MASK = "<length of the upstream's echo>"

# Envoy adds Date and Server to every response it sends; extproc adds neither.
_CLIENT_ONLY_ONE_SIDE = frozenset({"date", "server"})
# Envoy's router adds this to each upstream response before ext_proc sees it.
_SERVICE_TIME = "x-envoy-upstream-service-time"

HeaderList = list[tuple[str, str]]


def _is_envoy_header(name: str) -> bool:
    return name.lower().startswith("x-envoy-")


def mask_request_id(headers: Iterable[tuple[str, str]]) -> HeaderList:
    """X-Request-Id values masked when they are UUIDs (both proxies generate a fresh one)."""
    return [
        (n, UUID_MASK if n.lower() == "x-request-id" and _UUID.fullmatch(v) else v)
        for n, v in headers
    ]


def upstream_headers(headers: Iterable[Sequence[str]]) -> HeaderList:
    """Headers an upstream received: x-envoy-* dropped (Envoy's router adds
    x-envoy-expected-rq-timeout-ms), X-Request-Id masked."""
    pairs = [(str(h[0]), str(h[1])) for h in headers]
    return mask_request_id((n, v) for n, v in pairs if not _is_envoy_header(n))


def has_request_id(headers: Iterable[Sequence[str]]) -> bool:
    return any(str(h[0]).lower() == "x-request-id" and h[1] for h in headers)


def upstream_view(received: Sequence[ReceivedRequest]) -> list[dict[str, Any]]:
    """What the upstream got, request by request ([] when it got nothing)."""
    return [
        {
            "method": r.method,
            "target": r.target,
            "headers": upstream_headers(r.headers),
            "body": r.body,
            "trailers": r.trailers,
        }
        for r in received
    ]


def echo_length(received: ReceivedRequest) -> int:
    """The length of EchoUpstream's reply body to ``received`` (mirrors EchoUpstream._reply).

    The echo repeats the headers the upstream got, x-envoy-* included, so its length differs
    between the proxies by design; this lets the response's Content-Length be masked only when
    it is exactly what the upstream sent.
    """
    payload = {
        "method": received.method,
        "target": received.target,
        "headers": received.headers,
        "body": received.body.decode("utf-8", "replace"),
        "trailers": received.trailers,
    }
    return len(json.dumps(payload, indent=1).encode() + b"\n")


def client_view(reply: Reply) -> dict[str, Any]:
    """What the client got: status, headers, body (an upstream echo is normalised) and
    trailers."""
    headers: HeaderList = []
    for name, value in reply.headers:
        if name in _CLIENT_ONLY_ONE_SIDE or _is_envoy_header(name):
            continue
        if name == "content-length" and value == str(len(reply.body)):
            # The echo body's length differs by design (see echo_length); what matters is
            # that the framing matches the body actually sent.
            value = BODY_LENGTH_MASK
        headers.append((name, value))
    return {
        "http_version": reply.http_version,
        "status": reply.status,
        "headers": headers,
        "body": _client_body(reply),
        "trailers": reply.trailers,
    }


def _client_body(reply: Reply) -> Any:
    """The body; EchoUpstream's JSON with its header list normalised as upstream_headers."""
    if reply.header("content-type") != "application/json":
        return reply.body
    try:
        payload = json.loads(reply.body)
    except ValueError:
        return reply.body
    if isinstance(payload, dict) and isinstance(payload.get("headers"), list):
        payload["headers"] = upstream_headers(payload["headers"])
    return payload


def processor_view(
    streams: Sequence[ProcessorStream], echo: int | None
) -> list[list[dict[str, Any]]]:
    """The messages each Process stream carried, in order.

    ``echo`` is the length of the upstream's reply body, when there was one: a response's
    Content-Length equal to it is masked (see echo_length).
    """
    return [[message_view(m, echo) for m in stream.requests] for stream in streams]


def message_view(request: ep.ProcessingRequest, echo: int | None = None) -> dict[str, Any]:
    kind = request.WhichOneof("request")
    view: dict[str, Any] = {"kind": kind}
    if kind in ("request_headers", "response_headers"):
        message = getattr(request, kind)
        pairs = [(h.key, bytes(h.raw_value).decode("latin-1")) for h in message.headers.headers]
        if kind == "response_headers":
            pairs = [_mask_echo_length(n, v, echo) for n, v in pairs if n != _SERVICE_TIME]
        view["headers"] = mask_request_id(pairs)
        # A `value` filled instead of raw_value would be a difference too.
        view["value_fields"] = [h.key for h in message.headers.headers if h.value]
        view["end_of_stream"] = message.end_of_stream
    elif kind in ("request_body", "response_body"):
        body = getattr(request, kind)
        view["body"] = bytes(body.body)
        view["end_of_stream"] = body.end_of_stream
        # Only meaningful in GRPC body mode, which neither proxy implements: must stay unset.
        view["grpc_flags"] = [
            name
            for name in ("end_of_stream_without_message", "grpc_message_compressed")
            if getattr(body, name)
        ]
    elif kind in ("request_trailers", "response_trailers"):
        trailers = getattr(request, kind).trailers.headers
        view["trailers"] = [(h.key, bytes(h.raw_value).decode("latin-1")) for h in trailers]
        view["value_fields"] = [h.key for h in trailers if h.value]
    view["protocol_config"] = (
        json_format.MessageToDict(request.protocol_config)
        if request.HasField("protocol_config")
        else None
    )
    view["metadata_context"] = request.HasField("metadata_context")
    return view


def _mask_echo_length(name: str, value: str, echo: int | None) -> tuple[str, str]:
    if name == "content-length" and echo is not None and value == str(echo):
        return name, ECHO_LENGTH_MASK
    return name, value


def readable_diff(expected: Any, actual: Any, labels: tuple[str, str]) -> str:
    """A unified diff of the pretty-printed values."""
    left = pprint.pformat(expected, width=100, sort_dicts=False).splitlines()
    right = pprint.pformat(actual, width=100, sort_dicts=False).splitlines()
    return "\n" + "\n".join(
        difflib.unified_diff(left, right, fromfile=labels[0], tofile=labels[1], lineterm="")
    )


@contextmanager
def refused_port() -> Iterator[tuple[str, int]]:
    """A loopback port that refuses connections: bound (so no one else takes it), never
    listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()[:2]
        yield str(host), int(port)
    finally:
        sock.close()


# Counters --------------------------------------------------------------------------------

EXT_PROC_STATS = "http.ingress.ext_proc."
# How often settled_counters reads, and how long the counters must stay unchanged.
_COUNTER_POLL_S = 0.05
COUNTERS_STABLE_S = 0.5


def ext_proc_counters(stats: Mapping[str, float]) -> dict[str, int]:
    """The ext_proc counters (``http.ingress.ext_proc.*``), by their name within the scope,
    sorted.

    extproc's snapshot also holds its own ``processor_time`` histogram as ``.count`` and
    ``.sum``: a histogram, not a counter, and one Envoy does not have. No Envoy counter name
    ends that way, so those are left out.
    """
    return {
        name.removeprefix(EXT_PROC_STATS): int(value)
        for name, value in sorted(stats.items())
        if name.startswith(EXT_PROC_STATS) and not name.endswith((".count", ".sum"))
    }


def settled_counters(
    read: Callable[[], Mapping[str, float]],
    timeout: float,
    stable: float = COUNTERS_STABLE_S,
) -> dict[str, int]:
    """The ext_proc counters once they have stopped moving: unchanged for ``stable`` seconds
    (Envoy counts some, such as streams_closed, after the request, on a later turn of its
    event loop). At ``timeout`` the last reading is returned as it is, and the comparison
    shows what was still moving."""
    deadline = time.monotonic() + timeout
    last = ext_proc_counters(read())
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(_COUNTER_POLL_S)
        current = ext_proc_counters(read())
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= stable:
            break
    return last


# Logs --------------------------------------------------------------------------------------


def envoy_details_log(path: Path) -> dict[str, Any]:
    """An HCM ``access_log`` entry that writes each request's %RESPONSE_CODE_DETAILS% to
    ``path``, a line per request."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"text_format_source": {"inline_string": "%RESPONSE_CODE_DETAILS%\n"}},
        },
    }


# What Envoy's ext_proc logs at warning level and above, by the start of the message (after its
# [Tags: ...]), and the name of extproc's event for the same fault.
_ENVOY_FAULT_LINES = {
    "Spurious response message": "processor_spurious_message",
    "Received gRPC error on stream": "processor_stream_error",
    "Ext_proc server new timeout setting is out of": "processor_timeout_override_out_of_range",
    # mutation_utils.cc, at error level: the header mutation that fails the request.
    "Header ": "processor_mutation_error",
    "set_headers contain invalid character": "processor_mutation_error",
    "remove_headers contain invalid character": "processor_mutation_error",
    "After mutation": "processor_mutation_error",
}


def envoy_processor_faults(envoy_log: str) -> list[str]:
    """The ext_proc warnings and errors in Envoy's log, each as the name of extproc's event for
    the same fault (a line not known here is kept whole, so that a comparison shows it)."""
    faults = []
    for line in envoy_log.splitlines():
        if "[ext_proc]" not in line or not ("[warning]" in line or "[error]" in line):
            continue
        message = line.rsplit("] ", 1)[-1]
        names = [name for start, name in _ENVOY_FAULT_LINES.items() if message.startswith(start)]
        faults.append(names[0] if names else message)
    return faults


@contextmanager
def extproc_log() -> Iterator[LogCapture]:
    """The events extproc's request loop logs in the block (the access line, the processor
    fault warnings), captured: the session's logging is configured at warning level and
    caches its loggers, so the loop's loggers are swapped for capturing ones meanwhile."""
    capture = LogCapture()
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[capture], wrapper_class=structlog.BoundLogger
    )
    saved = request_loop.access_log, request_loop.fault_log, logs.configured_level
    request_loop.access_log = request_loop.fault_log = logger
    # As when embedded in a host that set up structlog itself: its logger decides what to keep.
    logs.configured_level = None
    try:
        yield capture
    finally:
        request_loop.access_log, request_loop.fault_log, logs.configured_level = saved


def processor_faults(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """extproc's processor fault events among captured log entries, by name."""
    return [str(e["event"]) for e in entries if str(e["event"]).startswith("processor_")]


def response_details(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ``details`` of each access line among captured log entries, in order."""
    return [str(e["details"]) for e in entries if e["event"] == "request"]


_GRPC_ERROR = re.compile(r"(ext_proc_error_gRPC_error_\d+)\{.*\}")
GRPC_CLIENT_MESSAGE_MASK = "<the gRPC client's message>"


def mask_grpc_client_message(details: Iterable[str]) -> list[str]:
    """Response code details with a gRPC error's message masked: for a processor that cannot
    be reached, the message is the gRPC client's own (Envoy's client writes its router's
    texts, grpcio its own), not one a processor sent."""
    return [_GRPC_ERROR.sub(rf"\1{{{GRPC_CLIENT_MESSAGE_MASK}}}", d) for d in details]
