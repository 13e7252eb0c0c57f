"""extproc.processor.wsgi_app called as a WSGI server calls it, without a network: the JSON both
ways, which stream ids keep their ctx and for how long, and how bodies are read."""

from __future__ import annotations

import io
import json
from typing import Any
from wsgiref.util import setup_testing_defaults

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from examples.auth import AuthProcessor
from examples.response_headers import ResponseHeadersProcessor
from extproc.processor import wsgi_app
from extproc.processor.testing import request_headers, response_headers, set_headers
from extproc.processor.wsgi import MAX_BODY_BYTES, WsgiApp

ENVOY_REQUEST_HEADERS = (
    b'{"request_headers":{"headers":{"headers":[{"key":":path","raw_value":"L2hp"}]},'
    b'"end_of_stream":true},"metadata_context":{},"protocol_config":{}}'
)


def call(app: WsgiApp, body: bytes, **environ: Any) -> tuple[str, dict[str, str], bytes]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        **environ,
    }
    setup_testing_defaults(env)
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    chunks = app(env, lambda status, headers: seen.append((status, headers)))
    ((status, headers),) = seen
    return status, dict(headers), b"".join(chunks)


def exchange(app: WsgiApp, request: ep.ProcessingRequest, stream_id: str) -> ep.ProcessingResponse:
    body = json_format.MessageToJson(request, preserving_proto_field_name=True).encode()
    status, headers, answer = call(app, body, HTTP_X_REQUEST_ID=stream_id)
    assert status == "200 OK" and headers["content-type"] == "application/json", answer
    return json_format.Parse(answer, ep.ProcessingResponse())


def carried_path(app: WsgiApp, stream_id: str) -> str:
    reply = exchange(app, response_headers({":status": "200"}), stream_id)
    return set_headers(reply)["x-request-path"]


def test_envoys_json_in_snake_case_json_out() -> None:
    status, headers, body = call(wsgi_app(AuthProcessor), ENVOY_REQUEST_HEADERS)
    assert status == "200 OK" and int(headers["content-length"]) == len(body)
    # Proto field names, as Envoy writes them (it reads either spelling); bytes in base64.
    immediate = json.loads(body)["immediate_response"]
    assert immediate["status"] == {"code": "Forbidden"} and immediate["details"] == "auth_missing"
    assert immediate["headers"]["set_headers"][0]["header"] == {
        "key": "www-authenticate",
        "raw_value": "QmVhcmVy",
    }


def test_the_oldest_stream_is_forgotten_past_the_bound() -> None:
    app = wsgi_app(ResponseHeadersProcessor, max_streams=2)
    for stream_id in ("a", "b", "c"):
        exchange(app, request_headers({":path": f"/{stream_id}"}), stream_id)
    assert carried_path(app, "a") == ""
    assert carried_path(app, "c") == "/c" and carried_path(app, "b") == "/b"


def test_a_stream_is_forgotten_after_its_response_headers() -> None:
    app = wsgi_app(ResponseHeadersProcessor(), max_streams=1)
    exchange(app, request_headers({":path": "/once"}), "s")
    assert carried_path(app, "s") == "/once"
    assert carried_path(app, "s") == ""


def test_a_body_without_length_needs_a_dechunking_server() -> None:
    app = wsgi_app(ResponseHeadersProcessor)
    status, _, body = call(app, ENVOY_REQUEST_HEADERS, CONTENT_LENGTH="")
    assert status.startswith("411") and b"content-length required" in body
    terminated = call(
        app, ENVOY_REQUEST_HEADERS, CONTENT_LENGTH="", **{"wsgi.input_terminated": True}
    )
    assert terminated[0] == "200 OK"


def test_oversized_bodies_are_refused_unread() -> None:
    app = wsgi_app(ResponseHeadersProcessor)
    status, _, _ = call(app, b"", CONTENT_LENGTH=str(MAX_BODY_BYTES + 1))
    assert status.startswith("413")
    huge = b" " * (MAX_BODY_BYTES + 1)
    status, _, _ = call(app, huge, CONTENT_LENGTH="", **{"wsgi.input_terminated": True})
    assert status.startswith("413")


def test_any_content_type_is_read_as_json() -> None:
    status, _, _ = call(wsgi_app(ResponseHeadersProcessor), ENVOY_REQUEST_HEADERS, CONTENT_TYPE="")
    assert status == "200 OK"


def test_observability_mode_still_answers_a_json_body() -> None:
    request = request_headers({":path": "/"})
    request.observability_mode = True
    assert exchange(wsgi_app(ResponseHeadersProcessor), request, "o") == ep.ProcessingResponse()


def test_a_target_string_is_imported() -> None:
    app = wsgi_app("examples.response_headers:ResponseHeadersProcessor")
    exchange(app, request_headers({":path": "/named"}), "n")
    assert carried_path(app, "n") == "/named"
