"""JSON request body rewrite: add ``"processed_by": "extproc"`` to a JSON object body.

Needs ``request_body_mode: BUFFERED`` (the whole body in one message). The new body has a new
length, so the reply also sets ``content-length``: in BUFFERED mode the proxy (like Envoy)
fails the request if the length and the body disagree.
"""

from __future__ import annotations

import json

from extproc.processor import Body, Continue, Headers, Mutate, Processor, StreamContext


class JsonRewriteProcessor(Processor):
    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> Continue:
        ctx.state["json"] = headers.get("content-type", "").startswith("application/json")
        return Continue()

    def on_request_body(self, ctx: StreamContext, body: Body) -> Continue | Mutate:
        if not ctx.state.get("json"):
            return Continue()
        try:
            document = json.loads(body.data)
        except ValueError:
            return Continue()  # not ours to judge: the upstream answers malformed JSON
        if not isinstance(document, dict):
            return Continue()
        document["processed_by"] = "extproc"
        new_body = json.dumps(document, separators=(",", ":")).encode()
        return Mutate(body=new_body, set_headers={"content-length": str(len(new_body))})
