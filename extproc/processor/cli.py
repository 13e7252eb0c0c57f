"""The ``extproc-processor`` command: serve any Processor subclass over gRPC, or over HTTP.

    extproc-processor examples.auth:AuthProcessor --listen :9000 [--workers 16] [--http]

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 when the target cannot be imported or is
not a Processor, 3 when the address cannot be bound.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import click

from extproc.apis import API_VERSIONS
from extproc.processor.base import Processor
from extproc.processor.http_server import RunningHttpServer, serve_http
from extproc.processor.service import RunningServer, serve
from extproc.processor.targets import import_processor

EXIT_TARGET = 2
EXIT_STARTUP = 3


def load_processor(target: str) -> type[Processor]:
    """``module:Class`` to the class; raises click.UsageError (exit 2) with the reason."""
    try:
        return import_processor(target)
    except ValueError as err:
        raise click.UsageError(str(err)) from err


def listen_address(listen: str) -> str:
    # ``:9000`` means every interface, as for extproc-proxy.
    return f"[::]{listen}" if listen.startswith(":") else listen


def _stop_on_signals(running: RunningServer | RunningHttpServer, grace: float) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        # Runs on the main thread, inside running.wait(): that returns once stop() is done.
        running.stop(grace)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target")
@click.option("--listen", default=":9000", show_default=True, help="[HOST]:PORT to serve on.")
@click.option(
    "--workers",
    type=click.IntRange(1, 4096),
    default=16,
    show_default=True,
    help="Streams (HTTP requests) processed at once; with --http, POSTs (events) at once.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="Seconds open streams (with --http, POSTs under way) get to finish on SIGTERM.",
)
@click.option(
    "--api",
    type=click.Choice([*API_VERSIONS, "both"]),
    default="both",
    show_default=True,
    help="The ext_proc API versions served: v3 (Envoy 1.20 and later, extproc's default),"
    " v3alpha (older Envoys, extproc --processor-api v3alpha), or both. gRPC only: refused"
    " with --http.",
)
@click.option(
    "--http",
    is_flag=True,
    help="Serve Envoy's ext_proc http_service transport (JSON over HTTP POSTs) instead of"
    " gRPC, with a small threaded server; under gunicorn use extproc.processor:wsgi_app.",
)
def command(target: str, listen: str, workers: int, grace: float, api: str, http: bool) -> None:
    """Serve the Processor subclass TARGET (module:Class) as an ext_proc processor over gRPC
    (or over HTTP with --http)."""
    if http and api != "both":
        raise click.UsageError("--api chooses gRPC service names; it does not apply to --http")
    processor = load_processor(target)
    apis = API_VERSIONS if api == "both" else (api,)
    address = listen_address(listen)
    running: RunningServer | RunningHttpServer
    try:
        if http:
            running = serve_http(processor, address, workers=workers)
        else:
            running = serve(processor, address, workers=workers, apis=apis)
    except RuntimeError as err:
        click.echo(f"extproc-processor: error: {err}", err=True)
        sys.exit(EXIT_STARTUP)
    _stop_on_signals(running, grace)
    transport = " over HTTP" if http else ""
    click.echo(f"extproc-processor: serving {target}{transport} on port {running.port}", err=True)
    running.wait()


def main(argv: list[str] | None = None) -> None:
    command.main(args=argv, prog_name="extproc-processor")


if __name__ == "__main__":
    main()
