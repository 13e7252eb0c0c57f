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

from extproc.channels import ChannelArgs, ChannelFlags, channel_setup, check_target
from extproc.core import attributes
from extproc.core.mutations import HeaderLimits, name_is_valid
from extproc.core.settings import DEFAULT_BUFFER_LIMIT, ExchangeSettings
from extproc.errors import ConfigError
from extproc.routes import RouteSpec, effective_filter, parse_routes

FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
ExternalProcessor = ext_proc_pb2.ExternalProcessor
DEFAULT_THREADS = 32
_FILE_KEYS = frozenset(
    {
        "listen",
        "upstream",
        "processor",
        "grpc_client",
        "clusters",
        "ext_proc",
        "routes",
        "metadata_headers",
    }
)
# How a Process stream is driven (extproc.io.processor): from the worker's thread, or through
# grpc's synchronous stub fed by a queue.
GRPC_CLIENTS = ("direct", "stub")
DEFAULT_GRPC_CLIENT = "direct"
GRPC_CLIENT_ENV = "EXTPROC_GRPC_CLIENT"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket this process was handed open (``--listen fd://N``, systemd's
    LISTEN_FDS) rather than one it binds."""

    fd: int

    def __str__(self) -> str:
        return f"fd://{self.fd}"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The upstream addresses, balanced round robin; one that fails to connect is ejected for
    ``ejection_time`` seconds times its ejections in a row, at most ``max_ejection_time``."""

    addresses: tuple[Address, ...]
    connect_timeout: float = 5.0
    max_idle: int = 64
    max_response_head_bytes: int = 64 * 1024
    ejection_time: float = 30.0
    max_ejection_time: float = 300.0

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
    grpc_client: str = DEFAULT_GRPC_CLIENT  # one of GRPC_CLIENTS


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; every wait of the proxy has one."""

    request_headers: float = 10.0
    idle: float = 60.0
    client: float = 60.0
    upstream: float = 15.0
    drain: float = 30.0


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with ``prefix`` run with these settings."""

    prefix: bytes
    exchange: ExchangeSettings
    processor: ProcessorSettings


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: Address | InheritedSocket
    upstream: UpstreamSettings
    processor: ProcessorSettings
    exchange: ExchangeSettings = field(default_factory=ExchangeSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    threads: int = DEFAULT_THREADS
    max_request_head_bytes: int = 60 * 1024
    # Open client connections beyond which new ones are closed at once; 0: no limit (Envoy's).
    max_connections: int = 0
    forwarded_for: bool = True
    # The admin listener (/stats, /metrics, /ready); None: none.
    admin: Address | None = None
    # ExternalProcessor.stat_prefix: the ext_proc stats are http.ingress.ext_proc.<it>.*
    stat_prefix: str = ""
    routes: tuple[Route, ...] = ()
    tls: ListenerTls | None = None

    def for_path(self, path: bytes) -> tuple[ExchangeSettings, ProcessorSettings]:
        """The settings of the first route whose prefix starts ``path``, else the filter's."""
        for route in self.routes:
            if path.startswith(route.prefix):
                return route.exchange, route.processor
        return self.exchange, self.processor

    def processors(self) -> set[ProcessorSettings]:
        return {self.processor, *(route.processor for route in self.routes)}


def parse_address(value: str, option: str, default_host: str = "0.0.0.0") -> Address:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port``."""
    match = re.fullmatch(r"(\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})", value)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(option, f"expected HOST:PORT, :PORT or [V6]:PORT, got {value!r}")
    return Address(match["v6"] or match["host"] or default_host, int(match["port"]))


def parse_listen(value: str, option: str) -> Address | InheritedSocket:
    """:func:`parse_address`'s forms, or ``fd://N``: serve on inherited descriptor N."""
    if value.startswith("fd://"):
        fd = value[len("fd://") :]
        if not fd.isdigit():
            raise ConfigError(option, f"expected fd://N with N a descriptor number, got {value!r}")
        return InheritedSocket(int(fd))
    return parse_address(value, option)


def parse_duration(value: str, option: str) -> float:
    """Seconds from ``200ms``, ``1.5s`` or a bare number of seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)(ms|s)?", value.strip())
    if not match:
        raise ConfigError(option, f"expected a duration such as 200ms or 1.5s, got {value!r}")
    number = float(match[1])
    return number / 1000 if match[2] == "ms" else number


# Files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a --config file holds."""

    filter: ext_proc_pb2.ExternalProcessor
    clusters: Mapping[str, str] = field(default_factory=dict)
    listen: str | None = None
    upstream: str | None = None
    processor: str | None = None
    grpc_client: str | None = None
    routes: tuple[RouteSpec, ...] = ()
    metadata_headers: Mapping[str, str] = field(default_factory=dict)


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


def parse_file_data(data: dict[str, Any]) -> FileConfig:
    if "ext_proc" not in data:
        return FileConfig(filter=parse_filter(data, "ext_proc"))
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; expected one of {sorted(_FILE_KEYS)}")
    clusters = data.get("clusters") or {}
    if not isinstance(clusters, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in clusters.items()
    ):
        raise ConfigError("clusters", "expected a mapping of cluster name to a gRPC target")
    for name, target in clusters.items():
        check_target(target, f"clusters.{name}")
    strings = {}
    for key in ("listen", "upstream", "processor", "grpc_client"):
        value = data.get(key)
        if key == "upstream" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if value is not None and not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__}")
        strings[key] = value
    headers = data.get("metadata_headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and name_is_valid(v.lower().encode())
        for k, v in headers.items()
    ):
        raise ConfigError("metadata_headers", "expected a mapping of namespace to header name")
    if strings["grpc_client"] is not None:
        check_grpc_client(strings["grpc_client"], "grpc_client")
    return FileConfig(
        filter=parse_filter(data["ext_proc"], "ext_proc"),
        clusters=clusters,
        routes=parse_routes(data["routes"]) if "routes" in data else (),
        metadata_headers=headers,
        **strings,
    )


def _grpc_client(flags: Overrides, file: FileConfig) -> str:
    """--grpc-client, else the file's grpc_client, else $EXTPROC_GRPC_CLIENT (a deployment's
    or a test run's default for every proxy it starts), else direct."""
    if flags.grpc_client is not None:
        return check_grpc_client(flags.grpc_client, "--grpc-client")
    if file.grpc_client is not None:
        return file.grpc_client
    env = os.environ.get(GRPC_CLIENT_ENV)
    return check_grpc_client(env, GRPC_CLIENT_ENV) if env else DEFAULT_GRPC_CLIENT


def check_grpc_client(value: str, where: str) -> str:
    if value not in GRPC_CLIENTS:
        raise ConfigError(where, f"{value!r} is not one of {', '.join(GRPC_CLIENTS)}")
    return value


def parse_filter(data: Any, where: str) -> ext_proc_pb2.ExternalProcessor:
    """An ExternalProcessor from its proto3 JSON form, bare or as an Envoy http_filters entry."""
    if not isinstance(data, dict):
        raise ConfigError(where, "expected a mapping (the ExternalProcessor message)")
    if "typed_config" in data:
        data, where = data["typed_config"], f"{where}.typed_config"
        if not isinstance(data, dict):
            raise ConfigError(where, "expected a mapping")
    if "@type" in data:
        if data["@type"] != FILTER_TYPE:
            raise ConfigError(f"{where}.@type", f"expected {FILTER_TYPE}, got {data['@type']!r}")
        data = {k: v for k, v in data.items() if k != "@type"}
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
    service: grpc_service_pb2.GrpcService,
    clusters: Mapping[str, str],
    processor_flag: str | None,
    channel: ChannelFlags,
    grpc_client: str,
) -> ProcessorSettings:
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
    )


# Building ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line values; None means "not given", so the file (or the default) applies."""

    listen: str | None = None
    upstream: str | None = None
    processor: str | None = None
    processor_channel: ChannelFlags = field(default_factory=ChannelFlags)
    grpc_client: str | None = None
    clusters: Mapping[str, str] = field(default_factory=dict)
    metadata_headers: Mapping[str, str] = field(default_factory=dict)
    failure_mode_allow: bool | None = None
    message_timeout: str | None = None
    request_header_mode: str | None = None
    response_header_mode: str | None = None
    status_on_error: int | None = None
    honor_append_action: bool = False
    threads: int | None = None
    max_connections: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)
    upstream_connect_timeout: float = 5.0
    max_request_headers_kb: int = 60
    max_request_headers_count: int = 100
    forwarded_for: bool = True
    buffer_limit_bytes: int = DEFAULT_BUFFER_LIMIT
    request_body_mode: str | None = None
    response_body_mode: str | None = None
    request_trailer_mode: str | None = None
    response_trailer_mode: str | None = None
    admin: str | None = None
    # (base, max) ejection seconds of an upstream that failed to connect.
    upstream_ejection: tuple[float, float] = (30.0, 300.0)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None


def apply_overrides(
    message: ext_proc_pb2.ExternalProcessor, flags: Overrides
) -> ext_proc_pb2.ExternalProcessor:
    """A copy of ``message`` with the filter fields given on the command line set."""
    merged = ExternalProcessor()
    merged.CopyFrom(message)
    if flags.failure_mode_allow is not None:
        merged.failure_mode_allow = flags.failure_mode_allow
    if flags.message_timeout is not None:
        seconds = parse_duration(flags.message_timeout, "--message-timeout")
        merged.message_timeout.FromNanoseconds(round(seconds * 1e9))
    if flags.status_on_error is not None:
        merged.status_on_error.code = flags.status_on_error
    mode = merged.processing_mode
    for name in (
        "request_header_mode",
        "response_header_mode",
        "request_trailer_mode",
        "response_trailer_mode",
    ):
        flag = getattr(flags, name)
        if flag is not None:
            setattr(mode, name, mode.HeaderSendMode.Value(flag.upper()))
    for name in ("request_body_mode", "response_body_mode"):
        flag = getattr(flags, name)
        if flag is not None:
            setattr(mode, name, mode.BodySendMode.Value(flag.upper()))
    return merged


def build_config(file: FileConfig | None, flags: Overrides) -> ProxyConfig:
    """The whole configuration: flags over the file over Envoy's and extproc's defaults."""
    file = file or FileConfig(filter=ExternalProcessor())
    message = apply_overrides(file.filter, flags)
    check_supported(message)
    listen = flags.listen or file.listen
    upstream = flags.upstream or file.upstream
    if listen is None:
        raise ConfigError("--listen", "is required (or listen: in the config file)")
    if upstream is None:
        raise ConfigError("--upstream", "is required (or upstream: in the config file)")
    upstream_addresses = tuple(
        parse_address(item.strip(), "--upstream", default_host="127.0.0.1")
        for item in upstream.split(",")
    )
    ejection, max_ejection = flags.upstream_ejection
    if not 0 < ejection <= max_ejection:
        raise ConfigError(
            "--upstream-ejection-time", "must be above 0 and at most --upstream-max-ejection-time"
        )
    clusters = {**file.clusters, **flags.clusters}
    processor_flag = flags.processor or file.processor
    grpc_client = _grpc_client(flags, file)
    processor = _processor_settings(
        message.grpc_service, clusters, processor_flag, flags.processor_channel, grpc_client
    )
    head_bytes = flags.max_request_headers_kb * 1024
    limits = HeaderLimits(max_count=flags.max_request_headers_count, max_bytes=head_bytes)
    named = {**file.metadata_headers, **flags.metadata_headers}
    for header in named.values():
        if not name_is_valid(header.lower().encode()):
            raise ConfigError("--metadata-header", f"{header!r} is not a header name")
    metadata_headers = tuple((ns, h.lower().encode()) for ns, h in named.items())

    def exchange_settings(filter_message: ext_proc_pb2.ExternalProcessor) -> ExchangeSettings:
        return ExchangeSettings.from_proto(
            filter_message,
            limits=limits,
            honor_append_action=flags.honor_append_action,
            buffer_limit=flags.buffer_limit_bytes,
            metadata_headers=metadata_headers,
        )

    routes = []
    for i, spec in enumerate(file.routes):
        route_filter = effective_filter(message, spec, f"routes[{i}]")
        check_supported(route_filter)
        routes.append(
            Route(
                spec.prefix.encode(),
                exchange_settings(route_filter),
                _processor_settings(
                    route_filter.grpc_service,
                    clusters,
                    processor_flag,
                    flags.processor_channel,
                    grpc_client,
                ),
            )
        )
    return ProxyConfig(
        listen=parse_listen(listen, "--listen"),
        upstream=UpstreamSettings(
            upstream_addresses,
            connect_timeout=flags.upstream_connect_timeout,
            ejection_time=ejection,
            max_ejection_time=max_ejection,
        ),
        processor=processor,
        exchange=exchange_settings(message),
        timeouts=flags.timeouts,
        threads=flags.threads or DEFAULT_THREADS,
        max_connections=flags.max_connections,
        max_request_head_bytes=head_bytes,
        forwarded_for=flags.forwarded_for,
        admin=parse_address(flags.admin, "--admin") if flags.admin is not None else None,
        stat_prefix=message.stat_prefix,
        routes=tuple(routes),
        tls=_listener_tls(flags),
    )


# What a running proxy has bound or sized at start; a reload that changes one is refused.
_FIXED_AT_START = (
    ("listen", "listen"),
    ("admin", "--admin"),
    ("threads", "--threads"),
    ("stat_prefix", "ext_proc.stat_prefix"),
)


def check_reloadable(running: ProxyConfig, new: ProxyConfig) -> None:
    """Refuse, naming the field, a new configuration that only a restart could apply."""
    for attribute, where in _FIXED_AT_START:
        if getattr(running, attribute) != getattr(new, attribute):
            raise ConfigError(
                where,
                f"cannot change on reload ({getattr(running, attribute)!s} ->"
                f" {getattr(new, attribute)!s}); restart extproc to apply it",
            )


def _listener_tls(flags: Overrides) -> ListenerTls | None:
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
