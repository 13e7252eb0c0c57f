"""``mode_override``: ask for the response body only when the response is JSON.

Run the proxy with ``allow_mode_override: true`` and the response body mode NONE; for a
``content-type: application/json`` response the headers reply switches the body mode to
BUFFERED, and the body hook marks the JSON object with ``"inspected": true``. Other responses
stream through untouched and never reach the processor.
"""

from __future__ import annotations

import json

from extproc.processor import (
    Body,
    Continue,
    Decision,
    Headers,
    ModeOverride,
    Mutate,
    Processor,
    StreamContext,
)


class JsonOnlyProcessor(Processor):
    def on_response_headers(self, ctx: StreamContext, headers: Headers) -> Decision:
        if headers.get("content-type", "").split(";")[0].strip() == "application/json":
            return ModeOverride(response_body_mode="BUFFERED")
        return Continue()

    def on_response_body(self, ctx: StreamContext, body: Body) -> Decision:
        ctx.state["json_bodies"] = ctx.state.get("json_bodies", 0) + 1
        try:
            document = json.loads(body.data)
        except ValueError:
            return Continue()
        if not isinstance(document, dict):
            return Continue()
        document["inspected"] = True
        new_body = json.dumps(document).encode()
        return Mutate(body=new_body, set_headers={"content-length": str(len(new_body))})
