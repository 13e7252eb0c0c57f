"""An http_service processor for tests: a threaded HTTP/1.1 server that decodes each POSTed
ProcessingRequest, records it with the POST's headers and connection, and answers as its
handler says."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

# What the processor answers: a reply (sent as 200 JSON), or a status and raw body.
Answer: TypeAlias = "ep.ProcessingResponse | tuple[int, bytes]"
Handler = Callable[[ep.ProcessingRequest], Answer]


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]
    json: dict[str, Any]
    message: ep.ProcessingRequest
    connection: int  # which connection carried it, numbered from 0


class HttpProcessor:
    """``with HttpProcessor(handler) as proc:`` then ``proc.uri("/process")``."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.posts: list[Post] = []
        self.connections = 0
        self._lock = threading.Lock()
        owner = self

        class Handle(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    self.number = owner.connections
                    owner.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                decoded = json.loads(body)
                message = json_format.Parse(body, ep.ProcessingRequest())
                post = Post(self.path, dict(self.headers.items()), decoded, message, self.number)
                with owner._lock:
                    owner.posts.append(post)
                answer = owner.handler(message)
                status, data = (
                    (200, json_format.MessageToJson(answer).encode())
                    if isinstance(answer, ep.ProcessingResponse)
                    else answer
                )
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def uri(self, path: str = "/process", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> HttpProcessor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def http_service(uri: str, timeout: str = "10s", **extra: Any) -> dict[str, Any]:
    """The filter's http_service for ``uri``."""
    return {
        "http_service": {
            "http_uri": {"uri": uri, "cluster": "ext_proc", "timeout": timeout},
            **extra,
        }
    }
