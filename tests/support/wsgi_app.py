"""A minimal WSGI app wrapped in ExtProcMiddleware, for running under gunicorn in tests.

The processor's address comes from ``EXTPROC_TEST_PROCESSOR``; the app answers JSON with the
request headers it saw and its worker's pid, so tests can tell workers apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from extproc import ExtProcMiddleware, WsgiConfig


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    body = json.dumps({"pid": os.getpid(), "headers": seen}).encode()
    start_response(
        "200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))]
    )
    return [body]


# Built at import: with --preload this happens in gunicorn's master, before the fork, so the
# middleware must open its gRPC channel lazily, in each worker.
application = ExtProcMiddleware(
    _app, WsgiConfig.from_dict({}, processor=os.environ["EXTPROC_TEST_PROCESSOR"])
)
