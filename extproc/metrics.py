"""extproc's stats: Envoy's ext_proc counters and a few proxy stats, in a prometheus-client
registry, rendered as Envoy's ``/stats`` (text and JSON) and as Prometheus text.

This module owns the stat names and what moves them; it does no I/O (``extproc.io.admin``
serves what it renders) and imports nothing from ``extproc.io``.

Names. ``/stats`` shows every stat under the name Envoy gives it, so extproc and Envoy read
the same. extproc has no HTTP connection manager of its own to configure, so the HCM stat
prefix is always ``ingress``; the one upstream is Envoy cluster ``upstream``::

    http.ingress.ext_proc.streams_started       ExternalProcessor.stat_prefix empty
    http.ingress.ext_proc.foo.streams_started   stat_prefix "foo"
    http.ingress.downstream_rq_2xx              ... and the other proxy stats below
    cluster.upstream.upstream_rq_time           histograms in milliseconds, as Envoy's
    server.reloads                              extproc's own process stats (no Envoy twin)

``/metrics`` shows the same values under ``extproc_`` names. As Envoy's own Prometheus output
does with tags, what varies inside an Envoy name becomes a label (``stat_prefix``,
``response_code_class``); prometheus-client adds ``_total`` to counters, and times are in
seconds there.

Workers. With ``--workers N`` each worker process counts in a registry of its own and the
supervisor serves the admin listener: :meth:`Stats.sum_workers` makes it show the sum of the
workers' request stats (fetched as Prometheus text when asked) beside its own ``server.*``.

Cost. A request ends in one :func:`record_exchange`, which reads the request's
:class:`~extproc.core.record.RequestRecord`: a handful of increments on metric children bound
when the registry is built (no label lookups), and none for counters that did not move.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from extproc.core.record import Ending, RequestRecord

HCM_STAT_PREFIX = "ingress"
# The process's own stats: the supervisor's when there are workers, never summed.
_SERVER = "extproc_server_"
UPSTREAM_CLUSTER = "upstream"
# Envoy's default histogram buckets (milliseconds), in seconds for Prometheus.
# fmt: off
_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
               300000, 600000, 1800000, 3600000)
# fmt: on
BUCKETS = tuple(ms / 1000 for ms in _BUCKETS_MS)
# The percentiles Envoy's /stats reports for each histogram.
QUANTILES = (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100)

_M = TypeVar("_M", Counter, Gauge, Histogram)
_V = TypeVar("_V")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class ExtProcCounters:
    """Envoy's ext_proc counters (docs/protocol.md, Stats and the admin listener), one field per
    counter, named as in Envoy."""

    streams_started: Counter = field(metadata=_help("Processor streams opened"))
    stream_msgs_sent: Counter = field(metadata=_help("Messages sent to the processor"))
    stream_msgs_received: Counter = field(
        metadata=_help("Processor replies handled, including those that failed the request")
    )
    spurious_msgs_received: Counter = field(
        metadata=_help("Processor replies out of order, of an unknown kind, or not allowed")
    )
    streams_closed: Counter = field(
        metadata=_help("Streams closed by the proxy, or ended by the processor with OK")
    )
    streams_failed: Counter = field(metadata=_help("Streams that ended with a non-OK status"))
    failure_mode_allowed: Counter = field(
        metadata=_help("Errors ignored because of failure_mode_allow")
    )
    message_timeouts: Counter = field(metadata=_help("Replies not received in message_timeout"))
    rejected_header_mutations: Counter = field(
        metadata=_help("Header mutations refused by the mutation rules or limits")
    )
    override_message_timeout_received: Counter = field(
        metadata=_help("override_message_timeout accepted")
    )
    override_message_timeout_ignored: Counter = field(
        metadata=_help("override_message_timeout refused")
    )
    clear_route_cache_ignored: Counter = field(
        metadata=_help("clear_route_cache set on a reply without header mutation")
    )
    clear_route_cache_disabled: Counter = field(
        metadata=_help("clear_route_cache set while route cache clearing is disabled")
    )
    clear_route_cache_upstream_ignored: Counter = field(
        metadata=_help("clear_route_cache set in an upstream filter")
    )
    http_not_ok_resp_received: Counter = field(
        metadata=_help("HTTP processor service errors (http_service)")
    )
    immediate_responses_sent: Counter = field(
        metadata=_help("Local replies by ext_proc: immediate responses and error replies")
    )
    server_half_closed: Counter = field(
        metadata=_help("Streams ended by the processor while in use")
    )


EXT_PROC_COUNTERS = tuple(f.name for f in fields(ExtProcCounters))


@dataclass(frozen=True, slots=True)
class UpstreamHostStats:
    """One upstream address's connection and ejection stats. /stats shows each as Envoy's
    cluster-wide stat, summed over the addresses; /metrics keeps an ``address`` label."""

    cx_total: Counter
    cx_connect_fail: Counter
    ejections_enforced: Counter
    ejections_active: Gauge


@dataclass(slots=True)
class _HistogramValues:
    buckets: list[tuple[float, float]]  # (upper bound in seconds, cumulative count)
    count: float = 0.0
    sum: float = 0.0


class Stats:
    """One proxy's stats, in a registry of its own: several proxies may share a process
    (tests, embedding), and prometheus-client's default registry is process-wide."""

    def __init__(self, stat_prefix: str = "") -> None:
        self.stat_prefix = stat_prefix
        self.registry = CollectorRegistry()
        # (Prometheus sample name, labels) -> Envoy name, for rendering /stats from the registry.
        self._envoy_names: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        hcm = f"http.{HCM_STAT_PREFIX}."
        scope = f"{hcm}ext_proc." + (f"{stat_prefix}." if stat_prefix else "")
        prefix_label = {"stat_prefix": stat_prefix}
        self.ext_proc = ExtProcCounters(
            **{
                f.name: self._counter(
                    f"ext_proc_{f.name}", scope + f.name, f.metadata["help"], prefix_label
                )
                for f in fields(ExtProcCounters)
            }
        )
        self.downstream_cx_total = self._counter(
            "downstream_cx", hcm + "downstream_cx_total", "Client connections accepted"
        )
        self.downstream_cx_active = self._gauge(
            "downstream_cx_active", hcm + "downstream_cx_active", "Client connections open"
        )
        self.downstream_cx_overflow = self._counter(
            "downstream_cx_overflow",
            f"listener.{HCM_STAT_PREFIX}.downstream_cx_overflow",
            "Client connections closed at once: --max-connections were open",
        )
        self.downstream_rq_total = self._counter(
            "downstream_rq", hcm + "downstream_rq_total", "Requests received"
        )
        # Indexed by status // 100; classes 1 to 5 exist, as in Envoy (other codes count none).
        classes = Counter(
            "extproc_downstream_rq_xx",
            "Responses by status class",
            ["response_code_class"],
            registry=self.registry,
        )
        self._rq_class = tuple(
            self._bind(
                classes,
                "extproc_downstream_rq_xx_total",
                f"{hcm}downstream_rq_{n}xx",
                {"response_code_class": str(n)},
            )
            for n in range(1, 6)
        )
        self.downstream_rq_too_large = self._counter(
            "downstream_rq_too_large",
            hcm + "downstream_rq_too_large",
            "Requests answered 413: a buffered body over the buffer limit",
        )
        self.rs_too_large = self._counter(
            "rs_too_large",
            hcm + "rs_too_large",
            "Responses answered 500: a buffered body over the buffer limit",
        )
        # Envoy's cluster stats for what goes wrong with the upstream.
        cluster = f"cluster.{UPSTREAM_CLUSTER}."
        self.upstream_cx_destroy_remote_with_active_rq = self._counter(
            "upstream_cx_destroy_remote_with_active_rq",
            cluster + "upstream_cx_destroy_remote_with_active_rq",
            "Upstream connections reset or closed by the upstream during a request",
        )
        self.upstream_cx_protocol_error = self._counter(
            "upstream_cx_protocol_error",
            cluster + "upstream_cx_protocol_error",
            "Upstream responses that broke HTTP/1.1 (invalid, or more body than announced)",
        )
        self.upstream_rq_timeout = self._counter(
            "upstream_rq_timeout",
            cluster + "upstream_rq_timeout",
            "Upstream responses not received within the upstream timeout",
        )
        self.downstream_rq_time = self._histogram(
            "downstream_rq_time", hcm + "downstream_rq_time", "Request durations"
        )
        self.upstream_rq_time = self._histogram(
            "upstream_rq_time",
            f"cluster.{UPSTREAM_CLUSTER}.upstream_rq_time",
            "Upstream times until the response head",
        )
        label = ["address"]
        reg = self.registry
        self._upstream_cx = Counter(
            "extproc_upstream_cx", "Upstream connections opened", label, registry=reg
        )
        self._upstream_cx_connect_fail = Counter(
            "extproc_upstream_cx_connect_fail",
            "Upstream connections refused or timed out",
            label,
            registry=reg,
        )
        self._upstream_ejections = Counter(
            "extproc_upstream_ejections_enforced",
            "Upstream addresses ejected after a failed connection",
            label,
            registry=reg,
        )
        self._upstream_ejected = Gauge(
            "extproc_upstream_ejections_active",
            "Upstream addresses ejected now",
            label,
            registry=reg,
        )
        # Envoy has no stat for this (it logs per-call latencies); extproc's own name.
        self.processor_time = self._histogram(
            "ext_proc_processor_time",
            scope + "processor_time",
            "Time each request waited for the processor",
            prefix_label,
        )
        self.reloads = self._counter(
            "server_reloads", "server.reloads", "Configuration reloads applied (SIGHUP)"
        )
        self.reload_failures = self._counter(
            "server_reload_failures",
            "server.reload_failures",
            "Configuration reloads refused; the running configuration was kept",
        )
        self.worker_restarts = self._counter(
            "server_worker_restarts",
            "server.worker_restarts",
            "Worker processes that died while serving, each replaced (--workers)",
        )
        # What the renderers read: this registry, or the workers' sum (sum_workers).
        self._view: CollectorRegistry = self.registry

    # Building -----------------------------------------------------------------------------

    def _counter(
        self, name: str, envoy: str, doc: str, labels: dict[str, str] | None = None
    ) -> Counter:
        family = Counter(f"extproc_{name}", doc, sorted(labels or ()), registry=self.registry)
        return self._bind(family, f"extproc_{name}_total", envoy, labels)

    def _gauge(self, name: str, envoy: str, doc: str) -> Gauge:
        family = Gauge(f"extproc_{name}", doc, registry=self.registry)
        return self._bind(family, f"extproc_{name}", envoy, None)

    def _histogram(
        self, name: str, envoy: str, doc: str, labels: dict[str, str] | None = None
    ) -> Histogram:
        family = Histogram(
            f"extproc_{name}_seconds",
            f"{doc} (seconds)",
            sorted(labels or ()),
            registry=self.registry,
            buckets=BUCKETS,
        )
        return self._bind(family, f"extproc_{name}_seconds", envoy, labels)

    def _bind(self, family: _M, sample: str, envoy: str, labels: dict[str, str] | None) -> _M:
        """The child of ``family`` for ``labels``, bound once; /stats shows ``sample`` (for a
        histogram, its family name) as ``envoy``."""
        self._envoy_names[(sample, _key(labels))] = envoy
        return family.labels(**labels) if labels else family

    def upstream_host(self, address: str) -> UpstreamHostStats:
        """The stats of one upstream address, bound once (the pool keeps them)."""
        labels = {"address": address}
        cluster = f"cluster.{UPSTREAM_CLUSTER}."
        return UpstreamHostStats(
            cx_total=self._bind(
                self._upstream_cx,
                "extproc_upstream_cx_total",
                cluster + "upstream_cx_total",
                labels,
            ),
            cx_connect_fail=self._bind(
                self._upstream_cx_connect_fail,
                "extproc_upstream_cx_connect_fail_total",
                cluster + "upstream_cx_connect_fail",
                labels,
            ),
            ejections_enforced=self._bind(
                self._upstream_ejections,
                "extproc_upstream_ejections_enforced_total",
                cluster + "outlier_detection.ejections_enforced_total",
                labels,
            ),
            ejections_active=self._bind(
                self._upstream_ejected,
                "extproc_upstream_ejections_active",
                cluster + "outlier_detection.ejections_active",
                labels,
            ),
        )

    # Recording ----------------------------------------------------------------------------

    def connection_opened(self) -> None:
        self.downstream_cx_total.inc()
        self.downstream_cx_active.inc()

    def connection_closed(self) -> None:
        self.downstream_cx_active.dec()

    def record_response(self, status: int) -> None:
        """A request ended; ``status`` is what the client was sent (0: nothing)."""
        self.downstream_rq_total.inc()
        if 100 <= status < 600:
            self._rq_class[status // 100 - 1].inc()

    # Reading ------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """This registry alone as Prometheus text: what a worker hands its supervisor."""
        return generate_latest(self.registry)

    def sum_workers(self, collect: Callable[[], Iterable[str]]) -> None:
        """From now on, show the request stats as the sum of what ``collect`` returns (one
        :meth:`exposition` per worker) and the ``server.*`` stats from this registry."""
        self._view = CollectorRegistry(auto_describe=False)
        self._view.register(_WorkerSum(self.registry, collect))

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge by its Envoy name, plus ``<histogram>.count`` and
        ``<histogram>.sum`` (milliseconds) for each histogram. For tests."""
        scalars, histograms = self._read()
        for name, values in histograms.items():
            scalars[f"{name}.count"] = values.count
            scalars[f"{name}.sum"] = values.sum * 1000
        return scalars

    def render_envoy_stats(self, name_filter: re.Pattern[str] | None = None) -> str:
        """Envoy's ``/stats`` text: ``name: value`` lines, counters and gauges sorted by name,
        then the histograms' percentiles (``P50(interval,cumulative)``, milliseconds).

        extproc keeps no flush interval, so the interval column is ``nan``, as Envoy prints
        for an interval without samples. ``name_filter`` is ``/stats?filter=``.
        """
        scalars, histograms = self._read()
        lines = [f"{name}: {_number(value)}" for name, value in _matching(scalars, name_filter)]
        for name, values in _matching(histograms, name_filter):
            lines.append(f"{name}: {_summary(values)}")
        return "".join(line + "\n" for line in lines)

    def render_envoy_json(self, name_filter: re.Pattern[str] | None = None) -> str:
        """Envoy's ``/stats?format=json``: ``{"stats": [{"name": ..., "value": ...}, ...]}``,
        histograms last in one ``{"histograms": ...}`` entry."""
        scalars, histograms = self._read()
        stats: list[object] = [
            {"name": name, "value": _json_number(value)}
            for name, value in _matching(scalars, name_filter)
        ]
        computed = [
            {
                "name": name,
                "values": [
                    {"cumulative": None if math.isnan(v) else v, "interval": None}
                    for v in _percentiles(values)
                ],
            }
            for name, values in _matching(histograms, name_filter)
        ]
        if computed:
            stats.append(
                {"histograms": {"supported_quantiles": QUANTILES, "computed_quantiles": computed}}
            )
        return json.dumps({"stats": stats})

    def render_prometheus(self, accept: str = "") -> tuple[bytes, str]:
        """Prometheus text (OpenMetrics when ``accept`` asks for it) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self._view), content_type

    def _read(self) -> tuple[dict[str, float], dict[str, _HistogramValues]]:
        """The registry's current values by Envoy name: counters and gauges, histograms."""
        scalars: dict[str, float] = {}
        histograms: dict[str, _HistogramValues] = {}
        for family in self._view.collect():
            for sample in family.samples:
                labels = dict(sample.labels)
                if family.type == "histogram":
                    bound = labels.pop("le", None)
                    envoy = self._envoy_names[(family.name, _key(labels))]
                    values = histograms.setdefault(envoy, _HistogramValues([]))
                    if bound is not None:
                        values.buckets.append((float(bound), sample.value))
                    elif sample.name.endswith("_count"):
                        values.count = sample.value
                    elif sample.name.endswith("_sum"):
                        values.sum = sample.value
                elif (name := self._envoy_names.get((sample.name, _key(labels)))) is not None:
                    # Not the _created samples; per-address upstream stats add up.
                    scalars[name] = scalars.get(name, 0.0) + sample.value
        return scalars, histograms


class _WorkerSum(Collector):
    """Counters, gauges and histogram buckets added up across workers, sample by sample;
    ``_created`` is the earliest. The server stats come from the supervisor's registry."""

    def __init__(self, own: CollectorRegistry, collect: Callable[[], Iterable[str]]) -> None:
        self._own = own
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from (f for f in self._own.collect() if f.name.startswith(_SERVER))
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self._collect():
            for family in text_string_to_metric_families(text):
                if family.name.startswith(_SERVER):
                    continue
                families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                summed = values.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, _key(sample.labels))
                    if key not in summed:
                        summed[key] = sample.value
                    elif sample.name.endswith("_created"):
                        summed[key] = min(summed[key], sample.value)
                    else:
                        summed[key] += sample.value
        for name, metric in families.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def _key(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _matching(values: dict[str, _V], pattern: re.Pattern[str] | None) -> Iterator[tuple[str, _V]]:
    # Envoy sorts by name, byte for byte; these names are ASCII, so str order is the same.
    for name in sorted(values):
        if pattern is None or pattern.search(name):
            yield name, values[name]


def _number(value: float) -> str:
    """As Envoy prints a double: the shortest form, no trailing ``.0``."""
    if math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value)


def _json_number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _summary(values: _HistogramValues) -> str:
    if not values.count:
        return "No recorded values"
    return " ".join(
        f"P{q:g}(nan,{_number(v)})" for q, v in zip(QUANTILES, _percentiles(values), strict=True)
    )


def _percentiles(values: _HistogramValues) -> list[float]:
    """Envoy's percentiles in milliseconds, estimated from the buckets (NaN with no samples)."""
    if not values.count:
        return [math.nan] * len(QUANTILES)
    return [round(_quantile(values.buckets, q / 100) * 1000, 6) for q in QUANTILES]


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in; the
    open-ended last bucket answers with its lower bound."""
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


# Requests -----------------------------------------------------------------------------------


def record_exchange(stats: Stats, record: RequestRecord) -> None:
    """Count one finished request."""
    if record.stream_started or record.ending is not None:
        _record_ext_proc(stats.ext_proc, record)  # (all zero otherwise)
    if record.stream_started:
        stats.processor_time.observe(record.processor_time)
    stats.record_response(record.status)
    stats.downstream_rq_time.observe(record.duration)
    if record.upstream_answered:
        stats.upstream_rq_time.observe(record.upstream_time)
    if record.request_too_large:
        stats.downstream_rq_too_large.inc()
    if record.ending is Ending.RESPONSE_TOO_LARGE:
        stats.rs_too_large.inc()


def _record_ext_proc(c: ExtProcCounters, record: RequestRecord) -> None:
    """Envoy's accounting: a processor that ends the stream OK counts as
    closed and half-closed; with an error it counts as failed and half-closed, and when that
    error fails open Envoy then treats it as an OK close, counting closed and half-closed
    again. A stream the processor did not end is closed by the proxy."""
    # The HTTP transport has no stream: Envoy counts its messages, not streams.
    started = record.stream_started and not record.over_http
    failed = record.stream_error is not None
    half_closed = record.ending in (Ending.PROCESSOR_CLOSED, Ending.STREAM_ERROR)
    closed_by_proxy = started and not half_closed
    ended_ok = half_closed and not failed
    error_failed_open = half_closed and failed and record.failed_open
    # Envoy's core answers a response body over the limit, not ext_proc.
    immediate = record.answered_locally and record.ending is not Ending.RESPONSE_TOO_LARGE
    for counter, amount in (
        (c.streams_started, int(started)),
        (c.stream_msgs_sent, record.messages_sent),
        (c.stream_msgs_received, record.messages_received),
        (c.spurious_msgs_received, record.spurious),
        (c.streams_closed, closed_by_proxy + ended_ok + error_failed_open),
        (c.streams_failed, int(failed)),
        (c.failure_mode_allowed, int(record.failed_open)),
        (c.message_timeouts, int(record.ending is Ending.MESSAGE_TIMEOUT)),
        (c.rejected_header_mutations, record.rejected_mutations),
        (c.override_message_timeout_received, record.override_timeout_received),
        (c.override_message_timeout_ignored, record.override_timeout_ignored),
        (c.immediate_responses_sent, int(immediate)),
        (c.server_half_closed, half_closed + error_failed_open),
        (c.http_not_ok_resp_received, int(record.ending is Ending.HTTP_ERROR)),
    ):
        if amount:
            counter.inc(amount)
