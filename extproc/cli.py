"""The ``extproc-proxy`` command: parse flags, build the configuration, run the server.

Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when the server cannot start
(the listening address is taken, say).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import structlog

from extproc import logs
from extproc._version import __version__
from extproc.channels import LB_POLICIES, ChannelFlags, check_target
from extproc.config import (
    DEFAULT_THREADS,
    GRPC_CLIENTS,
    Overrides,
    ProxyConfig,
    Timeouts,
    build_config,
    load_file,
    parse_duration,
)
from extproc.errors import ConfigError

EXIT_CONFIG = 2
EXIT_STARTUP = 3

_MODES = click.Choice(["send", "skip", "default"], case_sensitive=False)
_BODY_MODES = click.Choice(
    ["none", "streamed", "buffered", "buffered_partial", "full_duplex_streamed"],
    case_sensitive=False,
)
_MODE_FLAGS = (
    "request_header_mode",
    "response_header_mode",
    "request_trailer_mode",
    "response_trailer_mode",
    "request_body_mode",
    "response_body_mode",
)


class _RunByDefault(click.Group):
    """``extproc-proxy --listen ...`` runs the proxy; ``extproc-proxy demo`` the demo."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "--version")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _duration(option: str) -> Callable[[click.Context, click.Parameter, Any], float | None]:
    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> float | None:
        try:
            return None if value is None else parse_duration(str(value), option)
        except ConfigError as err:
            raise click.BadParameter(err.message) from err

    return convert


def _proxy_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--threads",
            type=click.IntRange(1, 4096),
            default=None,
            help=f"Worker threads (default {DEFAULT_THREADS}).",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(0),
            default=0,
            help="Open client connections beyond which new ones are closed at once"
            " (counted in listener.ingress.downstream_cx_overflow); 0, the default: no limit.",
        ),
        click.option(
            "--failure-mode-allow/--no-failure-mode-allow",
            default=None,
            help="Let requests through when the processor fails (ext_proc field).",
        ),
        click.option(
            "--message-timeout",
            default=None,
            metavar="DURATION",
            help="Per-message processor timeout, e.g. 200ms (ext_proc field).",
        ),
        click.option(
            "--request-header-mode",
            type=_MODES,
            default=None,
            help="Send request headers to the processor (processing_mode).",
        ),
        click.option(
            "--response-header-mode",
            type=_MODES,
            default=None,
            help="Send response headers to the processor (processing_mode).",
        ),
        click.option(
            "--request-trailer-mode",
            type=_MODES,
            default=None,
            help="Send request trailers to the processor (processing_mode).",
        ),
        click.option(
            "--response-trailer-mode",
            type=_MODES,
            default=None,
            help="Send response trailers to the processor (processing_mode).",
        ),
        click.option(
            "--request-body-mode",
            type=_BODY_MODES,
            default=None,
            help="How request bodies go to the processor (processing_mode).",
        ),
        click.option(
            "--response-body-mode",
            type=_BODY_MODES,
            default=None,
            help="How response bodies go to the processor (processing_mode).",
        ),
        click.option(
            "--buffer-limit-bytes",
            type=click.IntRange(1),
            default=1024 * 1024,
            help="Most a body mode may buffer (Envoy's per_connection_buffer_limit_bytes):"
            " a BUFFERED body over it gets 413 (request) or 500 (response).",
        ),
        click.option(
            "--status-on-error",
            type=click.IntRange(100, 999),
            default=None,
            help="HTTP status of error replies (ext_proc field, default 500).",
        ),
        click.option(
            "--honor-append-action",
            is_flag=True,
            default=False,
            help="Apply HeaderValueOption.append_action and keep_empty_value as "
            "documented (Envoy ignores them).",
        ),
        click.option(
            "--header-read-timeout",
            default="10s",
            callback=_duration("--header-read-timeout"),
            help="Time a client has to send a request head.",
        ),
        click.option(
            "--idle-timeout",
            default="60s",
            callback=_duration("--idle-timeout"),
            help="Idle keep-alive connections are closed after this.",
        ),
        click.option(
            "--client-timeout",
            default="60s",
            callback=_duration("--client-timeout"),
            help="Longest stall reading a request body or writing a response.",
        ),
        click.option(
            "--upstream-connect-timeout",
            default="5s",
            callback=_duration("--upstream-connect-timeout"),
        ),
        click.option(
            "--upstream-timeout",
            default="15s",
            callback=_duration("--upstream-timeout"),
            help="Longest wait for upstream response bytes.",
        ),
        click.option(
            "--drain-timeout",
            default="30s",
            callback=_duration("--drain-timeout"),
            help="On SIGTERM, how long in-flight requests may take to finish.",
        ),
        click.option(
            "--max-request-headers-kb",
            type=click.IntRange(1, 8192),
            default=60,
            help="Request head size limit (431 beyond it), as Envoy's.",
        ),
        click.option(
            "--max-request-headers-count",
            type=click.IntRange(1, 10000),
            default=100,
            help="Header count limit for mutation results, as Envoy's.",
        ),
        click.option(
            "--xff/--no-xff",
            default=True,
            help="Append the client address to X-Forwarded-For and set "
            "X-Forwarded-Proto (Envoy's use_remote_address).",
        ),
        click.option(
            "--admin",
            default=None,
            metavar="[HOST]:PORT",
            help="Admin listener: /stats and /stats?format=json (Envoy's), /metrics"
            " (Prometheus), /ready. Off by default; :PORT means all interfaces.",
        ),
        click.option("--log-format", type=click.Choice(logs.FORMATS), default="json"),
        click.option("--log-level", type=click.Choice(logs.LEVELS), default="info"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _network_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Processor channel, upstream balancing and listener TLS (``run`` only)."""
    file = click.Path(dir_okay=False, exists=True)
    options = [
        click.option(
            "--processor-ca",
            type=file,
            help="Talk TLS to the processor, trusting these CA certificates (PEM).",
        ),
        click.option(
            "--processor-cert",
            type=file,
            help="Client certificate chain for mTLS to the processor (PEM; with --processor-key).",
        ),
        click.option("--processor-key", type=file, help="Private key of --processor-cert (PEM)."),
        click.option(
            "--processor-authority",
            metavar="NAME",
            help="The processor's :authority, and the name its TLS certificate must carry.",
        ),
        click.option(
            "--grpc-client",
            type=click.Choice(GRPC_CLIENTS),
            help="How each Process stream is driven: direct (default; from the worker thread,"
            " no thread per stream) or stub (grpc's synchronous stub fed by a queue).",
        ),
        click.option(
            "--processor-lb-policy",
            type=click.Choice(LB_POLICIES),
            help="How streams spread over the target's addresses (default round_robin;"
            " xds: targets take the control plane's).",
        ),
        click.option(
            "--processor-keepalive-time",
            metavar="DURATION",
            callback=_duration("--processor-keepalive-time"),
            help="Ping the processor this often (off by default), so a dead host is noticed.",
        ),
        click.option(
            "--processor-keepalive-timeout",
            metavar="DURATION",
            callback=_duration("--processor-keepalive-timeout"),
            help="A ping unanswered this long closes the connection (default 20s).",
        ),
        click.option(
            "--upstream-ejection-time",
            default="30s",
            callback=_duration("--upstream-ejection-time"),
            help="An upstream that fails to connect is skipped this long times its ejections"
            " in a row (Envoy's base_ejection_time).",
        ),
        click.option(
            "--upstream-max-ejection-time",
            default="300s",
            callback=_duration("--upstream-max-ejection-time"),
            help="The longest an upstream is skipped (Envoy's max_ejection_time).",
        ),
        click.option(
            "--tls-cert",
            type=file,
            help="Serve clients over TLS with this certificate chain (PEM; with --tls-key).",
        ),
        click.option("--tls-key", type=file, help="Private key of --tls-cert (PEM)."),
        click.option(
            "--tls-client-ca",
            type=file,
            help="Require client certificates signed by these CAs (mTLS).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _network_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    if "processor_ca" not in kw:  # a command without _network_options
        return {}
    return {
        "processor_channel": ChannelFlags(
            ca=kw["processor_ca"],
            cert=kw["processor_cert"],
            key=kw["processor_key"],
            authority=kw["processor_authority"],
            lb_policy=kw["processor_lb_policy"],
            keepalive_time=kw["processor_keepalive_time"],
            keepalive_timeout=kw["processor_keepalive_timeout"],
        ),
        "grpc_client": kw["grpc_client"],
        "upstream_ejection": (kw["upstream_ejection_time"], kw["upstream_max_ejection_time"]),
        "tls_cert": kw["tls_cert"],
        "tls_key": kw["tls_key"],
        "tls_client_ca": kw["tls_client_ca"],
    }


def _overrides(kw: dict[str, Any], **targets: Any) -> Overrides:
    clusters: dict[str, str] = {}
    for item in kw.get("cluster") or ():
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise ConfigError("--cluster", f"expected NAME=TARGET, got {item!r}")
        clusters[name] = check_target(target, "--cluster")
    metadata_headers: dict[str, str] = {}
    for item in kw.get("metadata_header") or ():
        namespace, sep, header = item.partition("=")
        if not sep or not namespace or not header:
            raise ConfigError("--metadata-header", f"expected NS=HEADER, got {item!r}")
        metadata_headers[namespace] = header
    modes: dict[str, str | None] = {
        k: (None if kw[k] in (None, "default") else kw[k]) for k in _MODE_FLAGS
    }
    return Overrides(
        clusters=clusters,
        metadata_headers=metadata_headers,
        failure_mode_allow=kw["failure_mode_allow"],
        message_timeout=kw["message_timeout"],
        status_on_error=kw["status_on_error"],
        honor_append_action=kw["honor_append_action"],
        threads=kw["threads"],
        max_connections=kw["max_connections"],
        timeouts=Timeouts(
            request_headers=kw["header_read_timeout"],
            idle=kw["idle_timeout"],
            client=kw["client_timeout"],
            upstream=kw["upstream_timeout"],
            drain=kw["drain_timeout"],
        ),
        upstream_connect_timeout=kw["upstream_connect_timeout"],
        max_request_headers_kb=kw["max_request_headers_kb"],
        max_request_headers_count=kw["max_request_headers_count"],
        forwarded_for=kw["xff"],
        buffer_limit_bytes=kw["buffer_limit_bytes"],
        request_header_mode=modes["request_header_mode"],
        response_header_mode=modes["response_header_mode"],
        request_trailer_mode=modes["request_trailer_mode"],
        response_trailer_mode=modes["response_trailer_mode"],
        request_body_mode=modes["request_body_mode"],
        response_body_mode=modes["response_body_mode"],
        admin=kw["admin"],
        **_network_overrides(kw),
        **targets,
    )


def _fail(code: int, message: str) -> None:
    click.echo(f"extproc-proxy: error: {message}", err=True)
    sys.exit(code)


def _serve(
    config: ProxyConfig,
    announce: Callable[[tuple[str, int]], None] | None = None,
    *,
    load_config: Callable[[], ProxyConfig] | None = None,
    workers: int = 1,
    cpu_affinity: bool = False,
) -> None:
    from extproc.io.server import ProxyServer, install_signals, open_listener
    from extproc.io.workers import Supervisor, pin_to_cpu

    if workers > 1:
        try:
            listener = open_listener(config.listen)
        except OSError as err:
            _fail(EXIT_STARTUP, f"cannot listen on {err.filename or config.listen}: {err.strerror}")
            return
        try:
            supervisor = Supervisor(
                config, listener, workers, load_config=load_config, cpu_affinity=cpu_affinity
            )
        except OSError as err:
            listener.close()
            _fail(EXIT_STARTUP, f"cannot listen on {err.filename}: {err.strerror}")
            return
        supervisor.run()
        return
    if cpu_affinity:
        # Before any thread starts: threads inherit the mask of the thread that starts them.
        structlog.get_logger("extproc.server").info("cpu_pinned", cpu=pin_to_cpu(0))
    try:
        server = ProxyServer(config, load_config=load_config)
    except OSError as err:
        # The admin listener's address comes as the error's filename (see ProxyServer).
        _fail(EXIT_STARTUP, f"cannot listen on {err.filename or config.listen}: {err.strerror}")
        return
    install_signals(server.queue_signal)
    if announce is not None:
        announce(server.address)
    server.serve_forever()


def _socket_activation(listen: str | None) -> str | None:
    """``--listen`` as the proxy should use it: ``fd://N`` for the socket systemd passed,
    unless ``--listen fd://N`` names one itself."""
    from extproc.io import systemd

    try:
        fds = systemd.listen_fds()
    except OSError as err:
        raise _StartupError(f"cannot take the sockets systemd passed: {err.strerror}") from err
    if not fds or (listen is not None and listen.startswith("fd://")):
        return listen
    if len(fds) > 1:
        raise _StartupError(
            f"systemd passed {len(fds)} sockets (LISTEN_FDS); extproc serves one: give the"
            " .socket unit a single ListenStream="
        )
    return f"fd://{fds[0]}"


class _StartupError(Exception):
    pass


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="extproc-proxy")
def main() -> None:
    """Envoy's ext_proc filter as a standalone HTTP/1.1 proxy."""


@main.command()
@click.option("--listen", metavar="[HOST]:PORT", help="Address to accept clients on.")
@click.option(
    "--upstream",
    multiple=True,
    metavar="HOST:PORT",
    help="Upstream to proxy to; repeat it (or give a comma list) to balance over several.",
)
@click.option(
    "--processor",
    metavar="TARGET",
    help="gRPC target of the ext_proc processor (overrides grpc_service in --config).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Envoy ExternalProcessor message (YAML/JSON) or an extproc config file.",
)
@click.option(
    "--metadata-header",
    multiple=True,
    metavar="NS=HEADER",
    help="Hand dynamic metadata namespace NS to the upstream as request header HEADER, in JSON"
    " (Envoy's %DYNAMIC_METADATA(NS)%); repeatable.",
)
@click.option(
    "--cluster",
    multiple=True,
    metavar="NAME=TARGET",
    help="Resolve grpc_service.envoy_grpc.cluster_name NAME to a gRPC target (repeatable).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes sharing the listening socket, under a supervisor that replaces"
    " any that die (1: one process, no supervisor).",
)
@click.option(
    "--cpu-affinity",
    is_flag=True,
    default=False,
    help="Pin worker i to CPU i mod the CPUs allowed (with --workers 1, the one process).",
)
@_network_options
@_proxy_options
def run(
    listen: str | None,
    upstream: tuple[str, ...],
    processor: str | None,
    config_path: Path | None,
    workers: int,
    cpu_affinity: bool,
    **kw: Any,
) -> None:
    """Run the proxy (the default command)."""
    try:
        activated = _socket_activation(listen)
    except _StartupError as err:
        _fail(EXIT_STARTUP, str(err))
        return
    try:
        flags = _overrides(
            kw, listen=activated, upstream=",".join(upstream) or None, processor=processor
        )
        config = build_config(load_file(config_path) if config_path else None, flags)
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
        return
    logs.configure(kw["log_format"], kw["log_level"])
    if activated != listen:
        structlog.get_logger("extproc.server").info(
            "socket_activated", listen=activated, ignored_listen=listen
        )

    def load_config() -> ProxyConfig:
        """SIGHUP: the file read again, the same flags over it."""
        return build_config(load_file(config_path) if config_path else None, flags)

    _serve(config, load_config=load_config, workers=workers, cpu_affinity=cpu_affinity)


@main.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="[HOST]:PORT")
@_proxy_options
def demo(listen: str, **kw: Any) -> None:
    """Run the proxy with a built-in example processor and echo upstream on loopback."""
    from extproc.demo import processor as demo_processor
    from extproc.demo.upstream import EchoUpstream

    upstream = EchoUpstream().start()
    grpc_server, grpc_port = demo_processor.serve("127.0.0.1:0")
    up_host, up_port = upstream.address
    try:
        flags = _overrides(
            kw, listen=listen, upstream=f"{up_host}:{up_port}", processor=f"127.0.0.1:{grpc_port}"
        )
        config = build_config(None, flags)
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
        return
    logs.configure(kw["log_format"], kw["log_level"])

    def announce(address: tuple[str, int]) -> None:
        base = f"http://{address[0]}:{address[1]}"
        click.echo(
            f"extproc demo: proxy on {base}, echo upstream on {up_host}:{up_port}, "
            f"example processor on 127.0.0.1:{grpc_port}"
        )
        click.echo("Try:")
        click.echo(f"  curl -si {base}/hello          # tagged by the processor both ways")
        click.echo(f"  curl -si {base}/blocked        # answered 403 by the processor")
        click.echo(f"  curl -si -d 'some body' {base}/post")
        click.echo("Stop with Ctrl-C.", nl=True)
        sys.stdout.flush()

    try:
        _serve(config, announce)
    finally:
        grpc_server.stop(grace=None)
        upstream.stop()
