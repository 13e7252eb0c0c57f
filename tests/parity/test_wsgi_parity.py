"""WSGI parity: the proxy's parity scenarios through ExtProcMiddleware and through the proxy.

The three parity suites (headers, bodies, control) each run a scenario through one "proxy"
given as a factory; here the same scenarios, tables, upstreams, clients and normalisation run
through extproc's proxy (``running_proxy``) and through the middleware, served by wsgiref
around :class:`tests.support.wsgi_relay.RelayApp`, an app that hands the upstream the request
it was given and the server the upstream's answer (wsgiref reads a chunked upload as gunicorn
does there: de-chunked, with wsgi.input_terminated). No Envoy is needed: the proxy side is the
reference, itself held to Envoy by those suites.

What the client got, what the upstream (so the app) got, what the processor saw in order and,
for the control suite, the ext_proc counters must be equal once the differences that WSGI
imposes are applied to the proxy's observation. Those are not skipped: each is a function of
:data:`WSGI_DIFFERENCES` (all scenarios) or :data:`SCENARIO_DIFFERENCES` (one scenario) with
its reason, and it must change something wherever it is declared for one scenario.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from extproc import logs
from extproc.demo.upstream import EchoUpstream
from extproc.io import request_loop
from extproc.metrics import Stats
from tests.parity import test_bodies_parity as bodies
from tests.parity import test_control_parity as control
from tests.parity import test_headers_parity as headers
from tests.support import parity
from tests.support.processor import ProcessorStream, ScriptedProcessor, continue_all, matching_reply
from tests.support.proxy import request, running_proxy
from tests.support.wsgi_relay import relaying_middleware

pytestmark = pytest.mark.integration

Observation = dict[str, Any]
HeaderList = list[tuple[str, str]]


# Running a scenario through the middleware ---------------------------------------------------


@contextlib.contextmanager
def headers_through_wsgi(
    scenario: headers.Scenario, upstream: tuple[str, int], processor: tuple[str, int], _: Path
) -> Iterator[tuple[str, int]]:
    with relaying_middleware(upstream, processor, scenario.ext_proc) as (address, _mw):
        yield address


@contextlib.contextmanager
def bodies_through_wsgi(
    scenario: bodies.Scenario,
    upstream: tuple[str, int],
    processor: tuple[str, int],
    _: Path,
    notes: dict[str, Any],
) -> Iterator[tuple[str, int]]:
    extra: dict[str, Any] = {}
    if scenario.buffer_limit is not None:
        extra["buffer_limit_bytes"] = scenario.buffer_limit
    with relaying_middleware(upstream, processor, scenario.ext_proc, **extra) as (address, _mw):
        yield address


@contextlib.contextmanager
def control_through_wsgi(
    scenario: control.Scenario, upstream: tuple[str, int], processor: tuple[str, int], _: Path
) -> Iterator[control.Run]:
    stats = Stats()
    with (
        parity.extproc_log() as logged,
        relaying_middleware(
            upstream,
            processor,
            control.extproc_file(scenario),
            message_timeout=scenario.ext_proc["message_timeout"],
            stats=stats,
        ) as (address, _mw),
    ):
        run = control.Run(address, stats.snapshot)
        yield run
    # The same request loop writes the access line and the processor faults.
    run.details = parity.response_details(logged.entries)
    run.faults = parity.processor_faults(logged.entries)


# The differences WSGI imposes -----------------------------------------------------------------

Difference = Callable[[Observation], None]


def _regular_request_headers(pairs: HeaderList) -> HeaderList:
    """Repeated names folded into one comma-joined value (``; `` for cookie), then ordered by
    name, pseudo-headers first as they came."""
    pseudo = [(n, v) for n, v in pairs if n.startswith(":")]
    folded: dict[str, str] = {}
    for name, value in pairs:
        if name.startswith(":"):
            continue
        sep = "; " if name == "cookie" else ","
        folded[name] = f"{folded[name]}{sep}{value}" if name in folded else value
    return pseudo + sorted(folded.items())


def _each_request_header_list(observation: Observation) -> Iterator[tuple[Any, str]]:
    """(container, key) of every list of request headers in an observation: the upstream's,
    its echo to the client, and the processor's request_headers messages."""
    for received in observation.get("upstream", []):
        yield received, "headers"
    clients = observation["client"]
    for client in clients if isinstance(clients, list) else [clients]:
        body = client.get("body")
        if isinstance(body, dict) and isinstance(body.get("headers"), list):
            yield body, "headers"
    for stream in observation.get("processor", []):
        for message in stream:
            if message["kind"] == "request_headers":
                yield message, "headers"


def fold_request_headers(observation: Observation) -> None:
    """PEP 3333 environ: the server folds a repeated request header into one ``HTTP_`` value,
    and CONTENT_TYPE / CONTENT_LENGTH are kept apart from the ``HTTP_`` keys, so neither
    repeats nor the order of headers survive to the middleware (or the app)."""
    for container, key in _each_request_header_list(observation):
        container[key] = [tuple(p) for p in _regular_request_headers(container[key])]


def wsgiref_speaks_http_1_0(observation: Observation) -> None:
    """wsgiref's server answers HTTP/1.0 (the WSGI server, not the middleware, owns the
    status line and framing)."""
    for client in _clients(observation):
        if client.get("http_version") is not None:
            client["http_version"] = b"1.0"


def one_request_a_connection(observation: Observation) -> None:
    """The connection is the WSGI server's, and wsgiref's (HTTP/1.0) ends after each response
    without a "connection: close": a request sent after the reply on the same connection
    (bodies' next_request) reaches neither the processor nor the app."""
    for client in _clients(observation):
        if "headers" in client:
            client["headers"] = [h for h in client["headers"] if h != ("connection", "close")]
    if observation.get("next_request") is None:
        return
    observation["next_request"] = "connection ended"
    observation["processor"] = [
        stream
        for stream in observation["processor"]
        if not any((":path", "/next") in m.get("headers", []) for m in stream[:1])
    ]
    observation["upstream"] = [r for r in observation["upstream"] if r["target"] != "/next"]


def no_trailers(observation: Observation) -> None:
    """WSGI carries no trailers, either way (PEP 3333 has neither request nor response
    trailers): the server drops the client's, the app cannot send the upstream's. So no
    trailers message reaches the processor, the body message before it ends the stream, and
    neither the upstream (the app) nor the client gets any. Trailers not sent to the
    processor still ended the body on the wire: there too the last body message ends it."""
    had_trailers = any(received["trailers"] for received in observation.get("upstream", []))
    for received in observation.get("upstream", []):
        received["trailers"] = []
    for client in _clients(observation):
        client["trailers"] = [] if "trailers" in client else client.get("trailers")
        body = client.get("body")
        if isinstance(body, dict) and "trailers" in body:
            body["trailers"] = []
    for stream in observation.get("processor", []):
        for index in range(len(stream) - 1, -1, -1):
            kind = stream[index]["kind"]
            if kind not in ("request_trailers", "response_trailers"):
                continue
            del stream[index]
            body = kind.replace("_trailers", "_body")
            if index > 0 and stream[index - 1]["kind"] == body:
                stream[index - 1]["end_of_stream"] = True
            if "counters" in observation:
                observation["counters"]["stream_msgs_sent"] -= 1
                observation["counters"]["stream_msgs_received"] -= 1
        bodies = [m for m in stream if m["kind"] == "request_body"]
        if had_trailers and bodies:
            bodies[-1]["end_of_stream"] = True


def no_response_framing(observation: Observation) -> None:
    """A WSGI app may not set hop-by-hop headers (PEP 3333): the response head the processor
    sees has no Transfer-Encoding, and the client gets the WSGI server's framing (wsgiref:
    HTTP/1.0, close-delimited), not the proxy's chunked one."""
    for client in _clients(observation):
        if "headers" in client:
            client["headers"] = [h for h in client["headers"] if h[0] != "transfer-encoding"]
    for stream in observation.get("processor", []):
        for message in stream:
            if message["kind"] == "response_headers":
                message["headers"] = [h for h in message["headers"] if h[0] != "transfer-encoding"]


def no_upstream_address(observation: Observation) -> None:
    """The middleware has no upstream: the ``upstream.address`` attribute has no value."""
    for stream in observation.get("processor", []):
        for message in stream:
            for values in message.get("attributes", {}).values():
                values.pop("upstream.address", None)


def _clients(observation: Observation) -> list[dict[str, Any]]:
    clients = observation["client"]
    return clients if isinstance(clients, list) else [clients]


WSGI_DIFFERENCES: tuple[Difference, ...] = (
    fold_request_headers,
    wsgiref_speaks_http_1_0,
    one_request_a_connection,
    no_trailers,
    no_response_framing,
    no_upstream_address,
)


# scenario id -> (reason, the change to the proxy's observation)
def end_with_the_last_byte(observation: Observation) -> None:
    """A body with a Content-Length: wsgi.input is read to that length, so the last piece
    carries end_of_stream; the proxy, like Envoy, learns the end from h11's next event and
    sends it in a message of its own, empty."""
    for stream in observation["processor"]:
        for index in range(len(stream) - 1, 0, -1):
            message, previous = stream[index], stream[index - 1]
            if (
                message["kind"] == previous["kind"] == "request_body"
                and message["body"] == b""
                and message["end_of_stream"]
            ):
                previous["end_of_stream"] = True
                del stream[index]
                observation["counters"]["stream_msgs_sent"] -= 1


def local_reply_before_the_first_piece(observation: Observation) -> None:
    """An immediate response to the first STREAMED response chunk: the proxy has sent the
    head already (so has Envoy) and can only reset; a WSGI server sends the head with the
    first body piece, so the middleware replaces it (start_response with exc_info) and the
    client gets the immediate response whole. And the middleware waits for a timed reply
    before it reads the next piece (the app's iterable may be slow to give it), so the
    processor never sees the second chunk, which the proxy may have read by then."""
    stream = observation["processor"][0]
    first = next(i for i, m in enumerate(stream) if m["kind"] == "response_body")
    del stream[first + 1 :]
    client = observation["client"]
    client.update(
        status=503,
        headers=[("content-length", parity.BODY_LENGTH_MASK), ("content-type", "text/plain")],
        body=b"stopped mid-body",
        complete=True,
    )


def reset_reads_as_the_end(observation: Observation) -> None:
    """An immediate response after a STREAMED response chunk went out: both abort the
    connection, but wsgiref's HTTP/1.0 response is delimited by the close, so its client
    reads a short body as complete (behind an HTTP/1.1 server it sees the reset)."""
    sent = [m["body"] for m in observation["processor"][0] if m["kind"] == "response_body"][
        :-1
    ]  # the last one was answered with the immediate response
    observation["client"].update(body=b"".join(sent), complete=True)


def empty_body_gets_a_length(observation: Observation) -> None:
    """An empty response body: wsgiref, not the middleware, adds Content-Length: 0 to a
    response whose iterable gave nothing (the proxy relays the upstream's empty chunked
    body)."""
    observation["client"]["headers"].append(("content-length", parity.BODY_LENGTH_MASK))


def empty_body_ends_itself(observation: Observation) -> None:
    """An empty chunked body with trailers, BUFFERED: without its trailers (see no_trailers)
    the empty body ends the request, in an empty body message, as the proxy sends one for
    an empty chunked body without trailers (scenario empty-request-chunked-buffered)."""
    stream = observation["processor"][0]
    at = next(i for i, m in enumerate(stream) if m["kind"] == "request_headers") + 1
    stream.insert(
        at,
        {
            "kind": "request_body",
            "body": b"",
            "end_of_stream": True,
            "grpc_flags": [],
            "protocol_config": None,
            "metadata_context": True,
        },
    )


def body_after_the_headers_reply(observation: Observation) -> None:
    """A STREAMED body that came whole before the headers reply, which the proxy (as Envoy)
    sends as one message with its end and BUFFERED semantics: a chunked request body, or
    what a generator app gives, cannot be seen without waiting for it, so the middleware
    reads it after the reply, as it comes. The end then comes in a message of its own, and
    the body reply's header mutation is too late (the head went on)."""
    for stream in observation["processor"]:
        for index in range(len(stream) - 1, -1, -1):
            message = stream[index]
            if message["kind"].endswith("_body") and message["body"] and message["end_of_stream"]:
                message["end_of_stream"] = False
                stream.insert(index + 1, {**message, "body": b"", "end_of_stream": True})
                if "counters" in observation:
                    observation["counters"]["stream_msgs_sent"] += 1
                    observation["counters"]["stream_msgs_received"] += 1
    places = [*_clients(observation), *observation["upstream"]]
    places += [c["body"] for c in _clients(observation) if isinstance(c.get("body"), dict)]
    for place in places:
        if "headers" in place:
            place["headers"] = [(n, v) for n, v in place["headers"] if n != _SET_IN_BODY_REPLY]


_SET_IN_BODY_REPLY = "x-set-in-body-reply"


SCENARIO_DIFFERENCES: dict[str, tuple[str, Difference]] = {
    **dict.fromkeys(
        (
            "streamed-request-whole-chunked-body-trailers",
            "streamed-response-header-mutation-whole-body",
        ),
        (body_after_the_headers_reply.__doc__ or "", body_after_the_headers_reply),
    ),
    "empty-request-chunked-trailers-only": (
        empty_body_ends_itself.__doc__ or "",
        empty_body_ends_itself,
    ),
    "immediate-on-first-streamed-response-chunk": (
        local_reply_before_the_first_piece.__doc__ or "",
        local_reply_before_the_first_piece,
    ),
    "immediate-on-second-streamed-response-chunk": (
        reset_reads_as_the_end.__doc__ or "",
        reset_reads_as_the_end,
    ),
    "empty-response-chunked-buffered": (
        empty_body_gets_a_length.__doc__ or "",
        empty_body_gets_a_length,
    ),
    "observability-streamed-body": (end_with_the_last_byte.__doc__ or "", end_with_the_last_byte),
    "spurious-plain-body-reply-in-duplex": (
        end_with_the_last_byte.__doc__ or "",
        end_with_the_last_byte,
    ),
}


def expected_through_wsgi(scenario_id: str, proxy: Observation) -> Observation:
    expected = copy.deepcopy(proxy)
    for difference in WSGI_DIFFERENCES:
        difference(expected)
    if scenario_id in SCENARIO_DIFFERENCES:
        _, change = SCENARIO_DIFFERENCES[scenario_id]
        before = copy.deepcopy(expected)
        change(expected)
        assert expected != before, f"{scenario_id}: the declared difference changes nothing"
    return expected


def mask_upstream_connection(observation: Observation) -> None:
    """x-echo-connection, the upstream connection a request came on, masked on both sides:
    whether a request finds the previous one's connection back in the pool (the proxy's, or
    the relay's) depends on whether the client's next request is quicker than the release."""
    responses: list[Any] = [c for c in _clients(observation) if "headers" in c]
    for stream in observation.get("processor", []):
        responses += [m for m in stream if m["kind"] == "response_headers"]
    for response in responses:
        response["headers"] = [
            (n, "<n>" if n == "x-echo-connection" else v) for n, v in response["headers"]
        ]


def compare(scenario_id: str, proxy: Observation, wsgi: Observation) -> None:
    expected = expected_through_wsgi(scenario_id, proxy)
    mask_upstream_connection(expected)
    mask_upstream_connection(wsgi)
    fold_request_headers(wsgi)  # only orders what the middleware already folded
    assert expected == wsgi, parity.readable_diff(expected, wsgi, ("proxy, as WSGI", "wsgi"))


# The suites ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", headers.SCENARIOS, ids=lambda s: s.id)
def test_headers_parity_through_wsgi(scenario: headers.Scenario, tmp_path: Path) -> None:
    proxy = headers.observe(scenario, headers.through_extproc, tmp_path)
    wsgi = headers.observe(scenario, headers_through_wsgi, tmp_path)
    compare(scenario.id, proxy, wsgi)


@pytest.mark.parametrize("scenario", bodies.SCENARIOS, ids=lambda s: s.id)
def test_bodies_parity_through_wsgi(scenario: bodies.Scenario, tmp_path: Path) -> None:
    proxy = bodies.observe(scenario, bodies.through_extproc, tmp_path).compared
    wsgi = bodies.observe(scenario, bodies_through_wsgi, tmp_path).compared
    compare(scenario.id, proxy, wsgi)


# The control suite's races in the proxy itself (its xfails, e.g. observability mode with an
# unreachable processor) have no one outcome to compare, so they are left out here; so are its
# failing upstreams, which the middleware's app (a relay) answers for in its own way.
COMPARABLE_CONTROL = [s for s in control.SCENARIOS if not s.xfail and s.upstream == "echo"]


@pytest.mark.parametrize("scenario", COMPARABLE_CONTROL, ids=lambda s: s.id)
def test_control_parity_through_wsgi(scenario: control.Scenario, tmp_path: Path) -> None:
    proxy = control.observe(scenario, control.through_extproc, tmp_path)
    wsgi = control.observe(scenario, control_through_wsgi, tmp_path)
    compare(scenario.id, proxy, wsgi)


# The access log, and what the middleware never adds -------------------------------------------


def _metadata_handler(stream: ProcessorStream) -> None:
    """Continue everything; dynamic metadata on the request headers reply."""
    while (message := stream.recv()) is not None:
        response = matching_reply(message)
        if message.WhichOneof("request") == "request_headers":
            response.dynamic_metadata.update({"ns": {"user": "alice"}})
        stream.send(response)


ACCESS_EXT_PROC = {
    "message_timeout": "10s",
    "metadata_options": {"receiving_namespaces": {"untyped": ["ns"]}},
}
# Times differ from run to run; the request id is a fresh UUID on each side.
_VARYING = ("duration_ms", "upstream_ms", "processor_ms", "request_id")


def _capture_access_log(monkeypatch: pytest.MonkeyPatch, capture: LogCapture) -> None:
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[capture], wrapper_class=structlog.BoundLogger
    )
    monkeypatch.setattr(request_loop, "access_log", logger)
    # As when embedded in a host that set up structlog itself: its logger decides what to keep.
    monkeypatch.setattr(logs, "configured_level", None)


def _access_entries(logs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    entries = [dict(e) for e in logs if e.get("event") == "request"]
    for entry in entries:
        for key in _VARYING:
            entry[key] = type(entry.pop(key)).__name__
        # Which phases waited for the processor is the same on both sides; how long is not.
        entry["processor_phases_ms"] = sorted(entry["processor_phases_ms"])
    return entries


def test_access_log_line_is_the_proxys(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``extproc.access`` "request" event per request, with the proxy's fields and values
    (times and the generated request id aside), dynamic metadata included: both write it with
    extproc.io.request_loop.RequestLoop.finish, whose logger is swapped here for a capturing one
    (the session's logging is configured at warning level and caches its loggers)."""
    proxy_logs, wsgi_logs = LogCapture(), LogCapture()
    with (
        EchoUpstream() as upstream,
        ScriptedProcessor(_metadata_handler) as processor,
    ):
        at = ("127.0.0.1", processor.port)
        # Each logs once its response went out: the capture is read after the server stopped.
        _capture_access_log(monkeypatch, proxy_logs)
        with running_proxy(upstream.address, processor.address, ext_proc=ACCESS_EXT_PROC) as proxy:
            proxy_reply = request(proxy.address, "POST", "/who?x=1", body=b"twelve bytes")
        _capture_access_log(monkeypatch, wsgi_logs)
        with relaying_middleware(upstream.address, at, ACCESS_EXT_PROC) as (address, _mw):
            wsgi_reply = request(address, "POST", "/who?x=1", body=b"twelve bytes")
    proxy_entries = _access_entries(proxy_logs.entries)
    wsgi_entries = _access_entries(wsgi_logs.entries)
    assert len(proxy_entries) == 1 and proxy_entries[0]["dynamic_metadata"] == {
        "ns": {"user": "alice"}
    }
    # bytes_out counts the body sent, which is the upstream's echo of the request: it repeats
    # the headers the upstream got, folded by WSGI (fold_request_headers), so its length is
    # each side's own.
    assert proxy_entries[0].pop("bytes_out") == len(proxy_reply.body)
    assert wsgi_entries[0].pop("bytes_out") == len(wsgi_reply.body)
    assert wsgi_entries == proxy_entries


def test_no_x_forwarded_for() -> None:
    """The proxy appends X-Forwarded-For by default (its flag; Envoy's use_remote_address);
    the middleware never does: the WSGI server is the edge, and the client's address is
    REMOTE_ADDR in the app's environ already."""
    with EchoUpstream() as upstream, ScriptedProcessor(continue_all) as processor:
        at = ("127.0.0.1", processor.port)
        with running_proxy(upstream.address, processor.address) as proxy:
            request(proxy.address, "GET", "/")
        with relaying_middleware(upstream.address, at, {"message_timeout": "10s"}) as (a, _):
            request(a, "GET", "/")
        through_proxy, through_wsgi = upstream.requests
    assert through_proxy.header("x-forwarded-for") == "127.0.0.1"
    assert through_wsgi.header("x-forwarded-for") is None
