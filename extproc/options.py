"""Every option of extproc, declared once.

Each field of :class:`Options` is one option. Its name gives the flag (``message_timeout`` is
``--message-timeout``), the environment variable (``EXTPROC_MESSAGE_TIMEOUT``) and the keyword
argument of the library; its metadata gives the help, how a value is read, and the key of
extproc's config file. The command line (:mod:`extproc.cli`), the library (:mod:`extproc.embed`,
:mod:`extproc.wsgi`) and the flag table of docs/configuration.md all come from here.

A value comes from the first place that has it: the flag (or keyword argument), the
environment, the config file, the default. Options that are fields of the filter message
(``--message-timeout``, the processing modes, ...) take their file value from that message.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from extproc.addresses import Address, InheritedSocket, parse_address, parse_listen
from extproc.apis import API_VERSIONS, DEFAULT_API
from extproc.channels import check_target
from extproc.core.mutations import HeaderLimits, name_is_valid
from extproc.core.settings import DEFAULT_BUFFER_LIMIT
from extproc.errors import ConfigError

ENV_PREFIX = "EXTPROC_"


class Scope(Enum):
    """Who reads an option: the filter (the proxy and the WSGI middleware), the proxy's
    listener and upstream (the proxy only), or the command itself (``extproc-proxy run``)."""

    FILTER = "filter"
    PROXY = "proxy"
    COMMAND = "command"


@dataclass(frozen=True, slots=True)
class Kind:
    """How an option's values are read: ``parse`` takes a flag's or a variable's string, a
    file's value or a keyword argument, and the place it came from for the error."""

    parse: Callable[[object, str], Any]
    metavar: str
    choices: tuple[str, ...] = ()
    boolean: bool = False  # a --name/--no-name flag pair
    repeatable: bool = False  # a flag given several times; several values in one variable
    merged: bool = False  # a mapping: the places' entries merge, the higher place winning a key


@dataclass(frozen=True, slots=True)
class Spec:
    kind: Kind
    help: str
    scope: Scope
    file_key: str | None  # None: not in files; "ext_proc.…": a field of the filter message
    demo: bool  # offered by ``extproc-proxy demo`` too
    shown_default: str | None  # the default as people read it, where the value is None


# Kinds ----------------------------------------------------------------------------------


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"expected a non-empty string, got {value!r}")
    return value


def integer(low: int, high: int | None = None) -> Kind:
    def parse(value: object, where: str) -> int:
        number = value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            number = int(value)
        if (
            not isinstance(number, int)
            or isinstance(number, bool)
            or number < low
            or (high is not None and number > high)
        ):
            bounds = f"from {low}" + (f" to {high}" if high is not None else " up")
            raise ConfigError(where, f"expected a whole number {bounds}, got {value!r}")
        return number

    return Kind(parse, "N")


def parse_duration(value: object, where: str) -> float:
    """Seconds from ``200ms``, ``1.5s``, or a number of seconds (a string or a number)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = (
        re.fullmatch(r"(\d+(?:\.\d*)?)(ms|s)?", value.strip()) if isinstance(value, str) else None
    )
    if not match:
        raise ConfigError(where, f"expected a duration such as 200ms or 1.5s, got {value!r}")
    number = float(match[1])
    return number / 1000 if match[2] == "ms" else number


def show_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


DURATION = Kind(parse_duration, "DURATION")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _boolean(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ConfigError(where, f"expected true or false, got {value!r}")


BOOLEAN = Kind(_boolean, "BOOL", boolean=True)


def choice(*values: str) -> Kind:
    def parse(value: object, where: str) -> str:
        if not isinstance(value, str) or value.lower() not in values:
            raise ConfigError(where, f"{value!r} is not one of {', '.join(values)}")
        return value.lower()

    return Kind(parse, "|".join(values), choices=values)


def text(metavar: str) -> Kind:
    return Kind(_text, metavar)


def parsed(metavar: str, parse: Callable[[str, str], Any]) -> Kind:
    """A string turned into a value by ``parse(value, where)``, which raises ConfigError."""
    return Kind(lambda value, where: parse(_text(value, where), where), metavar)


def _existing_file(value: object, where: str) -> str:
    path = _text(value, where)
    if not Path(path).is_file():
        raise ConfigError(where, f"{path!r} is not a file")
    return path


FILE = Kind(_existing_file, "FILE")


def _items(value: object, where: str) -> list[str]:
    """A repeatable value's items: a flag's tuple, a file's list, or one string holding
    several, split at commas and white space (an environment variable)."""
    if isinstance(value, str):
        items = re.split(r"\s*,\s*|\s+", value.strip())
        if not all(items):
            raise ConfigError(where, f"an empty item in {value!r}")
        return items
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return [piece for item in value for piece in _items(item, where)]
    raise ConfigError(where, f"expected a string or a list of strings, got {value!r}")


def listing(metavar: str, parse_item: Callable[[str, str], Any]) -> Kind:
    def parse(value: object, where: str) -> tuple[Any, ...]:
        items = _items(value, where)
        if not items:
            raise ConfigError(where, "is empty")
        return tuple(parse_item(item, where) for item in items)

    return Kind(parse, metavar, repeatable=True)


def pairs(metavar: str, check: Callable[[str, str, str], Any]) -> Kind:
    """NAME=VALUE items, or a file's mapping: a dict, ``check``-ed with the value's place."""

    def parse(value: object, where: str) -> dict[str, str]:
        entries: list[tuple[object, object, str]] = []
        if isinstance(value, Mapping):
            # A file's mapping: each entry is named in the error, as clusters.NAME.
            entries = [(key, target, f"{where}.{key}") for key, target in value.items()]
        else:
            for item in _items(value, where):
                before, sep, after = item.partition("=")
                if not sep:
                    raise ConfigError(where, f"expected {metavar}, got {item!r}")
                entries.append((before, after, where))
        result: dict[str, str] = {}
        for key, target, place in entries:
            if not isinstance(key, str) or not isinstance(target, str) or not key or not target:
                raise ConfigError(place, f"expected {metavar}, got {key!r}: {target!r}")
            check(key, target, place)
            result[key] = target
        return result

    return Kind(parse, metavar, repeatable=True, merged=True)


# The table --------------------------------------------------------------------------------


def option(
    default: Any,
    help: str,
    kind: Kind,
    scope: Scope,
    *,
    file: str | None | bool = True,
    demo: bool = False,
    shown: str | None = None,
) -> Any:
    """One option; ``file=True`` keys it in extproc's file by its own name (see SPECS)."""
    spec = Spec(kind, help, scope, file if isinstance(file, str) else None, demo, shown)
    metadata = {"spec": spec, "own_file_key": file is True}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _upstream_address(value: str, where: str) -> Address:
    return parse_address(value.strip(), where, default_host="127.0.0.1")


def _check_cluster(name: str, target: str, where: str) -> None:
    check_target(target, where)


def _check_metadata_header(namespace: str, header: str, where: str) -> None:
    if not name_is_valid(header.lower().encode()):
        raise ConfigError(where, f"{header!r} is not a header name")


# How a Process stream is driven (extproc.io.processor): from the worker's thread, or through
# grpc's synchronous stub fed by a queue.
GRPC_CLIENTS = ("direct", "stub")
_MODE = choice("send", "skip", "default")
_BODY_MODE = choice("none", "streamed", "buffered", "buffered_partial", "full_duplex_streamed")
_F, _P, _C = Scope.FILTER, Scope.PROXY, Scope.COMMAND


@dataclass(frozen=True, slots=True)
class Options:
    """extproc's options with their values. The order is the order of ``--help``."""

    listen: Address | InheritedSocket | None = option(
        None,
        "Address to accept clients on: HOST:PORT, :PORT (all interfaces), [V6]:PORT, or fd://N"
        " (an inherited listening socket; systemd's socket activation sets it).",
        parsed("[HOST]:PORT", parse_listen),
        _P,
        demo=True,
    )
    upstream: tuple[Address, ...] = option(
        (),
        "Upstream to proxy to; repeat it (or give a comma list) to balance over several.",
        listing("HOST:PORT", _upstream_address),
        _P,
    )
    processor: str | None = option(
        None,
        "gRPC target of the ext_proc processor: HOST:PORT, dns:///, ipv4:, unix:, xds:///"
        " (overrides the filter's grpc_service).",
        parsed("TARGET", check_target),
        _F,
        shown="the filter's grpc_service",
    )
    config: str | None = option(
        None,
        "Envoy ExternalProcessor message (YAML/JSON) or an extproc config file.",
        text("FILE"),
        _C,
        file=None,
    )
    cluster: dict[str, str] = option(
        {},
        "Resolve grpc_service.envoy_grpc.cluster_name NAME to a gRPC target (repeatable).",
        pairs("NAME=TARGET", _check_cluster),
        _F,
        file="clusters",
    )
    metadata_header: dict[str, str] = option(
        {},
        "Hand dynamic metadata namespace NS to the upstream as request header HEADER, in JSON"
        " (Envoy's %DYNAMIC_METADATA(NS)%); repeatable.",
        pairs("NS=HEADER", _check_metadata_header),
        _F,
        file="metadata_headers",
    )
    workers: int = option(
        1,
        "Worker processes sharing the listening socket, under a supervisor that replaces any"
        " that die (1: one process, no supervisor).",
        integer(1, 256),
        _C,
        file=None,
    )
    cpu_affinity: bool = option(
        False,
        "Pin worker i to CPU i mod the CPUs allowed (with --workers 1, the one process).",
        BOOLEAN,
        _C,
        file=None,
    )
    grpc_client: str = option(
        "direct",
        "How each Process stream is driven: direct (from the worker thread, no thread per"
        " stream) or stub (grpc's synchronous stub fed by a queue).",
        choice(*GRPC_CLIENTS),
        _F,
    )
    processor_api: str = option(
        DEFAULT_API,
        "The ext_proc API the processor serves: v3 (Envoy's) or v3alpha (the API before it,"
        " for processors that register /envoy.service.ext_proc.v3alpha.ExternalProcessor/Process).",
        choice(*API_VERSIONS),
        _F,
    )
    processor_ca: str | None = option(
        None,
        "Talk TLS to the processor, trusting these CA certificates (PEM).",
        FILE,
        _F,
        shown="plaintext",
    )
    processor_cert: str | None = option(
        None,
        "Client certificate chain for mTLS to the processor (PEM; with --processor-key).",
        FILE,
        _F,
    )
    processor_key: str | None = option(None, "Private key of --processor-cert (PEM).", FILE, _F)
    processor_authority: str | None = option(
        None,
        "The processor's :authority, and the name its TLS certificate must carry.",
        text("NAME"),
        _F,
        shown="the target's host",
    )
    processor_lb_policy: str | None = option(
        None,
        "How streams spread over the target's addresses (xds: targets take the control plane's).",
        choice("round_robin", "pick_first"),
        _F,
        shown="round_robin",
    )
    processor_keepalive_time: float | None = option(
        None,
        "Ping the processor this often, so a dead host is noticed.",
        DURATION,
        _F,
        shown="off",
    )
    processor_keepalive_timeout: float | None = option(
        None,
        "A ping unanswered this long closes the connection (with --processor-keepalive-time).",
        DURATION,
        _F,
        shown="20s",
    )
    upstream_ejection_time: float = option(
        30.0,
        "An upstream that fails to connect is skipped this long times its ejections in a row"
        " (Envoy's base_ejection_time).",
        DURATION,
        _P,
    )
    upstream_max_ejection_time: float = option(
        300.0, "The longest an upstream is skipped (Envoy's max_ejection_time).", DURATION, _P
    )
    tls_cert: str | None = option(
        None,
        "Serve clients over TLS with this certificate chain (PEM; with --tls-key).",
        FILE,
        _P,
        shown="plaintext",
    )
    tls_key: str | None = option(None, "Private key of --tls-cert (PEM).", FILE, _P)
    tls_client_ca: str | None = option(
        None, "Require client certificates signed by these CAs (mTLS).", FILE, _P
    )
    threads: int = option(
        32,
        "Worker threads; a thread is held only while a request is in flight (per process with"
        " --workers).",
        integer(1, 4096),
        _P,
        demo=True,
    )
    max_connections: int = option(
        0,
        "Open client connections beyond which new ones are closed at once (counted in"
        " listener.ingress.downstream_cx_overflow); 0: no limit.",
        integer(0),
        _P,
        demo=True,
    )
    failure_mode_allow: bool | None = option(
        None,
        "Let requests through when the processor fails.",
        BOOLEAN,
        _F,
        file="ext_proc.failure_mode_allow",
        demo=True,
        shown="false",
    )
    message_timeout: float | None = option(
        None,
        "Per-message processor timeout, e.g. 200ms.",
        DURATION,
        _F,
        file="ext_proc.message_timeout",
        demo=True,
        shown="200ms",
    )
    request_header_mode: str | None = option(
        None,
        "Send request headers to the processor.",
        _MODE,
        _F,
        file="ext_proc.processing_mode.request_header_mode",
        demo=True,
        shown="send",
    )
    response_header_mode: str | None = option(
        None,
        "Send response headers to the processor.",
        _MODE,
        _F,
        file="ext_proc.processing_mode.response_header_mode",
        demo=True,
        shown="send",
    )
    request_trailer_mode: str | None = option(
        None,
        "Send request trailers to the processor.",
        _MODE,
        _F,
        file="ext_proc.processing_mode.request_trailer_mode",
        demo=True,
        shown="skip",
    )
    response_trailer_mode: str | None = option(
        None,
        "Send response trailers to the processor.",
        _MODE,
        _F,
        file="ext_proc.processing_mode.response_trailer_mode",
        demo=True,
        shown="skip",
    )
    request_body_mode: str | None = option(
        None,
        "How request bodies go to the processor.",
        _BODY_MODE,
        _F,
        file="ext_proc.processing_mode.request_body_mode",
        demo=True,
        shown="none",
    )
    response_body_mode: str | None = option(
        None,
        "How response bodies go to the processor.",
        _BODY_MODE,
        _F,
        file="ext_proc.processing_mode.response_body_mode",
        demo=True,
        shown="none",
    )
    buffer_limit_bytes: int = option(
        DEFAULT_BUFFER_LIMIT,
        "Most a body mode may buffer (Envoy's per_connection_buffer_limit_bytes): a BUFFERED"
        " body over it gets 413 (request) or 500 (response).",
        integer(1),
        _F,
        demo=True,
    )
    status_on_error: int | None = option(
        None,
        "HTTP status of error replies.",
        integer(100, 999),
        _F,
        file="ext_proc.status_on_error.code",
        demo=True,
        shown="500",
    )
    honor_append_action: bool = option(
        False,
        "Apply HeaderValueOption.append_action and keep_empty_value as documented (Envoy"
        " ignores them).",
        BOOLEAN,
        _F,
        demo=True,
    )
    header_read_timeout: float = option(
        10.0,
        "Time a client has to send a request head (408 after).",
        DURATION,
        _P,
        demo=True,
    )
    idle_timeout: float = option(
        60.0, "Idle keep-alive connections are closed after this.", DURATION, _P, demo=True
    )
    client_timeout: float = option(
        60.0,
        "Longest stall reading a request body or writing a response.",
        DURATION,
        _P,
        demo=True,
    )
    upstream_connect_timeout: float = option(
        5.0, "Connecting to the upstream (503 after).", DURATION, _P, demo=True
    )
    upstream_timeout: float = option(
        15.0,
        "Longest wait for upstream response bytes (504 before the head).",
        DURATION,
        _P,
        demo=True,
    )
    drain_timeout: float = option(
        30.0,
        "On SIGTERM, how long in-flight requests may take to finish.",
        DURATION,
        _P,
        demo=True,
    )
    max_request_headers_kb: int = option(
        HeaderLimits().max_bytes // 1024,
        "Request head size limit (431 beyond it) and mutation result size limit, as Envoy's.",
        integer(1, 8192),
        _F,
        demo=True,
    )
    max_request_headers_count: int = option(
        HeaderLimits().max_count,
        "Request header count limit (431 beyond it) and mutation result limit, as Envoy's.",
        integer(1, 10000),
        _F,
        demo=True,
    )
    xff: bool = option(
        True,
        "Append the client address to X-Forwarded-For and set X-Forwarded-Proto (Envoy's"
        " use_remote_address).",
        BOOLEAN,
        _P,
        demo=True,
    )
    admin: Address | None = option(
        None,
        "Admin listener: /stats and /stats?format=json (Envoy's), /metrics (Prometheus),"
        " /ready; :PORT means all interfaces.",
        parsed("[HOST]:PORT", parse_address),
        _P,
        demo=True,
        shown="off",
    )
    log_format: str = option(
        "json", "Log lines as JSON or for a console.", choice("json", "console"), _C, demo=True
    )
    log_level: str = option(
        "info",
        "Least level logged.",
        choice("debug", "info", "warning", "error"),
        _C,
        demo=True,
    )

    @classmethod
    def resolve(
        cls,
        given: Mapping[str, object],
        file: Mapping[str, object],
        environ: Mapping[str, str],
        scopes: frozenset[Scope] = frozenset(Scope),
    ) -> Options:
        """Each option from its first place: ``given`` (flags or keyword arguments, by option
        name), then ``environ``, then ``file`` (extproc's file, by file key), then the
        default. Options outside ``scopes`` keep their defaults."""
        for name in given:
            if name not in SPECS:
                raise ConfigError(flag_name(name), "is not an option of extproc")
        values: dict[str, Any] = {}
        for name, spec in SPECS.items():
            if spec.scope not in scopes:
                continue
            found = [
                spec.kind.parse(value, where)
                for value, where in _places(name, spec, given, file, environ)
            ]
            if spec.kind.merged and found:
                values[name] = {k: v for mapping in reversed(found) for k, v in mapping.items()}
            elif found:
                values[name] = found[0]
        return cls(**values)


def _places(
    name: str,
    spec: Spec,
    given: Mapping[str, object],
    file: Mapping[str, object],
    environ: Mapping[str, str],
) -> Iterator[tuple[object, str]]:
    """The values an option has, highest place first, with the names of their places."""
    if given.get(name) not in (None, (), [], {}):
        yield given[name], flag_name(name)
    if environ.get(env_name(name)):
        yield environ[env_name(name)], env_name(name)
    key = spec.file_key
    if key is not None and not key.startswith("ext_proc.") and file.get(key) is not None:
        yield file[key], key


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


SPECS: dict[str, Spec] = {
    f.name: dataclasses.replace(f.metadata["spec"], file_key=f.name)
    if f.metadata["own_file_key"]
    else f.metadata["spec"]
    for f in dataclasses.fields(Options)
}
_DEFAULTS = Options()
# The options extproc's own file may hold, by their file keys (ext_proc.* are the message's).
FILE_SPECS: dict[str, Spec] = {
    spec.file_key: spec
    for spec in SPECS.values()
    if spec.file_key is not None and not spec.file_key.startswith("ext_proc.")
}


def shown_default(name: str) -> str:
    """The default of an option as the help and the docs show it."""
    spec = SPECS[name]
    default = getattr(_DEFAULTS, name)
    if spec.shown_default is not None:
        return spec.shown_default
    if spec.kind is DURATION:
        return show_duration(default)
    if spec.kind.boolean:
        return "on" if default else "off"
    if default in (None, (), {}):
        return "—"
    return str(default)


def markdown_table() -> str:
    """docs/configuration.md's option table: one row per option, from this module."""
    rows = [
        "| flag | environment | file key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, spec in SPECS.items():
        flag = flag_name(name)
        flag = f"{flag} / --no-{flag[2:]}" if spec.kind.boolean else f"{flag} {spec.kind.metavar}"
        key = f"`{spec.file_key}`" if spec.file_key else "—"
        cells = [f"`{flag}`", f"`{env_name(name)}`", key, shown_default(name), spec.help]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
