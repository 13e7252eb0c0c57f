"""Response header injection: security headers on every response, server banners removed.

It also shows state carried between phases: the request path seen in the request phase comes
back to the client as ``x-request-path``.
"""

from __future__ import annotations

from extproc.processor import Headers, Mutate, Processor, StreamContext

SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


class ResponseHeadersProcessor(Processor):
    def on_response_headers(self, ctx: StreamContext, headers: Headers) -> Mutate:
        return Mutate(
            set_headers={**SECURITY_HEADERS, "x-request-path": ctx.path},
            remove_headers=["server", "x-powered-by"],
        )
