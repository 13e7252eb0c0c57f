"""Stats: what a finished request counts, and how /stats and /metrics show it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from extproc.core.events import (
    BodyReceived,
    Direction,
    Event,
    HeadersReceived,
    MessageTimedOut,
    ProcessorClosed,
    ProcessorReplied,
    RespondLocally,
)
from extproc.core.exchange import Exchange
from extproc.core.record import RequestRecord
from extproc.core.settings import ExchangeSettings
from extproc.metrics import (
    EXT_PROC_COUNTERS,
    QUANTILES,
    Stats,
    record_exchange,
)
from extproc.models import Headers

EXT_PROC = "http.ingress.ext_proc."


def request_head() -> Headers:
    return Headers([(b":authority", b"h"), (b":path", b"/"), (b":method", b"GET")])


def response_head() -> Headers:
    return Headers([(b":status", b"200")])


def reply(**kw: Any) -> ProcessorReplied:
    return ProcessorReplied(ep.ProcessingResponse(**kw))


REQUEST_HEADERS = HeadersReceived(Direction.REQUEST, request_head(), True)
RESPONSE_HEADERS = HeadersReceived(Direction.RESPONSE, response_head(), True)
ANSWER_REQUEST = reply(request_headers=ep.HeadersResponse())
ANSWER_RESPONSE = reply(response_headers=ep.HeadersResponse())
IMMEDIATE_403 = reply(immediate_response=ep.ImmediateResponse(status={"code": 403}))
OVERRIDE_1S = reply(override_message_timeout=duration_pb2.Duration(seconds=1))


def ext_proc_counters(stats: Stats) -> dict[str, float]:
    """The ext_proc counters that moved, by their short name."""
    return {
        name.removeprefix(EXT_PROC): value
        for name, value in stats.snapshot().items()
        if name.removeprefix(EXT_PROC) in EXT_PROC_COUNTERS and value
    }


# What a real exchange counts ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    events: Sequence[Event]
    # The ext_proc counters that moved; each case is a scenario run through Envoy 1.40 with
    # the same processor behaviour, and these are the counts Envoy's /stats showed.
    expected: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)


HAPPY = {"streams_started": 1, "stream_msgs_sent": 2, "stream_msgs_received": 2}
CASES = [
    Case(
        "both_header_phases",
        [REQUEST_HEADERS, ANSWER_REQUEST, RESPONSE_HEADERS, ANSWER_RESPONSE],
        {**HAPPY, "streams_closed": 1},
    ),
    Case(
        "grpc_error_fail_closed",
        [REQUEST_HEADERS, ProcessorClosed(13, "boom")],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "streams_failed": 1,
            "server_half_closed": 1,
            "immediate_responses_sent": 1,
        },
    ),
    Case(
        "grpc_error_fail_open",
        [REQUEST_HEADERS, ProcessorClosed(13, "boom"), RESPONSE_HEADERS],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "streams_failed": 1,
            "server_half_closed": 2,
            "streams_closed": 1,
            "failure_mode_allowed": 1,
        },
        {"failure_mode_allow": True},
    ),
    Case(
        "ok_close_before_any_reply",
        [REQUEST_HEADERS, ProcessorClosed(0), RESPONSE_HEADERS],
        {"streams_started": 1, "stream_msgs_sent": 1, "server_half_closed": 1, "streams_closed": 1},
    ),
    Case(
        "ok_close_after_the_request_headers",
        [REQUEST_HEADERS, ANSWER_REQUEST, ProcessorClosed(0), RESPONSE_HEADERS],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "stream_msgs_received": 1,
            "server_half_closed": 1,
            "streams_closed": 1,
        },
    ),
    Case(
        "message_timeout_fail_closed",
        [REQUEST_HEADERS, MessageTimedOut()],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "message_timeouts": 1,
            "streams_closed": 1,
            "immediate_responses_sent": 1,
        },
    ),
    Case(
        "message_timeout_fail_open",
        [REQUEST_HEADERS, MessageTimedOut(), RESPONSE_HEADERS],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "message_timeouts": 1,
            "streams_closed": 1,
            "failure_mode_allowed": 1,
        },
        {"failure_mode_allow": True},
    ),
    Case(
        "immediate_response",
        [REQUEST_HEADERS, IMMEDIATE_403],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "stream_msgs_received": 1,
            "streams_closed": 1,
            "immediate_responses_sent": 1,
        },
    ),
    Case(
        "spurious_fail_closed",
        [REQUEST_HEADERS, ANSWER_RESPONSE],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "spurious_msgs_received": 1,
            "streams_closed": 1,
            "immediate_responses_sent": 1,
        },
    ),
    Case(
        "spurious_fail_open",
        [REQUEST_HEADERS, ANSWER_RESPONSE, RESPONSE_HEADERS],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "spurious_msgs_received": 1,
            "streams_closed": 1,
            "failure_mode_allowed": 1,
        },
        {"failure_mode_allow": True},
    ),
    Case(
        "invalid_header_mutation",
        [
            REQUEST_HEADERS,
            reply(
                request_headers=ep.HeadersResponse(
                    response=ep.CommonResponse(
                        header_mutation=ep.HeaderMutation(
                            set_headers=[{"header": {"key": "x-bad", "raw_value": b"a\nb"}}]
                        )
                    )
                )
            ),
        ],
        {
            "streams_started": 1,
            "stream_msgs_sent": 1,
            "stream_msgs_received": 1,
            "rejected_header_mutations": 1,
            "streams_closed": 1,
            "immediate_responses_sent": 1,
        },
    ),
    Case(
        # Without max_message_timeout every override is out of range; they are not replies.
        "override_message_timeout_ignored",
        [
            REQUEST_HEADERS,
            OVERRIDE_1S,
            ANSWER_REQUEST,
            RESPONSE_HEADERS,
            OVERRIDE_1S,
            ANSWER_RESPONSE,
        ],
        {**HAPPY, "streams_closed": 1, "override_message_timeout_ignored": 2},
    ),
]


def run_exchange(case: Case) -> tuple[Exchange, bool]:
    """The exchange after the case's events, and whether it answered locally."""
    exchange = Exchange(ExchangeSettings(**case.settings))
    local_reply = False
    for event in case.events:
        actions = exchange.handle(event)
        local_reply |= any(isinstance(a, RespondLocally) for a in actions)
    return exchange, local_reply


def record_of(exchange: Exchange, local_reply: bool, **kw: Any) -> RequestRecord:
    """The exchange's record with what the I/O side writes; the record knows on its own
    whether the exchange answered locally."""
    record = exchange.record
    assert record.answered_locally == local_reply
    given: dict[str, Any] = {"status": 200, "duration": 0.01, "processor_time": 0.002}
    for name, value in (given | kw).items():
        setattr(record, name, value)
    return record


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_record_exchange_counts_as_envoy_does(case: Case) -> None:
    exchange, local_reply = run_exchange(case)
    stats = Stats()
    record_exchange(stats, record_of(exchange, local_reply))
    assert ext_proc_counters(stats) == case.expected


def test_no_processor_traffic_counts_only_the_request() -> None:
    stats = Stats()
    record_exchange(
        stats,
        RequestRecord(status=204, duration=0.001, upstream_time=0.0005, upstream_answered=True),
    )
    assert ext_proc_counters(stats) == {}
    snapshot = stats.snapshot()
    assert snapshot["http.ingress.downstream_rq_total"] == 1
    assert snapshot["http.ingress.downstream_rq_2xx"] == 1
    assert snapshot["http.ingress.downstream_rq_time.count"] == 1
    assert snapshot["cluster.upstream.upstream_rq_time.count"] == 1
    assert snapshot[EXT_PROC + "processor_time.count"] == 0


def test_an_error_after_processing_ended_is_a_failure_only() -> None:
    # The exchange was complete (and its stream closed by the proxy) when the error came.
    case = Case("late", [REQUEST_HEADERS, IMMEDIATE_403, ProcessorClosed(14, "gone")], {})
    exchange, local_reply = run_exchange(case)
    stats = Stats()
    record_exchange(stats, record_of(exchange, local_reply, status=403))
    counters = ext_proc_counters(stats)
    assert counters["streams_failed"] == 1 and counters["streams_closed"] == 1
    assert "server_half_closed" not in counters


def test_counts_follow_how_processing_ended_not_the_details_text() -> None:
    # A processor may write any details: these are Envoy's own texts for other endings.
    case = Case(
        "details",
        [
            REQUEST_HEADERS,
            reply(
                immediate_response=ep.ImmediateResponse(
                    status={"code": 403}, details="response_payload_too_large"
                )
            ),
            ProcessorClosed(14, "gone"),
        ],
        {},
    )
    exchange, local_reply = run_exchange(case)
    stats = Stats()
    record_exchange(stats, record_of(exchange, local_reply, status=403))
    snapshot = stats.snapshot()
    assert snapshot[EXT_PROC + "immediate_responses_sent"] == 1
    assert snapshot["http.ingress.rs_too_large"] == 0
    assert snapshot[EXT_PROC + "server_half_closed"] == 0


def test_a_response_body_over_the_limit_is_rs_too_large_not_an_immediate_response() -> None:
    body_mode = ProcessingMode(response_body_mode=ProcessingMode.BUFFERED)
    case = Case(
        "response_overflow",
        [
            REQUEST_HEADERS,
            ANSWER_REQUEST,
            HeadersReceived(Direction.RESPONSE, response_head(), False),
            ANSWER_RESPONSE,
            BodyReceived(Direction.RESPONSE, b"12345", False),
        ],
        {},
        {"processing_mode": body_mode, "buffer_limit": 4},
    )
    exchange, local_reply = run_exchange(case)
    stats = Stats()
    record_exchange(stats, record_of(exchange, local_reply, status=500))
    snapshot = stats.snapshot()
    assert snapshot["http.ingress.rs_too_large"] == 1
    assert snapshot[EXT_PROC + "immediate_responses_sent"] == 0
    assert snapshot["http.ingress.downstream_rq_5xx"] == 1


def test_request_too_large_is_counted_from_the_record() -> None:
    stats = Stats()
    record_exchange(stats, RequestRecord(status=413, request_too_large=True))
    snapshot = stats.snapshot()
    assert snapshot["http.ingress.downstream_rq_too_large"] == 1
    assert snapshot["http.ingress.downstream_rq_4xx"] == 1


@pytest.mark.parametrize(
    ("status", "klass"),
    [(101, "1xx"), (200, "2xx"), (304, "3xx"), (431, "4xx"), (503, "5xx"), (0, None), (600, None)],
)
def test_record_response_counts_envoy_status_classes(status: int, klass: str | None) -> None:
    stats = Stats()
    stats.record_response(status)
    snapshot = stats.snapshot()
    classes = {n: v for n, v in snapshot.items() if re.fullmatch(r".*downstream_rq_\dxx", n) and v}
    assert snapshot["http.ingress.downstream_rq_total"] == 1
    assert classes == ({f"http.ingress.downstream_rq_{klass}": 1} if klass else {})


def test_connections_move_the_total_and_the_active_gauge() -> None:
    stats = Stats()
    stats.connection_opened()
    stats.connection_opened()
    stats.connection_closed()
    snapshot = stats.snapshot()
    assert snapshot["http.ingress.downstream_cx_total"] == 2
    assert snapshot["http.ingress.downstream_cx_active"] == 1


def test_each_stats_has_its_own_registry() -> None:
    first, second = Stats(), Stats()
    first.ext_proc.streams_started.inc()
    assert second.snapshot()[EXT_PROC + "streams_started"] == 0
    default = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("extproc_") for name in default)


# Envoy's /stats ----------------------------------------------------------------------------

FRESH_TEXT = """\
cluster.upstream.upstream_cx_destroy_remote_with_active_rq: 0
cluster.upstream.upstream_cx_protocol_error: 0
cluster.upstream.upstream_rq_timeout: 0
http.ingress.downstream_cx_active: 0
http.ingress.downstream_cx_total: 0
http.ingress.downstream_rq_1xx: 0
http.ingress.downstream_rq_2xx: 0
http.ingress.downstream_rq_3xx: 0
http.ingress.downstream_rq_4xx: 0
http.ingress.downstream_rq_5xx: 0
http.ingress.downstream_rq_too_large: 0
http.ingress.downstream_rq_total: 0
{p}clear_route_cache_disabled: 0
{p}clear_route_cache_ignored: 0
{p}clear_route_cache_upstream_ignored: 0
{p}failure_mode_allowed: 0
{p}http_not_ok_resp_received: 0
{p}immediate_responses_sent: 0
{p}message_timeouts: 0
{p}override_message_timeout_ignored: 0
{p}override_message_timeout_received: 0
{p}rejected_header_mutations: 0
{p}server_half_closed: 0
{p}spurious_msgs_received: 0
{p}stream_msgs_received: 0
{p}stream_msgs_sent: 0
{p}streams_closed: 0
{p}streams_failed: 0
{p}streams_started: 0
http.ingress.rs_too_large: 0
listener.ingress.downstream_cx_overflow: 0
server.reload_failures: 0
server.reloads: 0
server.worker_restarts: 0
cluster.upstream.upstream_rq_time: No recorded values
http.ingress.downstream_rq_time: No recorded values
{p}processor_time: No recorded values
"""


@pytest.mark.parametrize(
    ("stat_prefix", "scope"),
    [("", "http.ingress.ext_proc."), ("foo", "http.ingress.ext_proc.foo.")],
    ids=["no_stat_prefix", "stat_prefix_foo"],
)
def test_envoy_text_names_and_order(stat_prefix: str, scope: str) -> None:
    # Envoy 1.40 prints these names, in this order (counters and gauges by name, then the
    # histograms by name), for an HCM with stat_prefix "ingress"; server.* are extproc's.
    assert Stats(stat_prefix).render_envoy_stats() == FRESH_TEXT.format(p=scope)


def test_envoy_text_values_and_filter() -> None:
    stats = Stats()
    stats.ext_proc.stream_msgs_sent.inc(3)
    text = stats.render_envoy_stats(re.compile(r"stream_msgs|streams_started"))
    assert text == (
        "http.ingress.ext_proc.stream_msgs_received: 0\n"
        "http.ingress.ext_proc.stream_msgs_sent: 3\n"
        "http.ingress.ext_proc.streams_started: 0\n"
    )


def test_envoy_text_histogram_percentiles_in_milliseconds() -> None:
    stats = Stats()
    for _ in range(4):
        stats.downstream_rq_time.observe(0.003)  # Envoy's (1 ms, 5 ms] bucket
    text = stats.render_envoy_stats(re.compile("downstream_rq_time"))
    assert text == (
        "http.ingress.downstream_rq_time: P0(nan,1) P25(nan,2) P50(nan,3) P75(nan,4) "
        "P90(nan,4.6) P95(nan,4.8) P99(nan,4.96) P99.5(nan,4.98) P99.9(nan,4.996) P100(nan,5)\n"
    )


def test_a_sample_past_the_last_bucket_reads_as_the_last_bound() -> None:
    stats = Stats()
    stats.upstream_rq_time.observe(7200.0)
    text = stats.render_envoy_stats(re.compile("upstream_rq_time"))
    assert text.endswith("P100(nan,3600000)\n")


def test_envoy_json_shape() -> None:
    stats = Stats("foo")
    stats.ext_proc.streams_started.inc()
    stats.processor_time.observe(0.003)
    document = json.loads(stats.render_envoy_json())
    *scalars, histograms = document["stats"]
    assert {"name": EXT_PROC + "foo.streams_started", "value": 1} in scalars
    assert all(set(entry) == {"name", "value"} for entry in scalars)
    assert all(type(entry["value"]) is int for entry in scalars)
    assert [e["name"] for e in scalars] == sorted(e["name"] for e in scalars)
    quantiles = histograms["histograms"]
    assert quantiles["supported_quantiles"] == list(QUANTILES)
    computed = {h["name"]: h["values"] for h in quantiles["computed_quantiles"]}
    assert computed[EXT_PROC + "foo.processor_time"][2] == {"cumulative": 3, "interval": None}
    assert computed["http.ingress.downstream_rq_time"][0] == {"cumulative": None, "interval": None}


def test_envoy_json_filter_without_histograms_has_no_histogram_entry() -> None:
    document = json.loads(Stats().render_envoy_json(re.compile("streams_started")))
    assert document == {"stats": [{"name": EXT_PROC + "streams_started", "value": 0}]}


# Prometheus --------------------------------------------------------------------------------


def test_prometheus_text_parses_with_the_same_values() -> None:
    stats = Stats("foo")
    record_exchange(
        stats,
        RequestRecord(
            messages_sent=2,
            messages_received=2,
            status=201,
            duration=0.02,
            upstream_time=0.01,
            upstream_answered=True,
            processor_time=0.004,
        ),
    )
    body, content_type = stats.render_prometheus()
    # The classic text format, which every Prometheus reads.
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    prefix = (("stat_prefix", "foo"),)
    assert samples[("extproc_ext_proc_streams_started_total", prefix)] == 1
    assert samples[("extproc_ext_proc_stream_msgs_sent_total", prefix)] == 2
    assert samples[("extproc_ext_proc_streams_failed_total", prefix)] == 0
    assert samples[("extproc_downstream_rq_xx_total", (("response_code_class", "2"),))] == 1
    assert samples[("extproc_downstream_rq_total", ())] == 1
    assert samples[("extproc_downstream_cx_active", ())] == 0
    assert samples[("extproc_downstream_rq_time_seconds_count", ())] == 1
    assert samples[("extproc_upstream_rq_time_seconds_sum", ())] == pytest.approx(0.01)
    assert samples[("extproc_ext_proc_processor_time_seconds_count", prefix)] == 1


def test_prometheus_openmetrics_when_asked() -> None:
    body, content_type = Stats().render_prometheus("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# Workers ----------------------------------------------------------------------------------


def test_sum_workers_adds_counters_gauges_and_histograms() -> None:
    one, two = Stats("foo"), Stats("foo")
    one.connection_opened()
    two.connection_opened()
    two.connection_opened()
    two.connection_closed()
    one.ext_proc.streams_started.inc(2)
    two.ext_proc.streams_started.inc(3)
    one.downstream_rq_time.observe(0.002)
    two.downstream_rq_time.observe(0.004)
    one.reloads.inc(7)  # a worker's own server stats are not shown
    supervisor = Stats("foo")
    supervisor.reloads.inc()
    supervisor.worker_restarts.inc(2)
    supervisor.sum_workers(lambda: [one.exposition().decode(), two.exposition().decode()])
    snapshot = supervisor.snapshot()
    assert snapshot["http.ingress.downstream_cx_total"] == 3
    assert snapshot["http.ingress.downstream_cx_active"] == 2
    assert snapshot["http.ingress.ext_proc.foo.streams_started"] == 5
    assert snapshot["http.ingress.downstream_rq_time.count"] == 2
    assert snapshot["http.ingress.downstream_rq_time.sum"] == pytest.approx(6.0)
    assert snapshot["server.reloads"] == 1 and snapshot["server.worker_restarts"] == 2
    body, _ = supervisor.render_prometheus()
    assert b'extproc_ext_proc_streams_started_total{stat_prefix="foo"} 5.0' in body
    assert b"extproc_server_reloads_total 1.0" in body
    assert "P50" in supervisor.render_envoy_stats(re.compile("downstream_rq_time"))


def test_sum_workers_with_no_worker_answering_shows_the_server_stats_only() -> None:
    supervisor = Stats()
    supervisor.sum_workers(list)
    assert supervisor.snapshot() == {
        "server.reloads": 0,
        "server.reload_failures": 0,
        "server.worker_restarts": 0,
    }
