"""The ``extproc-processor`` command: serve any Processor subclass over gRPC.

    extproc-processor examples.auth:AuthProcessor --listen :9000 [--workers 16]

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 when the target cannot be imported or is
not a Processor, 3 when the address cannot be bound.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from types import FrameType

import click

from extproc.apis import API_VERSIONS
from extproc.processor.base import Processor
from extproc.processor.service import RunningServer, serve

EXIT_TARGET = 2
EXIT_STARTUP = 3


def load_processor(target: str) -> type[Processor]:
    """``module:Class`` to the class; raises click.UsageError (exit 2) with the reason."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise click.UsageError(f"{target!r}: expected module:Class")
    # Like uvicorn or gunicorn: modules next to where the command runs are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (any import failure is the user's to see)
        raise click.UsageError(f"cannot import {module_name!r}: {err}") from err
    found = getattr(module, attr, None)
    if not (isinstance(found, type) and issubclass(found, Processor)):
        what = "not found" if found is None else f"is not a Processor subclass ({found!r})"
        raise click.UsageError(f"{module_name}:{attr} {what}")
    return found


def listen_address(listen: str) -> str:
    # ``:9000`` means every interface, as for extproc-proxy.
    return f"[::]{listen}" if listen.startswith(":") else listen


def _stop_on_signals(running: RunningServer, grace: float) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        # server.stop does not block; the main thread's wait() returns once streams are done.
        running.health.enter_graceful_shutdown()
        running.server.stop(grace)

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
    help="Streams (HTTP requests) processed at once.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="Seconds open streams get to finish on SIGTERM.",
)
@click.option(
    "--api",
    type=click.Choice([*API_VERSIONS, "both"]),
    default="both",
    show_default=True,
    help="The ext_proc API versions served: v3 (Envoy 1.20 and later, extproc's default),"
    " v3alpha (older Envoys, extproc --processor-api v3alpha), or both.",
)
def command(target: str, listen: str, workers: int, grace: float, api: str) -> None:
    """Serve the Processor subclass TARGET (module:Class) as an ext_proc gRPC processor."""
    processor = load_processor(target)
    apis = API_VERSIONS if api == "both" else (api,)
    try:
        running = serve(processor, listen_address(listen), workers=workers, apis=apis)
    except RuntimeError as err:
        click.echo(f"extproc-processor: error: {err}", err=True)
        sys.exit(EXIT_STARTUP)
    _stop_on_signals(running, grace)
    click.echo(f"extproc-processor: serving {target} on port {running.port}", err=True)
    running.wait()


def main(argv: list[str] | None = None) -> None:
    command.main(args=argv, prog_name="extproc-processor")


if __name__ == "__main__":
    main()
