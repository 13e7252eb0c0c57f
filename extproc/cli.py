"""The ``extproc-proxy`` command: parse flags, build the configuration, run the server.

Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when the server cannot start
(the listening address is taken, say).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from extproc import logs
from extproc._version import __version__
from extproc.config import (
    DEFAULT_THREADS,
    Overrides,
    ProxyConfig,
    Timeouts,
    build_config,
    load_file,
    parse_address,
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


def _overrides(kw: dict[str, Any], **targets: Any) -> Overrides:
    clusters: dict[str, str] = {}
    for item in kw.get("cluster") or ():
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise ConfigError("--cluster", f"expected NAME=HOST:PORT, got {item!r}")
        parse_address(target, "--cluster", default_host="127.0.0.1")
        clusters[name] = target
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
        **targets,
    )


def _fail(code: int, message: str) -> None:
    click.echo(f"extproc-proxy: error: {message}", err=True)
    sys.exit(code)


def _serve(config: ProxyConfig, announce: Callable[[tuple[str, int]], None] | None = None) -> None:
    from extproc.io.server import ProxyServer

    try:
        server = ProxyServer(config)
    except OSError as err:
        # The admin listener's address comes as the error's filename (see ProxyServer).
        _fail(EXIT_STARTUP, f"cannot listen on {err.filename or config.listen}: {err.strerror}")
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if announce is not None:
        announce(server.address)
    server.serve_forever()


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="extproc-proxy")
def main() -> None:
    """Envoy's ext_proc filter as a standalone HTTP/1.1 proxy."""


@main.command()
@click.option("--listen", metavar="[HOST]:PORT", help="Address to accept clients on.")
@click.option("--upstream", metavar="HOST:PORT", help="The one upstream to proxy to.")
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
    metavar="NAME=HOST:PORT",
    help="Resolve grpc_service.envoy_grpc.cluster_name NAME (repeatable).",
)
@_proxy_options
def run(
    listen: str | None,
    upstream: str | None,
    processor: str | None,
    config_path: Path | None,
    **kw: Any,
) -> None:
    """Run the proxy (the default command)."""
    try:
        flags = _overrides(kw, listen=listen, upstream=upstream, processor=processor)
        config = build_config(load_file(config_path) if config_path else None, flags)
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
        return
    logs.configure(kw["log_format"], kw["log_level"])
    _serve(config)


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
