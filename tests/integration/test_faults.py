"""Faults of the processor and of the upstream, one test each, over real sockets.

Each test checks what the client gets, that the stats counter naming the fault moved, that no
worker thread is lost and that the next request works. The proxy runs with a single worker
thread: had the fault kept it, the next request could not be served. The proxy's own threads
(``extproc-*``) are counted after a first good request and again after the next one: the
fault must not leave any behind.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.demo.upstream import EchoUpstream
from extproc.io.server import ProxyServer
from tests.support.processor import ProcessorStream, ScriptedProcessor, matching_reply
from tests.support.proxy import REPO, Client, raw_exchange, request, running_proxy, status_of
from tests.support.rawpeer import (
    FaultyUpstream,
    Script,
    answer_then_close,
    answer_then_hold,
    answer_then_serve,
    reset,
)

pytestmark = pytest.mark.integration

EXT = "http.ingress.ext_proc."
CLUSTER = "cluster.upstream."
WAIT_S = 30.0


def proxy_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("extproc-"))


@contextmanager
def single_worker_proxy(
    upstream: tuple[str, int], processor: str, **overrides: Any
) -> Iterator[ProxyServer]:
    with running_proxy(upstream, processor, threads=1, **overrides) as proxy:
        yield proxy


def counters(proxy: ProxyServer) -> dict[str, float]:
    return proxy.stats.snapshot()


def settled(proxy: ProxyServer) -> tuple[int, dict[str, float]]:
    """The proxy's thread count and stats once no request is in flight (a request's stats are
    counted after its reply went out)."""
    assert proxy.wait_idle(WAIT_S)
    return proxy_threads(), counters(proxy)


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The counters that changed, by how much (histograms left out)."""
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if after[name] != before.get(name, 0) and not name.endswith((".count", ".sum"))
    }


def assert_recovered(proxy: ProxyServer, baseline_threads: int, expect: bytes | None) -> None:
    """No worker is left serving, the only worker serves the next request, no thread leaked."""
    assert proxy.wait_idle(WAIT_S), "a worker thread is still held after the fault"
    reply = request(proxy.address, "GET", "/next")
    assert reply.status == 200
    if expect is not None:
        assert reply.body == expect
    assert proxy.wait_idle(WAIT_S)
    assert proxy_threads() <= baseline_threads


# Processor faults ---------------------------------------------------------------------------


def answer_continue(stream: ProcessorStream) -> None:
    while (message := stream.recv(WAIT_S)) is not None:
        stream.send(matching_reply(message))


def on_faulty(fault: Callable[[ProcessorStream, ep.ProcessingRequest], bool]) -> Any:
    """Answer CONTINUE, except that requests to /fault go to ``fault`` (True: stream over)."""

    def handler(stream: ProcessorStream) -> None:
        faulty = False
        while (message := stream.recv(WAIT_S)) is not None:
            if message.WhichOneof("request") == "request_headers":
                path = next(
                    h.raw_value for h in message.request_headers.headers.headers if h.key == ":path"
                )
                faulty = path.startswith(b"/fault")
            if faulty and fault(stream, message):
                return
            if not faulty or message.WhichOneof("request") != "request_headers":
                stream.send(matching_reply(message))

    return handler


def stall(release: threading.Event) -> Callable[[ProcessorStream, ep.ProcessingRequest], bool]:
    def fault(stream: ProcessorStream, message: ep.ProcessingRequest) -> bool:
        release.wait(WAIT_S)
        return True

    return fault


def send_and_continue(
    response: ep.ProcessingResponse,
) -> Callable[[ProcessorStream, ep.ProcessingRequest], bool]:
    """The request headers get ``response`` instead of their reply; the stream goes on."""

    def fault(stream: ProcessorStream, message: ep.ProcessingRequest) -> bool:
        if message.WhichOneof("request") == "request_headers":
            stream.send(response)
        return False

    return fault


def duplicate_reply(stream: ProcessorStream, message: ep.ProcessingRequest) -> bool:
    """A second request-headers reply right after the first: it meets the response phase."""
    if message.WhichOneof("request") == "request_headers":
        stream.send(matching_reply(message))
        stream.send(matching_reply(message))
    return False


def reply_after_end(stream: ProcessorStream, message: ep.ProcessingRequest) -> bool:
    """Everything answered, then one more reply once the exchange is over."""
    if message.WhichOneof("request") == "request_headers":
        stream.send(matching_reply(message))
        return False
    stream.send(matching_reply(message))
    stream.send(ep.ProcessingResponse(request_headers=ep.HeadersResponse()))
    return True


GARBAGE = {
    # A ProcessingResponse with no oneof set at all.
    "empty-oneof": (
        send_and_continue(ep.ProcessingResponse()),
        500,
        "spurious_msgs_received",
        False,
    ),
    # The response-headers reply to the request headers.
    "wrong-phase": (
        send_and_continue(ep.ProcessingResponse(response_headers=ep.HeadersResponse())),
        500,
        "spurious_msgs_received",
        False,
    ),
    # A request-body reply where no body is processed.
    "wrong-oneof-body": (
        send_and_continue(ep.ProcessingResponse(request_body=ep.BodyResponse())),
        500,
        "spurious_msgs_received",
        False,
    ),
    # Met in the response phase, once the request went upstream.
    "spurious-extra-reply": (duplicate_reply, 500, "spurious_msgs_received", True),
    # The proxy closed its side after the last reply: the extra one is never read.
    "reply-after-end": (reply_after_end, 200, "streams_closed", True),
}


@pytest.mark.parametrize("case", sorted(GARBAGE), ids=str)
def test_processor_answers_garbage(upstream: EchoUpstream, case: str) -> None:
    fault, status, counter, reaches_upstream = GARBAGE[case]
    with (
        ScriptedProcessor(on_faulty(fault)) as proc,
        single_worker_proxy(upstream.address, proc.address) as proxy,
    ):
        assert request(proxy.address, "GET", "/").status == 200
        baseline, before = settled(proxy)
        assert request(proxy.address, "GET", "/fault").status == status
        assert proxy.wait_idle(WAIT_S)
        assert moved(before, counters(proxy))[EXT + counter] >= 1
        assert_recovered(proxy, baseline, None)
    expected = ["/", "/fault", "/next"] if reaches_upstream else ["/", "/next"]
    assert [r.target for r in upstream.requests] == expected


def test_processor_stalls_forever(upstream: EchoUpstream) -> None:
    release = threading.Event()
    with (
        ScriptedProcessor(on_faulty(stall(release))) as proc,
        single_worker_proxy(upstream.address, proc.address, message_timeout="300ms") as proxy,
    ):
        try:
            assert request(proxy.address, "GET", "/").status == 200
            baseline, before = settled(proxy)
            reply = request(proxy.address, "GET", "/fault")
            assert (reply.status, reply.body) == (504, b"")
            assert proxy.wait_idle(WAIT_S)
            assert moved(before, counters(proxy))[EXT + "message_timeouts"] == 1
            assert_recovered(proxy, baseline, None)
        finally:
            release.set()


# A real processor process, killed and restarted --------------------------------------------


class ProcessorProcess:
    """``extproc-processor tests.support.hanging_processor:HangingProcessor`` on ``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extproc.processor.cli",
                "tests.support.hanging_processor:HangingProcessor",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.hanging = threading.Event()
        self.serving = threading.Event()
        self.lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(pipe,), daemon=True)
            for pipe in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self._readers:
            reader.start()
        assert self.serving.wait(WAIT_S), "".join(self.lines)

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line)
            if line.startswith("hanging"):
                self.hanging.set()
            if match := re.search(r"serving .* on port (\d+)", line):
                self.port = int(match.group(1))
                self.serving.set()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)
        for reader in self._readers:
            reader.join(WAIT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def real_processor() -> Iterator[ProcessorProcess]:
    processor = ProcessorProcess(0)
    try:
        yield processor
    finally:
        processor.kill()


def test_processor_killed_mid_stream(
    upstream: EchoUpstream, real_processor: ProcessorProcess
) -> None:
    target = f"127.0.0.1:{real_processor.port}"
    with single_worker_proxy(upstream.address, target, message_timeout="20s") as proxy:
        assert request(proxy.address, "GET", "/").status == 200
        baseline, before = settled(proxy)
        with Client(proxy.address, timeout=WAIT_S) as client:
            sent = threading.Thread(target=lambda: replies.append(client.request("GET", "/hang")))
            replies: list[Any] = []
            sent.start()
            assert real_processor.hanging.wait(WAIT_S)
            real_processor.kill()
            sent.join(WAIT_S)
        assert [r.status for r in replies] == [500]
        assert proxy.wait_idle(WAIT_S)
        assert moved(before, counters(proxy))[EXT + "streams_failed"] == 1
        # The processor is gone: fail closed, promptly, without holding the worker.
        assert request(proxy.address, "GET", "/").status == 500
        assert proxy.wait_idle(WAIT_S)
        assert proxy_threads() <= baseline
    assert [r.target for r in upstream.requests] == ["/"]


def test_processor_restarted(upstream: EchoUpstream, real_processor: ProcessorProcess) -> None:
    port = real_processor.port
    with single_worker_proxy(upstream.address, f"127.0.0.1:{port}") as proxy:
        assert request(proxy.address, "GET", "/").status == 200
        baseline, before = settled(proxy)
        real_processor.kill()
        assert request(proxy.address, "GET", "/down").status == 500
        assert proxy.wait_idle(WAIT_S)  # the stats are counted once the reply went out
        assert moved(before, counters(proxy))[EXT + "streams_failed"] == 1
        restarted = ProcessorProcess(port)
        try:
            # gRPC reconnects with backoff: the requests fail closed until it has.
            deadline = time.monotonic() + WAIT_S
            while (status := request(proxy.address, "GET", "/up").status) != 200:
                assert status == 500 and time.monotonic() < deadline
            assert_recovered(proxy, baseline, None)
        finally:
            restarted.kill()


# Upstream faults ----------------------------------------------------------------------------

HEAD_100 = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"
# The warm-up request's answer: its connection closes, so the fault meets a fresh one.
GOOD_THEN_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ngood"
CUT_OFF = -1  # the head went out before the fault: the client sees the body cut short

UPSTREAM_FAULTS: dict[str, tuple[Script, int, str]] = {
    # fault: (script, status the client gets, counter that moves)
    "reset": (reset, 503, "upstream_cx_destroy_remote_with_active_rq"),
    "close-before-head": (answer_then_close(b""), 503, "upstream_cx_destroy_remote_with_active_rq"),
    "close-mid-head": (
        answer_then_close(b"HTTP/1.1 200 OK\r\ncontent-len"),
        503,
        "upstream_cx_destroy_remote_with_active_rq",
    ),
    "close-mid-body": (
        answer_then_close(HEAD_100 + b"only-part"),
        CUT_OFF,
        "upstream_cx_destroy_remote_with_active_rq",
    ),
    "stall-before-head": (answer_then_hold(b""), 504, "upstream_rq_timeout"),
    "stall-mid-body": (
        answer_then_hold(HEAD_100 + b"only-part"),
        CUT_OFF,
        "upstream_rq_timeout",
    ),
    "invalid-status-line": (
        answer_then_serve(b"HTTP/1.1 2x0 OK\r\n\r\n"),
        502,
        "upstream_cx_protocol_error",
    ),
    "invalid-header": (
        answer_then_serve(b"HTTP/1.1 200 OK\r\nbad header: x\r\ncontent-length: 0\r\n\r\n"),
        502,
        "upstream_cx_protocol_error",
    ),
    # The body bytes that came with the head are parsed with it, as Envoy's codec does.
    "invalid-chunk": (
        answer_then_serve(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
        502,
        "upstream_cx_protocol_error",
    ),
    "chunk-size-over-64-bits": (
        answer_then_hold(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\nok"
        ),
        502,
        "upstream_cx_protocol_error",
    ),
    "content-length-over-64-bits": (
        answer_then_hold(b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551616\r\n\r\nok"),
        502,
        "upstream_cx_protocol_error",
    ),
    # Envoy takes any number of leading zeros; h11 no more than 20 digits.
    "content-length-over-20-digits": (
        answer_then_hold(b"HTTP/1.1 200 OK\r\ncontent-length: 0000000000000000000002\r\n\r\nok"),
        502,
        "upstream_cx_protocol_error",
    ),
    # h11 takes a control character in a trailer value; no proxy should pass it on.
    "control-character-in-trailer": (
        answer_then_serve(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\nx-trailer: a\x10b\r\n\r\n"
        ),
        CUT_OFF,
        "upstream_cx_protocol_error",
    ),
    # A whole second response hidden past the Content-Length: it must not become the answer
    # to the next request sent on this connection.
    "more-body-than-content-length": (
        answer_then_serve(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"
        ),
        200,
        "upstream_cx_protocol_error",
    ),
}


@pytest.mark.parametrize("case", sorted(UPSTREAM_FAULTS), ids=str)
def test_upstream_fault(processor: ScriptedProcessor, case: str) -> None:
    script, status, counter = UPSTREAM_FAULTS[case]
    with (
        FaultyUpstream(answer_then_close(GOOD_THEN_CLOSE), script) as upstream,
        single_worker_proxy(upstream.address, processor.address, upstream_timeout=0.5) as proxy,
    ):
        assert request(proxy.address, "GET", "/").body == b"good"
        baseline, before = settled(proxy)
        data = raw_exchange(
            proxy.address, b"GET /fault HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        )
        head, _, body = data.partition(b"\r\n\r\n")
        if status == CUT_OFF:
            # The connection is closed mid-body: the client can tell the response is
            # incomplete (short of its length, or no last chunk).
            assert status_of(head) == 200
            framing = head.lower()
            assert b"content-length: 100" in framing or b"transfer-encoding: chunked" in framing
            assert len(body) < 100 and not body.endswith(b"0\r\n\r\n")
        else:
            assert status_of(head) == status
            if status == 200:
                assert body == b"ok"
        assert_recovered(proxy, baseline, b"good")
        assert moved(before, counters(proxy))[CLUSTER + counter] == 1
        assert upstream.connections == 3


# Client faults ------------------------------------------------------------------------------


def test_client_that_stops_reading_is_dropped_at_the_client_timeout(
    processor: ScriptedProcessor,
) -> None:
    """A write to a client that reads nothing waits at most the client timeout (the kernel's
    send timeout on the blocking socket); then the request ends, the connection goes and the
    worker is free."""
    body = b"x" * (64 << 20)  # far more than the socket buffers on both sides hold
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    with (
        FaultyUpstream(answer_then_close(GOOD_THEN_CLOSE), answer_then_close(answer)) as upstream,
        single_worker_proxy(upstream.address, processor.address, client_timeout=0.5) as proxy,
    ):
        assert request(proxy.address, "GET", "/").body == b"good"
        baseline, before = settled(proxy)
        with socket.create_connection(proxy.address, timeout=WAIT_S) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"GET /big HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            # A request is counted when it ends: without the timeout, the only worker would
            # stay blocked in its write while the client reads nothing.
            deadline = time.monotonic() + WAIT_S
            while not moved(before, counters(proxy)).get("http.ingress.downstream_rq_total"):
                assert time.monotonic() < deadline, "the worker is still writing to the client"
                threading.Event().wait(0.05)
        assert_recovered(proxy, baseline, b"good")
