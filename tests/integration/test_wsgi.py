"""ExtProcMiddleware around a plain WSGI app, served by wsgiref on loopback, with a real
gRPC processor."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import pytest

from extproc import ExtProcMiddleware, WsgiConfig
from extproc.wsgi import environ_with, request_headers
from tests.support.bodies import duplex, transform
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    immediate,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import request

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
UPPER = transform(bytes.upper)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass


class Counted:
    """An app iterable that counts its close() calls, as servers must make them."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = iter(pieces)
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        return self._pieces

    def close(self) -> None:
        self.closed += 1


class App:
    """Echoes what it saw as JSON; ``/pieces`` answers the ``x-pieces`` it is given in pieces,
    ``/gated`` waits for :attr:`gate` between its two pieces."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[dict[str, Any]] = []
        self.iterables: list[Counted] = []
        self.gate = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        self.seen.append(
            {
                "method": environ["REQUEST_METHOD"],
                "path": environ["PATH_INFO"],
                "query": environ["QUERY_STRING"],
                "content_length": environ.get("CONTENT_LENGTH"),
                "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
                "body": body.decode("latin-1"),
            }
        )
        path = environ["PATH_INFO"]
        if path == "/pieces":
            pieces = [p.encode() for p in environ.get("HTTP_X_PIECES", "").split(",")]
            start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "1")])
            result = Counted(pieces)
        elif path == "/gated":
            start_response("200 OK", [("Content-Type", "text/plain")])
            result = Counted(self._gated())
        else:
            data = json.dumps(self.seen[-1]).encode()
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
            )
            result = Counted([data])
        self.iterables.append(result)
        return result

    def _gated(self) -> Iterator[bytes]:
        yield b"first;"
        yield b"second" if self.gate.wait(TIMEOUT) else b"gate-timeout"


@contextmanager
def serving(app: App, config: WsgiConfig) -> Iterator[tuple[str, int]]:
    middleware = ExtProcMiddleware(app, config)
    server = make_server("127.0.0.1", 0, middleware, _Server, _QuietHandler)
    # A short poll interval only makes shutdown() prompt; requests are served as they come.
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="wsgiref", daemon=True
    )
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)
        middleware.close()


def config(proc: ScriptedProcessor, **overrides: Any) -> WsgiConfig:
    return WsgiConfig.from_dict({"message_timeout": "10s"}, processor=proc.address, **overrides)


def kinds(proc: ScriptedProcessor) -> list[str]:
    return [m.WhichOneof("request") for m in proc.wait_streams(1)[0].requests]


# Headers ------------------------------------------------------------------------------------


def test_request_mutations_reach_the_app() -> None:
    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.HasField("request_headers"):
                common = mutate_headers(
                    set_headers=[("x-added", "yes"), (":path", "/rewritten?q=1")],
                    remove=["x-drop"],
                )
                stream.send(matching_reply(message, common))
            else:
                stream.send(matching_reply(message))

    app = App()
    with ScriptedProcessor(handler) as proc, serving(app, config(proc)) as address:
        reply = request(address, "GET", "/orig?a=b", headers=[("x-drop", "1"), ("x-keep", "2")])
    assert reply.status == 200
    seen = app.seen[0]
    assert (seen["path"], seen["query"]) == ("/rewritten", "q=1")
    assert seen["headers"]["HTTP_X_ADDED"] == "yes"
    assert seen["headers"]["HTTP_X_KEEP"] == "2"
    assert "HTTP_X_DROP" not in seen["headers"]
    sent = proc.wait_streams(1)[0].requests[0].request_headers.headers.headers
    pseudo = {h.key: h.raw_value for h in sent if h.key.startswith(":")}
    assert pseudo == {
        ":authority": b"example.com",
        ":path": b"/orig?a=b",
        ":method": b"GET",
        ":scheme": b"http",
    }
    assert app.iterables[0].closed == 1


def test_immediate_response_skips_the_app() -> None:
    def handler(stream: ProcessorStream) -> None:
        if stream.recv() is not None:
            stream.send(immediate(403, b"denied", headers=[("x-why", "policy")]))

    app = App()
    with ScriptedProcessor(handler) as proc, serving(app, config(proc)) as address:
        reply = request(address, "POST", "/", body=b"payload")
    assert (reply.status, reply.body, reply.header("x-why")) == (403, b"denied", "policy")
    assert app.calls == 0


def test_response_header_mutation() -> None:
    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            common = None
            if message.HasField("response_headers"):
                common = mutate_headers(set_headers=[("x-resp", "added")], remove=["x-app"])
            stream.send(matching_reply(message, common))

    app = App()
    with ScriptedProcessor(handler) as proc, serving(app, config(proc)) as address:
        reply = request(address, "GET", "/pieces", headers=[("x-pieces", "a,b")])
    assert (reply.status, reply.body) == (200, b"ab")
    assert reply.header("x-resp") == "added"
    assert reply.header("x-app") is None
    assert kinds(proc) == ["request_headers", "response_headers"]
    assert app.iterables[0].closed == 1


# Bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["buffered", "streamed"])
def test_request_body_transformed(mode: str) -> None:
    app = App()
    body = b"hello world " * 10_000  # over one read
    with (
        ScriptedProcessor(UPPER) as proc,
        serving(app, config(proc, request_body_mode=mode)) as address,
    ):
        reply = request(address, "POST", "/", body=body)
    assert reply.status == 200
    assert app.seen[0]["body"] == body.upper().decode()
    assert app.seen[0]["content_length"] == str(len(body))
    sent = [m.request_body.body for m in proc.wait_streams(1)[0].requests if m.request_body.body]
    assert b"".join(sent) == body
    assert len(sent) == (1 if mode == "buffered" else -(-len(body) // (64 * 1024)))


@pytest.mark.parametrize("mode", ["buffered", "streamed"])
def test_response_body_transformed(mode: str) -> None:
    app = App()
    with (
        ScriptedProcessor(UPPER) as proc,
        serving(app, config(proc, response_body_mode=mode)) as address,
    ):
        reply = request(address, "GET", "/pieces", headers=[("x-pieces", "ab,cd,ef")])
    assert (reply.status, reply.body) == (200, b"ABCDEF")
    sent = [m.response_body.body for m in proc.wait_streams(1)[0].requests if m.response_body.body]
    assert sent == ([b"abcdef"] if mode == "buffered" else [b"ab", b"cd", b"ef"])
    assert app.iterables[0].closed == 1


@pytest.mark.parametrize("mode", ["none", "streamed"])
def test_streaming_response_stays_streaming(mode: str) -> None:
    """The second piece is produced only once the client holds the first."""
    app = App()
    with (
        ScriptedProcessor(UPPER) as proc,
        serving(app, config(proc, response_body_mode=mode)) as address,
        socket.create_connection(address, timeout=TIMEOUT) as sock,
    ):
        sock.sendall(b"GET /gated HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while b"first;" not in received.lower():
            chunk = sock.recv(65536)
            assert chunk, f"closed before the first piece: {received!r}"
            received += chunk
        app.gate.set()
        while chunk := sock.recv(65536):
            received += chunk
    expected = b"second" if mode == "none" else b"SECOND"
    assert expected in received
    assert app.iterables[0].closed == 1


# Failures -----------------------------------------------------------------------------------


def _abort(stream: ProcessorStream) -> None:
    if stream.recv() is not None:
        stream.abort(grpc.StatusCode.INTERNAL, "boom")


def test_processor_failure_fails_closed() -> None:
    app = App()
    with ScriptedProcessor(_abort) as proc, serving(app, config(proc)) as address:
        reply = request(address, "GET", "/")
    assert reply.status == 500
    assert app.calls == 0


def test_processor_failure_fails_open() -> None:
    app = App()
    with (
        ScriptedProcessor(_abort) as proc,
        serving(app, config(proc, failure_mode_allow=True)) as address,
    ):
        reply = request(address, "POST", "/", body=b"data")
    assert reply.status == 200
    assert app.seen[0]["body"] == "data"
    assert app.iterables[0].closed == 1


def test_response_phase_failure_still_closes_the_app_iterable() -> None:
    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            if message.HasField("response_headers"):
                stream.abort(grpc.StatusCode.UNAVAILABLE, "gone")
                return
            stream.send(matching_reply(message))

    app = App()
    with ScriptedProcessor(handler) as proc, serving(app, config(proc)) as address:
        reply = request(address, "GET", "/pieces", headers=[("x-pieces", "a")])
    assert reply.status == 500
    assert app.calls == 1
    assert app.iterables[0].closed == 1


def test_silent_processor_times_out_with_504() -> None:
    def silent(stream: ProcessorStream) -> None:
        stream.wait_ended()

    app = App()
    with ScriptedProcessor(silent) as proc:
        cfg = WsgiConfig.from_dict({"message_timeout": "0.2s"}, processor=proc.address)
        with serving(app, cfg) as address:
            reply = request(address, "GET", "/")
    assert reply.status == 504
    assert app.calls == 0


def test_full_duplex_both_directions() -> None:
    app = App()
    modes = {
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
    }
    ext_proc = {
        "message_timeout": "10s",
        "processing_mode": {
            **modes,
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        },
    }
    with (
        ScriptedProcessor(duplex(bytes.upper)) as proc,
        serving(app, WsgiConfig.from_dict(ext_proc, processor=proc.address)) as address,
    ):
        reply = request(address, "POST", "/pieces", headers=[("x-pieces", "ab,cd")], body=b"up")
    assert (reply.status, reply.body) == (200, b"ABCD")
    assert app.seen[0]["body"] == "UP"


def test_script_name_round_trip() -> None:
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/mount",
        "PATH_INFO": "/a b",
        "QUERY_STRING": "x=1",
        "HTTP_HOST": "h",
        "HTTP_COOKIE": "a=1",
        "CONTENT_TYPE": "text/plain",
        "wsgi.url_scheme": "https",
    }
    headers = request_headers(environ)
    assert headers.get(b":path") == b"/mount/a%20b?x=1"
    assert headers.get(b":scheme") == b"https"
    assert headers.get(b"content-type") == b"text/plain"
    headers.add(b"cookie", b"b=2")
    headers.set(b":path", b"/mount/other?y=2")
    out = environ_with(environ, headers)
    assert (out["SCRIPT_NAME"], out["PATH_INFO"], out["QUERY_STRING"]) == (
        "/mount",
        "/other",
        "y=2",
    )
    assert out["HTTP_COOKIE"] == "a=1; b=2"
    headers.set(b":path", b"/elsewhere")
    out = environ_with(environ, headers)
    assert (out["SCRIPT_NAME"], out["PATH_INFO"]) == ("", "/elsewhere")


def test_gunicorn_sync_workers_after_a_preloading_fork(tmp_path: Any) -> None:
    """Pre-forking: the app (and the middleware) is built in gunicorn's master, each sync
    worker then opens its own gRPC channel."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.fail("gunicorn is not installed in the test venv (setup.cfg dev extras)")

    def tag(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            common = None
            if message.WhichOneof("request") == "request_headers":
                common = mutate_headers(set_headers=[("x-tagged", "yes")])
            stream.send(matching_reply(message, common))

    with ScriptedProcessor(tag) as proc:
        env = {**os.environ, "EXTPROC_TEST_PROCESSOR": proc.address}
        with subprocess.Popen(
            [
                str(gunicorn),
                "--preload",
                "--workers",
                "2",
                "--worker-class",
                "sync",
                "--bind",
                "127.0.0.1:0",
                "--chdir",
                str(Path(__file__).parents[2]),
                "tests.support.wsgi_app:application",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        ) as server:
            stdout = server.stdout
            assert stdout is not None
            lines: list[str] = []
            ready = threading.Event()

            def read() -> None:
                for line in stdout:
                    lines.append(line)
                    text = "".join(lines)
                    if "Listening at" in text and text.count("Booting worker") >= 2:
                        ready.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            ready.wait(30)
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", "".join(lines))
            port = int(match[1]) if match else 0
            try:
                assert port, "".join(lines)
                replies = [request(("127.0.0.1", port), "GET", f"/{i}") for i in range(6)]
            finally:
                server.terminate()
                server.wait(30)
                reader.join(10)
    assert all(r.status == 200 for r in replies)
    seen = [json.loads(r.body) for r in replies]
    assert all(s["headers"].get("HTTP_X_TAGGED") == "yes" for s in seen)
    assert len(proc.streams) == 6
