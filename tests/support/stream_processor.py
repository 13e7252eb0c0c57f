"""A fast processor in a process of its own, for tests that open streams by the thousand.

Run as ``python -m tests.support.stream_processor NAME``; it prints ``port N``. grpc.aio, so
one event loop serves every stream (the sync server parks a thread per stream). What it does
with a stream is chosen by the request headers' ``:path``:

* ``/hold``: answers nothing; the stream is held until the client ends it;
* ``/close-ok``: ends the stream with OK at once;
* ``/abort``: ends it with INTERNAL;
* anything else: the empty matching reply to every message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.support.processor import header_value, matching_reply


class _Behaviours:
    """Duck-typed ExternalProcessorServicer."""

    async def Process(  # noqa: N802 - the gRPC method name
        self,
        requests: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for request in requests:
            if request.WhichOneof("request") == "request_headers":
                path = header_value(request.request_headers.headers, ":path")
                if path == b"/hold":
                    async for _ in requests:  # until the client ends the stream
                        pass
                    return
                if path == b"/close-ok":
                    return
                if path == b"/abort":
                    await context.abort(grpc.StatusCode.INTERNAL, "boom")
            yield matching_reply(request)


async def _serve() -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(_Behaviours(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve())
