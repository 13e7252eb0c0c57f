"""ExtProcMiddleware around a plain WSGI app, served by wsgiref on loopback, with a real
gRPC processor."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import h11
import pytest
import yaml

from extproc import ExtProcMiddleware
from extproc.config import FilterConfig
from extproc.demo.upstream import pattern
from extproc.errors import ConfigError, RequestStopped
from extproc.wsgi import environ_with, filter_config, request_headers
from tests.support.bodies import body_reply, duplex, duplex_per_chunk, streamed_body, transform
from tests.support.gunicorn import running_gunicorn
from tests.support.processor import (
    ProcessorStream,
    ScriptedProcessor,
    immediate,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import request
from tests.support.wsgi_relay import serving_wsgi

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
UPPER = transform(bytes.upper)


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
        body = read_body(environ)
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


def read_body(environ: dict[str, Any]) -> bytes:
    """As werkzeug reads it: CONTENT_LENGTH bytes, or to the end with wsgi.input_terminated."""
    length = environ.get("CONTENT_LENGTH")
    if not length and environ.get("wsgi.input_terminated"):
        return bytes(environ["wsgi.input"].read())
    return bytes(environ["wsgi.input"].read(int(length or 0)))


@contextmanager
def serving(app: Any, config: FilterConfig) -> Iterator[tuple[str, int]]:
    """The app behind the middleware, served by wsgiref (chunked request bodies too)."""
    with serving_wsgi(ExtProcMiddleware(app, config)) as address:
        yield address


def config(proc: ScriptedProcessor, **options: Any) -> FilterConfig:
    return filter_config({"message_timeout": "10s"}, {"processor": proc.address, **options})


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


# One line: a file, a dict, or keyword options ---------------------------------------------


def tagging(stream: ProcessorStream) -> None:
    while (message := stream.recv()) is not None:
        common = None
        if message.HasField("request_headers"):
            common = mutate_headers(set_headers=[("x-tagged", "yes")])
        stream.send(matching_reply(message, common))


@pytest.mark.parametrize("form", ["path", "dict", "keywords"])
def test_the_middleware_in_one_line(form: str, tmp_path: Path) -> None:
    """``ExtProcMiddleware(app, "filter.yaml")``, ``(app, {...})`` and ``(app, processor=...,
    ...)`` each run the filter: the processor tags the request, and the SKIP response mode
    given each way leaves the response unprocessed."""
    app = App()
    with ScriptedProcessor(tagging) as proc:
        ext_proc = {
            "grpc_service": {"google_grpc": {"target_uri": proc.address}},
            "message_timeout": "10s",
            "processing_mode": {"response_header_mode": "SKIP"},
        }
        if form == "path":
            path = tmp_path / "filter.yaml"
            path.write_text(yaml.safe_dump(ext_proc))
            middleware = ExtProcMiddleware(app, str(path))
        elif form == "dict":
            middleware = ExtProcMiddleware(app, ext_proc)
        else:
            middleware = ExtProcMiddleware(
                app, processor=proc.address, message_timeout="10s", response_header_mode="skip"
            )
        with serving_wsgi(middleware) as address:
            reply = request(address, "GET", "/")
        assert reply.status == 200
        assert app.seen[0]["headers"]["HTTP_X_TAGGED"] == "yes"
        assert kinds(proc) == ["request_headers"]
        middleware.close()


@pytest.mark.parametrize(
    ("source", "options", "error"),
    [
        (
            {"processing_mode": {"request_body_mode": "GRPC"}},
            {"processor": "127.0.0.1:1"},
            "ext_proc.processing_mode.request_body_mode: GRPC is for gRPC traffic",
        ),
        ({}, {"processor": "127.0.0.1:1", "message_timeout": "soon"}, "--message-timeout:"),
        ({}, {}, "--processor: no processor: give --processor or a grpc_service"),
        (
            None,
            {"processor": "127.0.0.1:1", "listen": ":8080"},
            "--listen: is not an option of the WSGI middleware",
        ),
        (None, {"processor": "127.0.0.1:1", "thread": 3}, "--thread: is not an option of extproc"),
    ],
)
def test_bad_middleware_config_names_the_field(
    source: dict[str, Any] | None, options: dict[str, Any], error: str
) -> None:
    """The same errors as the command line's, naming the field or flag."""
    with pytest.raises(ConfigError) as info:
        ExtProcMiddleware(App(), source, **options)
    assert str(info.value).startswith(error)


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        ExtProcMiddleware(App(), "/nonexistent/filter.yaml")
    assert str(info.value).startswith("--config: cannot read /nonexistent/filter.yaml")


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
    # Streamed, the processor may change each piece: the length is unknown until the end, so
    # the app reads to the end (wsgi.input_terminated), as the proxy sends chunked upstream.
    assert app.seen[0]["content_length"] == (str(len(body)) if mode == "buffered" else None)
    sent = [m.request_body.body for m in proc.wait_streams(1)[0].requests if m.request_body.body]
    # One message in both modes: a body of known length within the buffer limit is taken as
    # arrived when the headers reply comes, and sent whole (as the proxy sends one that came
    # with the head).
    assert sent == [body]


@pytest.mark.parametrize(("method", "length"), [("POST", "0"), ("PUT", "0"), ("GET", None)])
def test_bodiless_request_length_as_the_proxy_frames_it(method: str, length: str | None) -> None:
    """The streamed mode drops content-length: 0, and the app still gets the length of an
    empty body when its method may have one (the proxy writes it upstream, as Envoy does)."""
    app = App()
    headers = [("content-length", "0")] if method != "GET" else []
    with (
        ScriptedProcessor(UPPER) as proc,
        serving(app, config(proc, request_body_mode="streamed")) as address,
    ):
        reply = request(address, method, "/", headers=headers)
    assert reply.status == 200
    assert app.seen[0]["content_length"] == length


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


class StreamingReader:
    """Reads wsgi.input in small pieces, signalling the first one, and answers how much it
    read; ``stop_after`` > 0 answers as soon as that much was read (leaving the rest)."""

    def __init__(self, stop_after: int = 0) -> None:
        self.first_piece = threading.Event()
        self.received = bytearray()
        self.errors: list[BaseException] = []
        self.stop_after = stop_after

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        try:
            while piece := stream.read(4096):
                self.received += piece
                self.first_piece.set()
                if self.stop_after and len(self.received) >= self.stop_after:
                    break
        except Exception as err:
            self.errors.append(err)
            raise
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(self.received)).encode()]


def send_in_two_parts(
    address: tuple[str, int], first: bytes, rest: bytes, between: threading.Event
) -> tuple[int, bytes, bool]:
    """POST a chunked body: ``first``, then, once ``between`` is set (or TIMEOUT), ``rest``.
    The status and body of the reply, and whether ``between`` was set in time."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "example.com"), ("transfer-encoding", "chunked")]
        sock.sendall(conn.send(h11.Request(method="POST", target="/", headers=head)) or b"")
        sock.sendall(conn.send(h11.Data(data=first)) or b"")
        in_time = between.wait(TIMEOUT)

        def send_rest() -> None:
            with contextlib.suppress(OSError):  # a local reply may close the connection early
                for start in range(0, len(rest), 64 * 1024):
                    sock.sendall(conn.send(h11.Data(data=rest[start : start + 64 * 1024])) or b"")
                sock.sendall(conn.send(h11.EndOfMessage()) or b"")

        # The rest goes on its own thread: a server that answers without reading it all must
        # not leave this client stuck in sendall until its timeout, unable to read the answer.
        sender = threading.Thread(target=send_rest, daemon=True)
        sender.start()
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                with contextlib.suppress(OSError):  # ends a sendall still blocked on the thread
                    sock.shutdown(socket.SHUT_RDWR)
                sender.join(TIMEOUT)
                return status, bytes(body), in_time


def test_streamed_request_body_reaches_the_app_while_it_arrives() -> None:
    """A body many times the buffer limit: the app reads its first piece before the client
    sent the rest (the middleware does not collect it), and gets all of it, processed."""
    first, rest = b"a" * 16 * 1024, pattern(1024 * 1024).lower()
    app = StreamingReader()
    overrides = {"request_body_mode": "STREAMED", "buffer_limit_bytes": 1024}
    with ScriptedProcessor(UPPER) as proc, serving(app, config(proc, **overrides)) as address:
        status, body, in_time = send_in_two_parts(address, first, rest, app.first_piece)
    assert in_time, "the app was not called before the whole body arrived"
    assert (status, body) == (200, str(len(first) + len(rest)).encode())
    assert bytes(app.received) == (first + rest).upper()


def test_full_duplex_request_body_streams_to_the_app() -> None:
    """FULL_DUPLEX_STREAMED, a body many times the buffer limit, streamed back per piece:
    the app reads it all, processed. (When the app is called depends on the processor: the
    head goes on with the first body piece it streams back; docs/embedding.md.)"""
    body = pattern(1024 * 1024).lower()
    app = StreamingReader()
    sent = threading.Event()
    sent.set()
    overrides = {
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "buffer_limit_bytes": 1024,
    }
    with (
        ScriptedProcessor(duplex_per_chunk(bytes.upper)) as proc,
        serving(app, config(proc, **overrides)) as address,
    ):
        status, reply, _ = send_in_two_parts(address, body[:1000], body[1000:], sent)
    assert (status, reply) == (200, str(len(body)).encode())
    assert bytes(app.received) == body.upper()


def test_app_reading_a_body_the_processor_stops() -> None:
    """An immediate response to a STREAMED body piece while the app reads: its read raises
    RequestStopped, and the client gets the immediate response, not the app's answer."""

    def stop_second_piece(stream: ProcessorStream) -> None:
        pieces = 0
        while (message := stream.recv()) is not None:
            if message.WhichOneof("request") == "request_body":
                pieces += 1
                if pieces == 2:
                    stream.send(immediate(413, b"too much", details="stopped"))
                    continue
            stream.send(matching_reply(message))

    app = StreamingReader()
    with (
        ScriptedProcessor(stop_second_piece) as proc,
        serving(app, config(proc, request_body_mode="STREAMED")) as address,
    ):
        # The first part fills the app's first read(4096), so the rest goes once it read it.
        status, body, in_time = send_in_two_parts(
            address, b"x" * 4096, b"y" * 200_000, app.first_piece
        )
    assert in_time
    assert (status, body) == (413, b"too much")
    assert [type(e) for e in app.errors] == [RequestStopped]


def test_unread_body_is_drained_through_the_processor() -> None:
    """An app that answers before reading the whole body: the rest still goes through the
    exchange (the processor sees the body to its end, as behind the proxy), then is dropped."""
    app = StreamingReader(stop_after=4096)
    with (
        ScriptedProcessor(UPPER) as proc,
        serving(app, config(proc, request_body_mode="STREAMED")) as address,
    ):
        status, body, _ = send_in_two_parts(address, b"x" * 4096, b"y" * 300_000, app.first_piece)
        messages = proc.wait_streams(1)[0].requests
    assert (status, body) == (200, b"4096")
    sent = [m.request_body for m in messages if m.HasField("request_body")]
    assert b"".join(b.body for b in sent) == b"x" * 4096 + b"y" * 300_000
    assert sent[-1].end_of_stream


def test_wsgi_input_lines() -> None:
    """wsgi.input's readline, readlines and iteration (PEP 3333) over a processed body."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        seen.append([stream.readline(), stream.readline(3), stream.readlines(1), list(stream)])
        start_response("204 No Content", [])
        return []

    body = b"one\ntwo\nthree\nfour\nfive"
    with (
        ScriptedProcessor(UPPER) as proc,
        serving(app, config(proc, request_body_mode="STREAMED")) as address,
    ):
        assert request(address, "POST", "/", body=body).status == 204
    assert seen == [[b"ONE\n", b"TWO", [b"\n"], [b"THREE\n", b"FOUR\n", b"FIVE"]]]


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
        cfg = filter_config({"message_timeout": "0.2s"}, {"processor": proc.address})
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
        serving(app, filter_config(ext_proc, {"processor": proc.address})) as address,
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


def test_gunicorn_sync_workers_after_a_preloading_fork() -> None:
    """Pre-forking: the app (and the middleware) is built in gunicorn's master, each sync
    worker then opens its own gRPC channel."""

    def tag(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            common = None
            if message.WhichOneof("request") == "request_headers":
                common = mutate_headers(set_headers=[("x-tagged", "yes")])
            stream.send(matching_reply(message, common))

    with (
        ScriptedProcessor(tag) as proc,
        running_gunicorn({"EXTPROC_TEST_PROCESSOR": proc.address}, workers=2) as address,
    ):
        replies = [request(address, "GET", f"/{i}") for i in range(6)]
    assert all(r.status == 200 for r in replies)
    seen = [json.loads(r.body) for r in replies]
    assert all(s["headers"].get("HTTP_X_TAGGED") == "yes" for s in seen)
    assert len(proc.streams) == 6


# Chunked request bodies under gunicorn ------------------------------------------------------

BODY_MODES = ("NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED")
CHUNKS = [b"first chunk, ", b"second chunk, ", b"third chunk"]


def uppercase_by_route(stream: ProcessorStream) -> None:
    """Uppercase each request body message, as the route's body mode wants the answer."""
    duplex_mode = False
    while (message := stream.recv()) is not None:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            path = {h.key: h.raw_value for h in message.request_headers.headers.headers}
            duplex_mode = path[":path"].endswith(b"FULL_DUPLEX_STREAMED")
            stream.send(matching_reply(message))
        elif kind == "request_body" and duplex_mode:
            part = message.request_body
            stream.send(streamed_body("request", part.body.upper(), part.end_of_stream))
        elif kind == "request_body":
            stream.send(body_reply(message, message.request_body.body.upper()))
        else:
            stream.send(matching_reply(message))


def processing_mode(body_mode: str) -> dict[str, str]:
    mode = {"request_body_mode": body_mode}
    if body_mode == "FULL_DUPLEX_STREAMED":
        mode["request_trailer_mode"] = "SEND"  # as Envoy requires
    return mode


def test_gunicorn_chunked_request_body_in_each_body_mode() -> None:
    """gunicorn de-chunks a Transfer-Encoding: chunked body and sets wsgi.input_terminated,
    without a CONTENT_LENGTH; the middleware reads it to its end in every body mode."""
    routes = [
        {"prefix": f"/{mode}", "overrides": {"processing_mode": processing_mode(mode)}}
        for mode in BODY_MODES
    ]
    file = {"ext_proc": {"message_timeout": "10s"}, "routes": routes}
    with (
        ScriptedProcessor(uppercase_by_route) as proc,
        running_gunicorn(
            {"EXTPROC_TEST_PROCESSOR": proc.address, "EXTPROC_TEST_CONFIG": json.dumps(file)}
        ) as address,
    ):
        replies = {
            mode: request(address, "POST", f"/{mode}", body=list(CHUNKS)) for mode in BODY_MODES
        }
        streams = proc.wait_streams(len(BODY_MODES))
    whole = b"".join(CHUNKS)
    seen = {mode: json.loads(reply.body) for mode, reply in replies.items()}
    assert {mode: reply.status for mode, reply in replies.items()} == dict.fromkeys(BODY_MODES, 200)
    expected = {mode: whole.upper().decode() for mode in BODY_MODES} | {"NONE": whole.decode()}
    assert {mode: s["body"] for mode, s in seen.items()} == expected
    # No length, as the proxy sends such a body upstream chunked: the app reads to the end.
    assert {s["content_length"] for s in seen.values()} == {None}
    sent = []
    for stream in streams:
        bodies = [m.request_body for m in stream.requests if m.HasField("request_body")]
        sent.append(b"".join(b.body for b in bodies))
        assert [b.end_of_stream for b in bodies][-1:] in ([True], [])
    # Every mode but NONE sent the processor the whole body.
    assert sorted(sent) == [b""] + [whole] * (len(BODY_MODES) - 1)
