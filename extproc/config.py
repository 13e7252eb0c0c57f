"""extproc's configuration: immutable settings, and loading them from files and flags.

The filter configuration is Envoy's own ``ExternalProcessor`` message, read from YAML or JSON
with the proto3 JSON mapping, so what runs in Envoy can be pasted here. A file may hold that
message alone, wrapped as an Envoy ``http_filters`` entry (``typed_config`` with ``@type``), or
extproc's own file with ``ext_proc:`` beside ``listen``, ``upstream``, ``processor`` and
``clusters``. Every error is a :class:`ConfigError` naming the field or flag at fault.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.config.core.v3 import grpc_service_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from google.protobuf import json_format

from extproc import v3alpha
from extproc.addresses import Address, InheritedSocket
from extproc.channels import ChannelArgs, ChannelFlags, channel_setup, check_target
from extproc.core import attributes
from extproc.core.mutations import HeaderLimits
from extproc.core.settings import ExchangeSettings
from extproc.errors import ConfigError
from extproc.http_service import HttpTransport, http_transport
from extproc.options import FILE_SPECS, Options, Scope
from extproc.routes import RouteSpec, effective_filter, parse_routes

FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
ExternalProcessor = ext_proc_pb2.ExternalProcessor
# The keys of extproc's own file besides the options' (extproc.options).
_FILE_SECTIONS = frozenset({"ext_proc", "routes"})
_DEFAULT = Options()


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The upstream addresses, balanced round robin; one that fails to connect is ejected for
    ``ejection_time`` seconds times its ejections in a row, at most ``max_ejection_time``."""

    addresses: tuple[Address, ...]
    connect_timeout: float = _DEFAULT.upstream_connect_timeout
    max_idle: int = 64
    max_response_head_bytes: int = 64 * 1024
    ejection_time: float = _DEFAULT.upstream_ejection_time
    max_ejection_time: float = _DEFAULT.upstream_max_ejection_time

    @property
    def host(self) -> str:
        """The first address's host: the authority of requests that name none."""
        return self.addresses[0].host

    @property
    def port(self) -> int:
        return self.addresses[0].port


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """TLS on the listener: the server context, loaded from the PEM files at start-up."""

    context: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class ProcessorSettings:
    """Where the processor is and how to call it (ExternalProcessor.grpc_service)."""

    target: str
    stream_timeout: float | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    credentials: grpc.ChannelCredentials | None = None
    authority: str | None = None
    # gRPC channel arguments: LB policy, keepalive, google_grpc.channel_args (extproc.channels).
    channel_args: ChannelArgs = ()
    grpc_client: str = _DEFAULT.grpc_client  # direct or stub (extproc.io.processor)
    api: str = _DEFAULT.processor_api  # the Process method's version (extproc.apis)
    # Envoy's http_service: each event POSTed as JSON instead of a gRPC stream; then target
    # only names the processor in logs.
    http: HttpTransport | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; every wait of the proxy has one."""

    request_headers: float = _DEFAULT.header_read_timeout
    idle: float = _DEFAULT.idle_timeout
    client: float = _DEFAULT.client_timeout
    upstream: float = _DEFAULT.upstream_timeout
    drain: float = _DEFAULT.drain_timeout


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with ``prefix`` run with these settings."""

    prefix: bytes
    exchange: ExchangeSettings
    processor: ProcessorSettings


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """The ext_proc filter: its settings, its processor, and per-path routes. The proxy runs
    one in front of its upstream; the WSGI middleware runs one around its app."""

    exchange: ExchangeSettings
    processor: ProcessorSettings
    routes: tuple[Route, ...] = ()
    # ExternalProcessor.stat_prefix: the ext_proc stats are http.ingress.ext_proc.<it>.*
    stat_prefix: str = ""

    def for_path(self, path: bytes) -> tuple[ExchangeSettings, ProcessorSettings]:
        """The settings of the first route whose prefix starts ``path``, else the filter's."""
        for route in self.routes:
            if path.startswith(route.prefix):
                return route.exchange, route.processor
        return self.exchange, self.processor

    def processors(self) -> set[ProcessorSettings]:
        return {self.processor, *(route.processor for route in self.routes)}


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: Address | InheritedSocket
    upstream: UpstreamSettings
    filter: FilterConfig
    timeouts: Timeouts = field(default_factory=Timeouts)
    threads: int = _DEFAULT.threads
    max_request_head_bytes: int = _DEFAULT.max_request_headers_kb * 1024
    # Open client connections beyond which new ones are closed at once; 0: no limit (Envoy's).
    max_connections: int = _DEFAULT.max_connections
    forwarded_for: bool = _DEFAULT.xff
    # The admin listener (/stats, /metrics, /ready); None: none.
    admin: Address | None = None
    tls: ListenerTls | None = None


# Files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a --config file holds: the filter message, routes, and option values by file key
    (read by :meth:`extproc.options.Options.resolve`, which names a bad one's key)."""

    filter: ext_proc_pb2.ExternalProcessor
    routes: tuple[RouteSpec, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)


def load_file(path: Path) -> FileConfig:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("--config", f"cannot read {path}: {err.strerror}") from err
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError("--config", f"{path} is not valid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    return parse_file_data(data)


def parse_file_data(data: Mapping[str, Any]) -> FileConfig:
    """Any of the file's three shapes: the ExternalProcessor message, an Envoy http_filters
    entry, or extproc's own file with ``ext_proc:`` beside option keys and ``routes:``."""
    if "ext_proc" not in data:
        return FileConfig(filter=parse_filter(data, "ext_proc"))
    keys = FILE_SPECS.keys() | _FILE_SECTIONS
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; expected one of {sorted(keys)}")
    options = {k: v for k, v in data.items() if k in FILE_SPECS}
    for key, value in options.items():
        # Checked now, so a bad file is refused when read (and on reload, before anything
        # changes); the options are read from it again when the flags and environment are.
        FILE_SPECS[key].kind.parse(value, key)
    return FileConfig(
        filter=parse_filter(data["ext_proc"], "ext_proc"),
        routes=parse_routes(data["routes"]) if "routes" in data else (),
        options=options,
    )


def parse_filter(data: Any, where: str) -> ext_proc_pb2.ExternalProcessor:
    """An ExternalProcessor from its proto3 JSON form, bare or as an Envoy http_filters entry;
    a v3alpha one (extproc.v3alpha) is read as the v3 message it became."""
    if not isinstance(data, dict):
        raise ConfigError(where, "expected a mapping (the ExternalProcessor message)")
    if "typed_config" in data:
        data, where = data["typed_config"], f"{where}.typed_config"
        if not isinstance(data, dict):
            raise ConfigError(where, "expected a mapping")
    if "@type" in data:
        if data["@type"] not in (FILTER_TYPE, v3alpha.FILTER_TYPE):
            raise ConfigError(
                f"{where}.@type",
                f"expected {FILTER_TYPE} (or the v3alpha type), got {data['@type']!r}",
            )
        if data["@type"] == v3alpha.FILTER_TYPE:
            data = v3alpha.to_v3({k: v for k, v in data.items() if k != "@type"}, where)
        else:
            data = {k: v for k, v in data.items() if k != "@type"}
    elif v3alpha.looks_v3alpha(data):
        data = v3alpha.to_v3(data, where)
    message = ExternalProcessor()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as err:
        path, detail = _explain_parse_error(str(err))
        raise ConfigError(".".join([where, *path]), detail) from err
    return message


def _explain_parse_error(text: str) -> tuple[list[str], str]:
    """The field path and the gist of a protobuf ParseError."""
    text = text.splitlines()[0]
    unknown = re.search(r'has no field named "([^"]+)" at "([^"]+)"', text)
    if unknown:
        return [*unknown[2].split(".")[1:], unknown[1]], "unknown field"
    at = re.search(r" at ExternalProcessor\.([\w.]+?)\.*$", text)
    path = at[1].split(".") if at else re.findall(r"Failed to parse (\w+) field", text)
    detail = re.sub(r"^(Failed to parse \w+ field: )+", "", text)
    detail = re.sub(r"\s*at ExternalProcessor[\w.]*\.*$", "", detail)
    return path, detail


# Validation -------------------------------------------------------------------------------

# ExternalProcessor fields extproc implements; any other field that is set is refused, so no
# setting is ever silently ignored.
_SUPPORTED_FIELDS = frozenset(
    {
        "grpc_service",
        "http_service",
        "failure_mode_allow",
        "processing_mode",
        "message_timeout",
        "mutation_rules",
        "status_on_error",
        "disable_immediate_response",
        "allow_mode_override",
        "allowed_override_modes",
        "send_body_without_waiting_for_header_response",
        "stat_prefix",
        "forward_rules",
        "max_message_timeout",
        "request_attributes",
        "response_attributes",
        "observability_mode",
        "deferred_close_timeout",
        "metadata_options",
    }
)
_SUPPORTED_GRPC_FIELDS = frozenset({"envoy_grpc", "google_grpc", "timeout", "initial_metadata"})
_SUPPORTED_GOOGLE_GRPC_FIELDS = frozenset(
    {"target_uri", "stat_prefix", "channel_credentials", "channel_args"}
)
_MAX_DURATION = 3600.0


def check_supported(message: ext_proc_pb2.ExternalProcessor) -> None:
    """Refuse, naming the field, whatever extproc cannot honour."""
    for descriptor, _ in message.ListFields():
        if descriptor.name not in _SUPPORTED_FIELDS:
            raise ConfigError(f"ext_proc.{descriptor.name}", "is not supported by extproc")
    _check_mode(message.processing_mode, "ext_proc.processing_mode", filter_level=True)
    if message.HasField("http_service"):
        _check_http_service(message)
    for i, mode in enumerate(message.allowed_override_modes):
        _check_mode(mode, f"ext_proc.allowed_override_modes[{i}]", filter_level=False)
    _check_attributes_and_metadata(message)
    if message.HasField("message_timeout"):
        timeout = message.message_timeout.ToTimedelta().total_seconds()
        if not 0 <= timeout <= _MAX_DURATION:
            raise ConfigError("ext_proc.message_timeout", "must be between 0s and 3600s")
    service = message.grpc_service
    for descriptor, _ in service.ListFields():
        if descriptor.name not in _SUPPORTED_GRPC_FIELDS:
            raise ConfigError(
                f"ext_proc.grpc_service.{descriptor.name}", "is not supported by extproc"
            )
    for descriptor, _ in service.google_grpc.ListFields():
        if descriptor.name not in _SUPPORTED_GOOGLE_GRPC_FIELDS:
            raise ConfigError(
                f"ext_proc.grpc_service.google_grpc.{descriptor.name}",
                "is not supported by extproc",
            )


def _check_http_service(message: ext_proc_pb2.ExternalProcessor) -> None:
    """Envoy's rules for the HTTP transport, which carries header events only."""
    if message.HasField("grpc_service"):
        raise ConfigError(
            "ext_proc.http_service", "exactly one of grpc_service and http_service (as in Envoy)"
        )
    mode = message.processing_mode
    for direction in ("request", "response"):
        if getattr(mode, f"{direction}_body_mode") != mode.NONE:
            raise ConfigError(
                f"ext_proc.processing_mode.{direction}_body_mode",
                "must be NONE with http_service, which carries header events only (as in Envoy)",
            )
        if getattr(mode, f"{direction}_trailer_mode") == mode.SEND:
            raise ConfigError(
                f"ext_proc.processing_mode.{direction}_trailer_mode",
                "cannot be SEND with http_service, which carries header events only (as in Envoy)",
            )
    if message.observability_mode:
        raise ConfigError(
            "ext_proc.observability_mode",
            "is not supported with http_service: Envoy cancels each event's POST when the next"
            " one goes, so what the processor receives would depend on timing",
        )


def _check_attributes_and_metadata(message: ext_proc_pb2.ExternalProcessor) -> None:
    for field_name in ("request_attributes", "response_attributes"):
        for i, name in enumerate(getattr(message, field_name)):
            if name not in attributes.SUPPORTED:
                raise ConfigError(
                    f"ext_proc.{field_name}[{i}]",
                    f"{name!r} is not an attribute extproc provides; it knows "
                    + ", ".join(sorted(attributes.SUPPORTED)),
                )
    options = message.metadata_options
    for field_name in ("forwarding_namespaces", "receiving_namespaces"):
        if getattr(options, field_name).typed:
            raise ConfigError(
                f"ext_proc.metadata_options.{field_name}.typed",
                "extproc keeps untyped (Struct) dynamic metadata only",
            )
    if options.HasField("cluster_metadata_forwarding_namespaces"):
        raise ConfigError(
            "ext_proc.metadata_options.cluster_metadata_forwarding_namespaces",
            "extproc has no clusters with metadata",
        )


def _check_mode(mode: Any, where: str, filter_level: bool) -> None:
    for direction in ("request", "response"):
        body = getattr(mode, f"{direction}_body_mode")
        if body == mode.GRPC:
            raise ConfigError(
                f"{where}.{direction}_body_mode",
                "GRPC is for gRPC traffic, which HTTP/1.1 does not carry (Envoy would treat it"
                " as NONE); use NONE or another body mode",
            )
        trailer = getattr(mode, f"{direction}_trailer_mode")
        if filter_level and body == mode.FULL_DUPLEX_STREAMED and trailer != mode.SEND:
            raise ConfigError(
                f"{where}.{direction}_trailer_mode",
                "must be SEND when the body mode is FULL_DUPLEX_STREAMED (as in Envoy)",
            )


def _processor_settings(
    message: ext_proc_pb2.ExternalProcessor,
    clusters: Mapping[str, str],
    processor_flag: str | None,
    channel: ChannelFlags,
    grpc_client: str,
    api: str,
) -> ProcessorSettings:
    if message.HasField("http_service"):
        if processor_flag is not None:
            raise ConfigError(
                "--processor",
                "is a gRPC target, and this filter's processor is its http_service: drop"
                " --processor, or configure a grpc_service instead",
            )
        transport = http_transport(message.http_service, clusters, channel)
        return ProcessorSettings(f"{transport.host}:{transport.port}", http=transport)
    service = message.grpc_service
    metadata = tuple(
        (hv.key.lower(), hv.raw_value.decode() if hv.raw_value else hv.value)
        for hv in service.initial_metadata
    )
    timeout = service.timeout.ToTimedelta().total_seconds() if service.HasField("timeout") else None
    authority: str | None = None
    google: grpc_service_pb2.GrpcService.GoogleGrpc | None = None
    kind = service.WhichOneof("target_specifier")
    where = "--processor"
    if processor_flag is not None:
        target = processor_flag
    elif kind == "google_grpc":
        google = service.google_grpc
        target = google.target_uri
        where = "ext_proc.grpc_service.google_grpc.target_uri"
    elif kind == "envoy_grpc":
        name = service.envoy_grpc.cluster_name
        if name not in clusters:
            raise ConfigError(
                "ext_proc.grpc_service.envoy_grpc.cluster_name",
                f"cluster {name!r} is not defined; add --cluster {name}=HOST:PORT or a"
                " clusters: entry to the config file",
            )
        target = clusters[name]
        # Envoy sends the cluster name as :authority unless told otherwise.
        authority = service.envoy_grpc.authority or name
    else:
        raise ConfigError("--processor", "no processor: give --processor or a grpc_service")
    if not target:
        raise ConfigError("ext_proc.grpc_service.google_grpc.target_uri", "is empty")
    check_target(target, where)
    setup = channel_setup(target, google, authority, channel)
    return ProcessorSettings(
        target,
        timeout,
        metadata,
        setup.credentials,
        setup.authority,
        setup.channel_args,
        grpc_client,
        api,
    )


# Building ---------------------------------------------------------------------------------


def apply_options(
    message: ext_proc_pb2.ExternalProcessor, options: Options
) -> ext_proc_pb2.ExternalProcessor:
    """A copy of ``message`` with the filter fields that options set (flags, environment)."""
    merged = ExternalProcessor()
    merged.CopyFrom(message)
    if options.failure_mode_allow is not None:
        merged.failure_mode_allow = options.failure_mode_allow
    if options.message_timeout is not None:
        merged.message_timeout.FromNanoseconds(round(options.message_timeout * 1e9))
    if options.status_on_error is not None:
        merged.status_on_error.code = options.status_on_error
    mode = merged.processing_mode
    for name in (
        "request_header_mode",
        "response_header_mode",
        "request_trailer_mode",
        "response_trailer_mode",
    ):
        value = getattr(options, name)
        if value is not None:
            setattr(mode, name, mode.HeaderSendMode.Value(value.upper()))
    for name in ("request_body_mode", "response_body_mode"):
        value = getattr(options, name)
        if value is not None:
            setattr(mode, name, mode.BodySendMode.Value(value.upper()))
    return merged


def resolve_options(
    file: FileConfig | None,
    given: Mapping[str, object],
    environ: Mapping[str, str] | None,
    scopes: frozenset[Scope] = frozenset(Scope),
) -> Options:
    """The options from ``given`` (flags or keyword arguments), the environment (``os.environ``
    unless given), and the file."""
    return Options.resolve(
        given, file.options if file else {}, os.environ if environ is None else environ, scopes
    )


def build_filter(file: FileConfig | None, options: Options) -> FilterConfig:
    """The filter part: what both the proxy and the WSGI middleware run."""
    file = file or FileConfig(filter=ExternalProcessor())
    message = apply_options(file.filter, options)
    check_supported(message)
    channel = ChannelFlags(
        ca=options.processor_ca,
        cert=options.processor_cert,
        key=options.processor_key,
        authority=options.processor_authority,
        lb_policy=options.processor_lb_policy,
        keepalive_time=options.processor_keepalive_time,
        keepalive_timeout=options.processor_keepalive_timeout,
    )
    limits = HeaderLimits(
        max_count=options.max_request_headers_count,
        max_bytes=options.max_request_headers_kb * 1024,
    )
    metadata_headers = tuple((ns, h.lower().encode()) for ns, h in options.metadata_header.items())

    def exchange_settings(filter_message: ext_proc_pb2.ExternalProcessor) -> ExchangeSettings:
        return ExchangeSettings.from_proto(
            filter_message,
            limits=limits,
            honor_append_action=options.honor_append_action,
            buffer_limit=options.buffer_limit_bytes,
            metadata_headers=metadata_headers,
        )

    def processor_settings(filter_message: ext_proc_pb2.ExternalProcessor) -> ProcessorSettings:
        return _processor_settings(
            filter_message,
            options.cluster,
            options.processor,
            channel,
            options.grpc_client,
            options.processor_api,
        )

    routes = []
    for i, spec in enumerate(file.routes):
        route_filter = effective_filter(message, spec, f"routes[{i}]")
        check_supported(route_filter)
        routes.append(
            Route(
                spec.prefix.encode(),
                exchange_settings(route_filter),
                processor_settings(route_filter),
            )
        )
    return FilterConfig(
        exchange=exchange_settings(message),
        processor=processor_settings(message),
        routes=tuple(routes),
        stat_prefix=message.stat_prefix,
    )


def build_config(
    file: FileConfig | None,
    given: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyConfig:
    """The whole configuration: ``given`` options (by name: flags or keyword arguments) over
    the environment over the file over the defaults."""
    options = resolve_options(file, given or {}, environ)
    if options.listen is None:
        raise ConfigError("--listen", "is required (or listen: in the config file)")
    if not options.upstream:
        raise ConfigError("--upstream", "is required (or upstream: in the config file)")
    ejection, max_ejection = options.upstream_ejection_time, options.upstream_max_ejection_time
    if not 0 < ejection <= max_ejection:
        raise ConfigError(
            "--upstream-ejection-time", "must be above 0 and at most --upstream-max-ejection-time"
        )
    return ProxyConfig(
        listen=options.listen,
        upstream=UpstreamSettings(
            options.upstream,
            connect_timeout=options.upstream_connect_timeout,
            ejection_time=ejection,
            max_ejection_time=max_ejection,
        ),
        filter=build_filter(file, options),
        timeouts=Timeouts(
            request_headers=options.header_read_timeout,
            idle=options.idle_timeout,
            client=options.client_timeout,
            upstream=options.upstream_timeout,
            drain=options.drain_timeout,
        ),
        threads=options.threads,
        max_connections=options.max_connections,
        max_request_head_bytes=options.max_request_headers_kb * 1024,
        forwarded_for=options.xff,
        admin=options.admin,
        tls=_listener_tls(options),
    )


# What a running proxy has bound or sized at start; a reload that changes one is refused.
_FIXED_AT_START = (
    ("listen", "listen"),
    ("admin", "--admin"),
    ("threads", "--threads"),
)


def check_reloadable(running: ProxyConfig, new: ProxyConfig) -> None:
    """Refuse, naming the field, a new configuration that only a restart could apply."""
    fixed = [(getattr(running, a), getattr(new, a), where) for a, where in _FIXED_AT_START]
    fixed.append((running.filter.stat_prefix, new.filter.stat_prefix, "ext_proc.stat_prefix"))
    for before, after, where in fixed:
        if before != after:
            raise ConfigError(
                where,
                f"cannot change on reload ({before!s} -> {after!s}); restart extproc to apply it",
            )


def _listener_tls(flags: Options) -> ListenerTls | None:
    if flags.tls_cert is None and flags.tls_key is None:
        if flags.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca", "needs --tls-cert and --tls-key")
        return None
    if flags.tls_cert is None or flags.tls_key is None:
        raise ConfigError("--tls-cert", "--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(flags.tls_cert, flags.tls_key)
    except (OSError, ssl.SSLError) as err:
        detail = f"cannot load {flags.tls_cert} with its key: {err}"
        raise ConfigError("--tls-cert", detail) from err
    if flags.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=flags.tls_client_ca)
        except (OSError, ssl.SSLError) as err:
            detail = f"cannot load {flags.tls_client_ca}: {err}"
            raise ConfigError("--tls-client-ca", detail) from err
    return ListenerTls(context)
