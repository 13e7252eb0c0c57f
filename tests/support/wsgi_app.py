"""A minimal WSGI app wrapped in ExtProcMiddleware, for running under gunicorn in tests.

The processor's address comes from ``EXTPROC_TEST_PROCESSOR`` and the config file (any of its
shapes, as JSON) from ``EXTPROC_TEST_CONFIG``, ``{}`` when unset. The app answers JSON with the
request headers and body it saw and its worker's pid, so tests can tell workers apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from extproc import ExtProcMiddleware


def _read_body(environ: dict[str, Any]) -> bytes:
    """As werkzeug reads it: CONTENT_LENGTH bytes, or to the end with wsgi.input_terminated."""
    length = environ.get("CONTENT_LENGTH")
    if not length and environ.get("wsgi.input_terminated"):
        return bytes(environ["wsgi.input"].read())
    return bytes(environ["wsgi.input"].read(int(length or 0)))


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    received = _read_body(environ)
    body = json.dumps(
        {
            "pid": os.getpid(),
            "headers": seen,
            "content_length": environ.get("CONTENT_LENGTH"),
            "body": received.decode("latin-1"),
        }
    ).encode()
    start_response(
        "200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))]
    )
    return [body]


# Built at import: with --preload this happens in gunicorn's master, before the fork, so the
# middleware must open its gRPC channel lazily, in each worker.
application = ExtProcMiddleware(
    _app,
    json.loads(os.environ.get("EXTPROC_TEST_CONFIG", "{}")),
    processor=os.environ["EXTPROC_TEST_PROCESSOR"],
)
