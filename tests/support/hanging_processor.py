"""A processor run as a real subprocess (``extproc-processor``) for fault tests.

Requests under ``/hang`` are held in the request-headers hook, after ``hanging`` is printed on
standard output, so a test knows the stream is open mid-exchange before it kills the process.
Every other request is let through.
"""

from __future__ import annotations

import threading

from extproc.processor import Continue, Headers, Processor, StreamContext

_forever = threading.Event()


class HangingProcessor(Processor):
    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> Continue:
        if ctx.path.startswith("/hang"):
            print("hanging", flush=True)
            _forever.wait()  # until the test kills the process
        return Continue()
