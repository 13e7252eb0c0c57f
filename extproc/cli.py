"""The ``extproc-proxy`` command: parse flags, build the configuration, run the server.

Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when the server cannot start
(the listening address is taken, say).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import structlog

from extproc import logs
from extproc._version import __version__
from extproc.config import ProxyConfig, build_config, load_file
from extproc.errors import ConfigError
from extproc.options import SPECS, Options, Scope, env_name, flag_name, shown_default

EXIT_CONFIG = 2
EXIT_STARTUP = 3
DEMO_LISTEN = "127.0.0.1:8080"


class _RunByDefault(click.Group):
    """``extproc-proxy --listen ...`` runs the proxy; ``extproc-proxy demo`` the demo."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "--version")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _options(demo: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click options of ``run`` (every option) or of ``demo``, from extproc.options.

    Values stay as typed (strings, tuples, booleans): extproc.options reads them, as it reads
    the environment and the file, so each place is checked by the same code and named in the
    error. No click default: an option not given must leave the environment and the file a say.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for name, spec in reversed(SPECS.items()):
            if demo and not spec.demo:
                continue
            kind = spec.kind
            default = DEMO_LISTEN if demo and name == "listen" else shown_default(name)
            shown = f"default: {default}; " if default != "—" else ""
            help_text = f"{spec.help} [{shown}env: {env_name(name)}]"
            flag = flag_name(name)
            decls = [f"{flag}/--no-{flag[2:]}" if kind.boolean else flag, name]
            func = click.option(
                *decls,
                default=None,
                multiple=kind.repeatable,
                type=click.Choice(kind.choices, case_sensitive=False) if kind.choices else None,
                metavar=None if kind.choices else kind.metavar,
                help=help_text,
            )(func)
        return func

    return decorate


def _given(kw: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line: click passes None (or ()) for the others."""
    return {k: v for k, v in kw.items() if v not in (None, ())}


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
@_options(demo=False)
def run(**kw: Any) -> None:
    """Run the proxy (the default command)."""
    given = _given(kw)
    requested = given.get("listen") or os.environ.get(env_name("listen")) or None
    try:
        command = Options.resolve(given, {}, os.environ, frozenset({Scope.COMMAND}))
        activated = _socket_activation(requested)
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
        return
    except _StartupError as err:
        _fail(EXIT_STARTUP, str(err))
        return
    if activated != requested:
        given["listen"] = activated
    config_path = Path(command.config) if command.config else None

    def load_config() -> ProxyConfig:
        """At start, and on SIGHUP: the file read again, the same flags over it."""
        return build_config(load_file(config_path) if config_path else None, given)

    try:
        config = load_config()
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
        return
    logs.configure(command.log_format, command.log_level)
    if activated != requested:
        structlog.get_logger("extproc.server").info(
            "socket_activated", listen=activated, ignored_listen=requested
        )
    _serve(
        config,
        load_config=load_config,
        workers=command.workers,
        cpu_affinity=command.cpu_affinity,
    )


@main.command()
@_options(demo=True)
def demo(**kw: Any) -> None:
    """Run the proxy with a built-in example processor and echo upstream on loopback."""
    from extproc.demo import processor as demo_processor
    from extproc.demo.upstream import EchoUpstream

    upstream = EchoUpstream().start()
    grpc_server, grpc_port = demo_processor.serve("127.0.0.1:0")
    up_host, up_port = upstream.address
    given = {
        "listen": DEMO_LISTEN,
        **_given(kw),
        "upstream": f"{up_host}:{up_port}",
        "processor": f"127.0.0.1:{grpc_port}",
    }
    try:
        command = Options.resolve(given, {}, os.environ, frozenset({Scope.COMMAND}))
        config = build_config(None, given)
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
        return
    logs.configure(command.log_format, command.log_level)

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
