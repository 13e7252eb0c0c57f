"""The soak's body-transforming processor: every body byte XORed with 0x5A, both ways.

XOR is its own inverse: the upstream gets the client's body transformed, and the client gets
the upstream's echo transformed back, so any byte lost, repeated or reordered on either pass
through the proxy shows in the client's comparison. Same length in, same length out, so a
BUFFERED body keeps its Content-Length. Served by the SDK:

    extproc-processor benchkit.xor_processor:XorProcessor --listen 127.0.0.1:9000
"""

from __future__ import annotations

from extproc.processor import Body, Continue, Mutate, Processor, StreamContext

KEY = 0x5A
_TABLE = bytes(b ^ KEY for b in range(256))


def xor(data: bytes) -> bytes:
    return data.translate(_TABLE)


class XorProcessor(Processor):
    def on_request_body(self, ctx: StreamContext, body: Body) -> Mutate | Continue:
        return Mutate(body=xor(body.data)) if body.data else Continue()

    def on_response_body(self, ctx: StreamContext, body: Body) -> Mutate | Continue:
        return Mutate(body=xor(body.data)) if body.data else Continue()
