"""bin/extproc-proxy as a real process: start-up, errors, the demo, SIGTERM drain."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from extproc.demo.upstream import EchoUpstream
from tests.support.processor import ProcessorStream, ScriptedProcessor, matching_reply
from tests.support.proxy import REPO, request
from tests.support.proxyproc import BIN, COLD_START
from tests.support.rawpeer import ScriptedUpstream

pytestmark = pytest.mark.integration

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _lines(stream: IO[str], sink: list[str], found: threading.Event, pattern: str) -> None:
    for line in stream:
        sink.append(line)
        if re.search(pattern, line):
            found.set()


@contextmanager
def process(*args: str, ready: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start the command, wait until a line matching ``ready`` appears, stop it at the end."""
    proc = subprocess.Popen(
        [BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    lines: list[str] = []
    found = threading.Event()
    readers = [
        threading.Thread(target=_lines, args=(s, lines, found, ready), daemon=True)
        for s in (proc.stdout, proc.stderr)
    ]
    for reader in readers:
        reader.start()
    try:
        assert found.wait(30), "".join(lines)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for reader in readers:
            reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def listening_port(lines: list[str]) -> int:
    for line in lines:
        if '"listening"' in line:
            return int(json.loads(line)["address"].rsplit(":", 1)[1])
    raise AssertionError("".join(lines))


def test_version() -> None:
    out = subprocess.run(
        [BIN, "--version"], capture_output=True, text=True, timeout=60, env=ENV, check=True
    )
    assert re.match(r"extproc-proxy, version \d+\.\d+\.\d+", out.stdout)


def test_module_entry_point_matches() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    assert "demo" in out.stdout and "run" in out.stdout


def test_config_error_exits_2_and_names_the_field(tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "filter.yaml")
    with open(path, "w") as f:
        f.write("processing_mode:\n  request_header_mode: LOUD\n")
    out = subprocess.run(
        [
            BIN,
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--processor",
            "127.0.0.1:2",
            "--config",
            path,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert out.returncode == 2
    assert "ext_proc.processing_mode.request_header_mode" in out.stderr


def test_address_in_use_exits_3() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                BIN,
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                "127.0.0.1:1",
                "--processor",
                "127.0.0.1:2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
    assert out.returncode == 3
    assert "cannot listen" in out.stderr


def test_sigterm_drains_in_flight_requests_then_exits_0(processor: ScriptedProcessor) -> None:
    go = threading.Event()
    upstream = ScriptedUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone", go=go)
    result: dict[str, object] = {}
    try:
        with process(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "{}:{}".format(*upstream.address),
            "--processor",
            processor.address,
            *COLD_START,
            ready='"listening"',
        ) as (proc, lines):
            address = ("127.0.0.1", listening_port(lines))

            def in_flight() -> None:
                result["reply"] = request(address, "GET", "/slow")

            client = threading.Thread(target=in_flight)
            client.start()
            assert upstream.received.wait(30)
            proc.send_signal(signal.SIGTERM)
            # The listener closes first: new connections are refused while the request drains.
            refused = threading.Event()
            for _ in range(300):
                try:
                    socket.create_connection(address, timeout=1).close()
                except OSError:
                    refused.set()
                    break
                threading.Event().wait(0.05)
            go.set()
            client.join(30)
            assert proc.wait(30) == 0
    finally:
        go.set()
        upstream.close()
    assert refused.is_set()
    reply = result["reply"]
    assert getattr(reply, "status", None) == 200 and getattr(reply, "body", None) == b"done"
    assert any('"stopped"' in line and '"unfinished_requests": 0' in line for line in lines)


def test_demo_serves_the_example_processor_and_echo_upstream() -> None:
    with process("demo", "--listen", "127.0.0.1:0", ready="Stop with Ctrl-C") as (proc, lines):
        banner = next(line for line in lines if "proxy on" in line)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", banner)[1])  # type: ignore[index]
        tagged = request(("127.0.0.1", port), "GET", "/hello")
        blocked = request(("127.0.0.1", port), "GET", "/blocked")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert tagged.status == 200 and tagged.header("x-extproc-demo") == "response-seen"
    assert b'"x-extproc-demo"' in tagged.body  # the upstream saw the request-side tag
    assert blocked.status == 403 and blocked.body == b"blocked by the demo processor\n"


def test_out_of_file_descriptors_backs_off_and_recovers(
    processor: ScriptedProcessor, upstream: EchoUpstream
) -> None:
    """With its descriptors used up the proxy pauses accepting instead of spinning."""
    args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "{}:{}".format(*upstream.address),
        "--processor",
        processor.address,
        *COLD_START,
        "--header-read-timeout",
        "60s",
    ]
    shell = f"ulimit -n 48; exec {BIN} " + " ".join(args)
    proc = subprocess.Popen(
        ["sh", "-c", shell], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    lines: list[str] = []
    ready, exhausted = threading.Event(), threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "listening" in line:
                ready.set()
            if "accept_failed" in line:
                exhausted.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    held: list[socket.socket] = []
    try:
        assert ready.wait(30), "".join(lines)
        port = int(
            json.loads(next(x for x in lines if "listening" in x))["address"].rsplit(":", 1)[1]
        )
        while not exhausted.is_set() and len(held) < 200:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            exhausted.wait(0.01)
        assert exhausted.is_set()
        # More clients wait in the backlog, so the listener stays readable meanwhile.
        held += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
        idle = threading.Event()
        idle.wait(1.0)  # a spinning acceptor would log tens of thousands of lines meanwhile
        failures = sum("accept_failed" in x for x in lines)
        for sock in held:
            sock.close()
        held.clear()
        reply = None
        for _ in range(100):  # the held connections close asynchronously: retry a little
            try:
                reply = request(("127.0.0.1", port), "GET", "/")
                break
            except OSError:
                idle.wait(0.1)
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        proc.wait(30)
        reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert failures < 100
    assert reply is not None and reply.status == 200


def test_access_log_has_one_json_event_per_request_with_dynamic_metadata(
    upstream: EchoUpstream, tmp_path: Path
) -> None:
    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            response = matching_reply(message)
            if message.WhichOneof("request") == "request_headers":
                response.dynamic_metadata.update({"ns": {"user": "alice"}})
            stream.send(response)

    config = tmp_path / "extproc.yaml"
    config.write_text("ext_proc:\n  metadata_options: {receiving_namespaces: {untyped: [ns]}}\n")
    with (
        ScriptedProcessor(handler) as proc,
        process(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "{}:{}".format(*upstream.address),
            "--processor",
            proc.address,
            *COLD_START,
            "--config",
            str(config),
            ready='"listening"',
        ) as (running, lines),
    ):
        address = ("127.0.0.1", listening_port(lines))
        assert request(address, "GET", "/who?x=1").status == 200
        running.send_signal(signal.SIGTERM)
        assert running.wait(30) == 0
    entries = [json.loads(x) for x in lines if '"event": "request"' in x]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/who?x=1", 200)
    assert entry["dynamic_metadata"] == {"ns": {"user": "alice"}}
    assert entry["request_id"] and entry["upstream_ms"] >= 0 and entry["processor_ms"] >= 0
    # Request and response headers each waited for their reply: one duration per phase.
    phases = entry["processor_phases_ms"]
    assert sorted(phases) == ["request_headers", "response_headers"]
    assert all(ms >= 0 for ms in phases.values())
    assert sum(phases.values()) == pytest.approx(entry["processor_ms"], abs=0.01)
