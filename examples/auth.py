"""Header mutations and an auth check answered by the processor itself.

A request without ``authorization: Bearer <token>`` gets 403 without reaching the upstream.
Otherwise the token is replaced by an ``x-user`` header for the upstream, the client's
``x-internal-*`` style debug header is stripped, and the request is tagged.
"""

from __future__ import annotations

from extproc.processor import Headers, Mutate, Processor, RespondError, StreamContext


class AuthProcessor(Processor):
    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> Mutate:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RespondError(
                403,
                "missing or invalid authorization\n",
                headers={"www-authenticate": "Bearer"},
                details="auth_missing",
            )
        return Mutate(
            set_headers={"x-user": token, "x-auth": "checked"},
            append_headers=[("via-processor", "auth")],
            remove_headers=["authorization", "x-debug"],
        )
