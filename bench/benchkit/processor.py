"""The benchmark's ext_proc processor: answer every message with the empty matching response.

Run in its own process (``python -m benchkit.processor PORT``) so its CPU is measured apart
from the proxy's. It uses grpc.aio: one event loop serves every stream, where the sync server
would park a thread per open stream. Still Python: it caps at a few thousand messages/s/core.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

# Built once: the replies carry no per-request data, and serializing a shared message is safe.
_REPLIES: dict[str, Any] = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


class NoopProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(  # noqa: N802 (the gRPC method name)
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in request_iterator:
            reply = _REPLIES.get(request.WhichOneof("request"))
            if reply is not None:
                yield reply


async def _serve(port: int) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(grace=1)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m benchkit.processor PORT", file=sys.stderr)
        return 2
    asyncio.run(_serve(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
