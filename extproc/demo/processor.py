"""The demo's example ext_proc processor, written with the processor SDK.

It tags both directions with an ``x-extproc-demo`` header and answers requests whose path
starts with ``/blocked`` itself, with a 403, so the upstream never sees them.
"""

from __future__ import annotations

import grpc

from extproc.processor import Decision, Headers, Mutate, Processor, Respond, StreamContext
from extproc.processor.service import ProcessorServicer
from extproc.processor.service import serve as serve_processor


class DemoTagger(Processor):
    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> Decision:
        if ctx.path.startswith("/blocked"):
            return Respond(403, b"blocked by the demo processor\n", details="demo_blocked")
        return Mutate(set_headers={"x-extproc-demo": "request-seen"})

    def on_response_headers(self, ctx: StreamContext, headers: Headers) -> Decision:
        return Mutate(set_headers={"x-extproc-demo": "response-seen"})


class DemoProcessor(ProcessorServicer):
    """The demo as a plain gRPC servicer, for callers that build their own server."""

    def __init__(self) -> None:
        super().__init__(DemoTagger)


def serve(address: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    """Start the demo processor; returns the server and the port it bound."""
    running = serve_processor(DemoTagger, address)
    return running.server, running.port
