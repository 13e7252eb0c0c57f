"""Body redaction: digits of card-number-like sequences become ``X``, both directions.

Works with ``request_body_mode``/``response_body_mode`` BUFFERED (the whole body at once) or
STREAMED (piece by piece). Redaction keeps the length, so no ``content-length`` fix is needed.
In STREAMED mode a number may straddle two pieces: the tail of a piece that could still be the
start of a number is held back and sent with the next piece (the total stays the same).
"""

from __future__ import annotations

import re

from extproc.processor import Body, Mutate, Processor, StreamContext

# 13 to 19 digits, optionally grouped by single spaces or dashes.
CARD = re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
# What may still grow into a card number at the end of a piece.
_OPEN_TAIL = re.compile(rb"[0-9](?:[ -]?[0-9])*[ -]?$")


def redact(data: bytes) -> bytes:
    return CARD.sub(lambda m: re.sub(rb"[0-9]", b"X", m.group()), data)


class RedactProcessor(Processor):
    def on_request_body(self, ctx: StreamContext, body: Body) -> Mutate:
        return self._redact(ctx, "request", body)

    def on_response_body(self, ctx: StreamContext, body: Body) -> Mutate:
        return self._redact(ctx, "response", body)

    def _redact(self, ctx: StreamContext, direction: str, body: Body) -> Mutate:
        key = f"redact.{direction}.held"
        data = ctx.state.pop(key, b"") + body.data
        if not body.end_of_stream:
            tail = _OPEN_TAIL.search(data)
            if tail is not None:
                data, ctx.state[key] = data[: tail.start()], data[tail.start() :]
        return Mutate(body=redact(data))
