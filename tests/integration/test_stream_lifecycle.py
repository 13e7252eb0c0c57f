"""Process streams by the thousand through each client, driven as the proxy drives them:
answered, cancelled before any reply, timed out, ended by the processor with OK or an error,
pumped. File descriptors, threads and memory stay flat, and the direct client starts no thread
for a stream. ``make soak`` runs 100,000 streams per client."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.config import ProcessorSettings
from extproc.errors import ProcessorStreamError, ProcessorTimeout
from extproc.io import direct_stream, processor
from extproc.io.processor import ProcessorClient
from extproc.options import GRPC_CLIENTS
from tests.support.processor_process import ProcessorProcess

pytestmark = [pytest.mark.integration]

DRIVERS = 8  # worker threads opening streams at once
WARM_UP = 2_000  # streams before anything is measured: the channel, pool threads, arenas
# How many threads grpc's own pool may add as the load varies; a thread kept per stream would
# be thousands.
GRPC_POOL_SLACK = 8
# Long enough for a loaded machine: only the /hold streams ever wait for it.
REPLY_TIMEOUT = 30.0
HELD_TIMEOUT = 0.002


def _headers(path: bytes) -> ep.ProcessingRequest:
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=path)])
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers))


RESPONSE_HEADERS = ep.ProcessingRequest(
    response_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")])
    )
)


def _exchange(client: ProcessorClient, i: int) -> str:
    """One stream, in one of the ways an exchange uses one; what happened."""
    stream = client.open_stream()
    try:
        kind = i % 25
        if kind == 0:
            stream.send(_headers(b"/hold"))
            with pytest.raises(ProcessorTimeout):
                stream.recv(HELD_TIMEOUT)
            return "timed out"
        if kind == 1:
            stream.send(_headers(b"/hold"))
            return "cancelled"
        if kind == 2:
            stream.send(_headers(b"/close-ok"))
            assert stream.recv(REPLY_TIMEOUT) is None
            return "ended OK"
        if kind == 3:
            stream.send(_headers(b"/abort"))
            with pytest.raises(ProcessorStreamError) as raised:
                stream.recv(REPLY_TIMEOUT)
            assert raised.value.code == 13  # INTERNAL
            return "ended with an error"
        stream.send(_headers(b"/"))
        if kind == 4:
            stream.start_pump()
        reply = stream.recv(REPLY_TIMEOUT)
        assert reply is not None and reply.HasField("request_headers")
        stream.send(RESPONSE_HEADERS)
        reply = stream.recv(REPLY_TIMEOUT)
        assert reply is not None and reply.HasField("response_headers")
        return "pumped" if kind == 4 else "answered"
    finally:
        stream.close()


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int  # of the whole process, grpc's own threads included
    python_threads: int  # started by Python code: the stub's per-stream ones among them
    pumps: int  # of those, the client's pump pool, which grows to its size as streams need it
    rss_kib: int

    @classmethod
    def now(cls) -> Usage:
        text = Path("/proc/self/status").read_text()
        status = dict(line.split(":", 1) for line in text.splitlines())
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            threads=int(status["Threads"]),
            python_threads=threading.active_count(),
            pumps=sum(t.name.startswith("extproc-pump") for t in threading.enumerate()),
            rss_kib=int(status["VmRSS"].split()[0]),
        )


def _settled(within: float = 30.0, stable: float = 0.5) -> Usage:
    """Usage once the thread count has stopped falling for ``stable`` seconds: the stub's
    per-stream threads, ended by the last closes, exit a little later."""
    deadline = time.monotonic() + within
    last, since = Usage.now(), time.monotonic()
    while time.monotonic() - since < stable and time.monotonic() < deadline:
        time.sleep(0.05)
        now = Usage.now()
        if now.threads != last.threads:
            since = time.monotonic()
        last = now
    return last


def _run(client: ProcessorClient, start: int, count: int) -> dict[str, int]:
    seen: dict[str, int] = {}

    def drive(offset: int) -> dict[str, int]:
        mine: dict[str, int] = {}
        for i in range(start + offset, start + count, DRIVERS):
            what = _exchange(client, i)
            mine[what] = mine.get(what, 0) + 1
        return mine

    with ThreadPoolExecutor(DRIVERS) as pool:
        for mine in pool.map(drive, range(DRIVERS)):
            for what, n in mine.items():
                seen[what] = seen.get(what, 0) + n
    return seen


@pytest.fixture(scope="module")
def stream_processor() -> Iterator[ProcessorProcess]:
    with ProcessorProcess("streams", module="tests.support.stream_processor") as proc:
        yield proc


@pytest.fixture(params=GRPC_CLIENTS)
def client(request: Any, stream_processor: ProcessorProcess) -> Iterator[ProcessorClient]:
    settings = ProcessorSettings(stream_processor.address, grpc_client=request.param)
    client = ProcessorClient(settings, max_streams=DRIVERS)
    try:
        yield client
    finally:
        client.close()


def _leaks_nothing(client: ProcessorClient, streams: int) -> None:
    """Streams in two equal halves after a warm-up: what the first half grew (pools reaching
    their size: the pump pool, grpc's own threads, the allocator's arenas) may not grow again
    in the second; anything kept per stream would."""
    _run(client, 0, WARM_UP)
    start = _settled()
    half = streams // 2
    seen = _run(client, WARM_UP, half)
    middle = _settled()
    for what, n in _run(client, WARM_UP + half, half).items():
        seen[what] = seen.get(what, 0) + n
    end = _settled()
    print(f"{streams} streams: {start} -> {middle} -> {end}")
    assert sum(seen.values()) == 2 * half
    assert set(seen) == {
        "timed out",
        "cancelled",
        "ended OK",
        "ended with an error",
        "pumped",
        "answered",
    }
    assert end.fds <= middle.fds <= start.fds, (start, middle, end)
    # Python's threads but the pump pool's are all there after the warm-up; the pool is
    # bounded. grpc's own threads come and go with the load (its pool sizes itself): bounded.
    assert end.python_threads - end.pumps <= start.python_threads - start.pumps, (start, end)
    assert end.pumps <= DRIVERS, (start, middle, end)
    assert end.threads <= start.threads + DRIVERS + GRPC_POOL_SLACK, (start, middle, end)
    # Flat, not zero: the allocator keeps some of what it freed.
    assert end.rss_kib - middle.rss_kib < 8 * 1024, (start, middle, end)


def test_streams_leak_nothing(client: ProcessorClient) -> None:
    _leaks_nothing(client, 5_000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_hundred_thousand_streams_leak_nothing(client: ProcessorClient) -> None:
    _leaks_nothing(client, 100_000)


def test_the_direct_client_starts_no_thread_per_stream(
    stream_processor: ProcessorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header-mode streams (answered, timed out, cancelled, ended): not one thread started;
    grpc's stub starts one for every stream."""
    started: dict[str, int] = {}
    start = threading.Thread.start

    def counting(thread: threading.Thread) -> None:
        started[thread.name] = started.get(thread.name, 0) + 1
        start(thread)

    for kind in GRPC_CLIENTS:
        client = ProcessorClient(
            ProcessorSettings(stream_processor.address, grpc_client=kind), max_streams=DRIVERS
        )
        try:
            _exchange(client, 0)  # the watchdog thread starts with the first timer
            monkeypatch.setattr(threading.Thread, "start", counting)
            for i in range(200):
                if i % 25 != 4:  # not the pumped kind: that one may use a pool thread
                    _exchange(client, i)
            monkeypatch.setattr(threading.Thread, "start", start)
        finally:
            client.close()
        total = sum(started.values())
        if kind == "direct":
            assert total == 0, started
        else:
            assert total >= 190, started
        started.clear()


def test_without_what_direct_needs_the_stub_runs_with_one_warning(
    stream_processor: ProcessorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grpcio without segregated calls (older than the range setup.cfg allows, or one that
    changed its internals): the stub client serves instead, and says so once per process."""
    monkeypatch.setattr(direct_stream, "SUPPORTED", False)
    monkeypatch.setattr(direct_stream, "UNSUPPORTED_REASON", "grpcio lacks Channel.segregated_call")
    monkeypatch.setattr(processor, "_warned_fallback", False)
    settings = ProcessorSettings(stream_processor.address, grpc_client="direct")
    with structlog.testing.capture_logs() as logged:
        clients = [ProcessorClient(settings, max_streams=DRIVERS) for _ in range(2)]
    try:
        assert [c.kind for c in clients] == ["stub", "stub"]
        assert _exchange(clients[0], 5) == "answered"
    finally:
        for c in clients:
            c.close()
    warnings = [e for e in logged if e["event"] == "grpc_client_fallback"]
    assert len(warnings) == 1
    assert warnings[0]["reason"] == "grpcio lacks Channel.segregated_call"
