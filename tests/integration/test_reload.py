"""SIGHUP reloads the filter configuration of a running proxy process (one process here; with
workers in test_workers.py)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.config import ProxyConfig, build_config
from extproc.demo.upstream import EchoUpstream
from extproc.io.clients import Client
from extproc.io.processor import ProcessorClient
from extproc.io.server import ProxyServer
from tests.support.opsload import Load, Recorder, admin_stats
from tests.support.processor import ScriptedProcessor
from tests.support.proxy import Reply, request
from tests.support.proxyproc import ProxyProcess, proxy_args

pytestmark = pytest.mark.integration

# The response phase is skipped, then sent: a change the processor can see.
SKIP_RESPONSE = """\
processing_mode: {request_header_mode: SEND, response_header_mode: SKIP}
"""
SEND_RESPONSE = """\
processing_mode: {request_header_mode: SEND, response_header_mode: SEND}
"""


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def recording(recorder: Recorder) -> Iterator[ScriptedProcessor]:
    with ScriptedProcessor(recorder) as server:
        yield server
    recorder.release.set()


def start(config: Path, upstream: EchoUpstream, processor: ScriptedProcessor) -> ProxyProcess:
    return ProxyProcess(
        "--listen",
        "127.0.0.1:0",
        *proxy_args(upstream.address, processor.address),
        "--config",
        str(config),
        "--admin",
        "127.0.0.1:0",
    )


def admin_port(proxy: ProxyProcess) -> int:
    return int(str(proxy.wait_event("admin_listening")["address"]).rsplit(":", 1)[1])


def test_sighup_under_load_loses_nothing_and_changes_behaviour(
    tmp_path: Path, upstream: EchoUpstream, recording: ScriptedProcessor, recorder: Recorder
) -> None:
    config = tmp_path / "filter.yaml"
    config.write_text(SKIP_RESPONSE)
    with start(config, upstream, recording) as proxy:
        address = ("127.0.0.1", proxy.port())
        load = Load(address, clients=4)
        held: dict[str, Reply] = {}
        # Started before the reload and still in the processor when it happens.
        holder = threading.Thread(target=lambda: held.update(r=request(address, "GET", "/hold")))
        holder.start()
        try:
            recorder.wait_held(1)
            load.wait_count(20)
            config.write_text(SEND_RESPONSE)
            proxy.signal(signal.SIGHUP)
            proxy.wait_event("reloaded")
            load.wait_count(40)
            recorder.release.set()
            holder.join(60)
            fresh = request(address, "GET", "/fresh")
        finally:
            recorder.release.set()
            load.stop()
        stats = admin_stats(admin_port(proxy))
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    assert not load.failures
    assert load.statuses and set(load.statuses) == {200}
    assert held["r"].status == 200 and fresh.status == 200
    # The held request kept the configuration it started with; new ones use the new one.
    assert recorder.kinds(b"/hold") == [["request_headers"]]
    assert recorder.kinds(b"/fresh") == [["request_headers", "response_headers"]]
    load_kinds = [k for p, k in recorder.streams if p.startswith(b"/load/")]
    assert ["request_headers"] in load_kinds
    assert ["request_headers", "response_headers"] in load_kinds
    assert stats["server.reloads"] == 1 and stats["server.reload_failures"] == 0


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        (
            "processing_mode: {request_body_mode: GRPC}\n",
            "ext_proc.processing_mode.request_body_mode",
            "GRPC is for gRPC traffic",
        ),
        (
            "processing_mode: {response_header_mode: LOUD}\n",
            "ext_proc.processing_mode.response_header_mode",
            "LOUD",
        ),
        (
            SKIP_RESPONSE + "stat_prefix: other\n",
            "ext_proc.stat_prefix",
            "cannot change on reload",
        ),
    ],
    ids=["unsupported_value", "unparsable", "fixed_at_start"],
)
def test_bad_config_is_refused_and_the_old_one_kept(
    tmp_path: Path,
    upstream: EchoUpstream,
    recording: ScriptedProcessor,
    recorder: Recorder,
    bad: str,
    field: str,
    reason: str,
) -> None:
    config = tmp_path / "filter.yaml"
    config.write_text(SKIP_RESPONSE)
    with start(config, upstream, recording) as proxy:
        address = ("127.0.0.1", proxy.port())
        config.write_text(bad)
        proxy.signal(signal.SIGHUP)
        failed = proxy.wait_event("reload_failed")
        after = request(address, "GET", "/after")
        stats = admin_stats(admin_port(proxy))
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    assert failed["field"] == field and reason in failed["reason"]
    assert failed["level"] == "error"
    assert after.status == 200
    assert recorder.kinds(b"/after") == [["request_headers"]]  # still the old configuration
    assert stats["server.reloads"] == 0 and stats["server.reload_failures"] == 1
    assert not proxy.events("reloaded")


def test_reload_to_another_processor(tmp_path: Path, upstream: EchoUpstream) -> None:
    """The processor target itself may change: new requests go to the new one, and a request
    in flight on the old channel finishes on it (the channel is closed only afterwards)."""
    first, second = Recorder(), Recorder()
    held: dict[str, Reply] = {}
    with ScriptedProcessor(first) as one, ScriptedProcessor(second) as two:
        config = tmp_path / "extproc.yaml"
        config.write_text(f"ext_proc: {{}}\nprocessor: {one.address}\n")
        host, port = upstream.address
        try:
            with ProxyProcess(
                "--listen", "127.0.0.1:0", "--upstream", f"{host}:{port}", "--config", str(config)
            ) as proxy:
                address = ("127.0.0.1", proxy.port())
                holder = threading.Thread(
                    target=lambda: held.update(r=request(address, "GET", "/hold"))
                )
                holder.start()
                first.wait_held(1)
                config.write_text(f"ext_proc: {{}}\nprocessor: {two.address}\n")
                proxy.signal(signal.SIGHUP)
                assert proxy.wait_event("reloaded")["processor"] == two.address
                assert request(address, "GET", "/two").status == 200
                first.release.set()
                holder.join(30)
                proxy.signal(signal.SIGTERM)
                assert proxy.wait() == 0
        finally:
            first.release.set()
    assert held["r"].status == 200
    assert [p for p, _ in first.streams] == [b"/hold"]
    assert [p for p, _ in second.streams] == [b"/two"]


def _closed(client: Client) -> bool:
    """Whether the client's channel is closed: gRPC refuses new calls on a closed channel."""
    assert isinstance(client, ProcessorClient)
    try:
        probe = client.channel.unary_unary("/extproc.test/Probe", None, None)
        call: Any = probe.future(b"", timeout=30)
    except ValueError:
        return True
    call.cancel()
    return False


def test_old_channel_is_closed_once_its_last_request_ends(upstream: EchoUpstream) -> None:
    """In process, to look at the channels: a reload to another processor keeps the old
    channel for the request still on it, and closes it when that request is done."""
    first, second = Recorder(), Recorder()
    held: dict[str, Reply] = {}
    with ScriptedProcessor(first) as one, ScriptedProcessor(second) as two:
        target = {"processor": one.address}
        host, port = upstream.address

        def load() -> ProxyConfig:
            flags = {
                "listen": "127.0.0.1:0",
                "upstream": f"{host}:{port}",
                "processor": target["processor"],
                "message_timeout": "30s",
            }
            return build_config(None, flags)

        reloaded = threading.Event()
        states: list[str] = []

        def notify(state: str) -> None:
            states.append(state)
            if state == "READY=1" and len(states) > 1:
                reloaded.set()

        server = ProxyServer(load(), load_config=load, notify=notify).start()
        try:
            (old,) = server.processors.values()
            holder = threading.Thread(
                target=lambda: held.update(r=request(server.address, "GET", "/hold"))
            )
            holder.start()
            first.wait_held(1)
            target["processor"] = two.address
            server.queue_signal(signal.SIGHUP)
            assert reloaded.wait(30)
            assert request(server.address, "GET", "/two").status == 200
            assert not _closed(old)  # the held request still uses it
            first.release.set()
            holder.join(30)
            deadline = time.monotonic() + 30
            while not _closed(old) and time.monotonic() < deadline:
                threading.Event().wait(0.01)
            assert _closed(old)
        finally:
            first.release.set()
            server.stop()
    assert held["r"].status == 200
    assert states[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert server.stats.snapshot()["server.reloads"] == 1
