"""extproc as a library: Proxy started, used and stopped inside the test process."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc import Proxy
from extproc.demo.upstream import EchoUpstream
from tests.support.processor import ProcessorStream, ScriptedProcessor, immediate, matching_reply
from tests.support.proxy import request

pytestmark = pytest.mark.integration


def test_start_request_stop(upstream: EchoUpstream, processor: ScriptedProcessor) -> None:
    proxy = Proxy.from_options(
        listen="127.0.0.1:0",
        upstream=f"{upstream.address[0]}:{upstream.address[1]}",
        processor=processor.address,
        message_timeout="10s",
    ).start()
    try:
        host, port = proxy.address
        assert host == "127.0.0.1" and port > 0
        reply = request(proxy.address, "GET", "/hello")
    finally:
        proxy.stop()
    assert reply.status == 200
    assert upstream.requests[0].target == "/hello"
    assert not proxy.running
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = proxy.address


def test_context_manager_and_ext_proc_dict(upstream: EchoUpstream) -> None:
    def block(stream: ProcessorStream) -> None:
        message = stream.recv()
        assert message is not None
        if message.request_headers.headers.headers[1].raw_value == b"/blocked":
            stream.send(immediate(403, b"no"))
        else:
            stream.send(matching_reply(message))

    with ScriptedProcessor(block) as proc:
        ext_proc = {
            "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}},
            "message_timeout": "10s",
            "processing_mode": {"response_header_mode": "SKIP"},
        }
        upstream_target = f"{upstream.address[0]}:{upstream.address[1]}"
        file = {"clusters": {"ext_proc": proc.address}, "ext_proc": ext_proc}
        with Proxy.from_options(
            listen="127.0.0.1:0", upstream=upstream_target, ext_proc=file
        ) as proxy:
            blocked = request(proxy.address, "GET", "/blocked")
            passed = request(proxy.address, "GET", "/fine")
    assert (blocked.status, blocked.body) == (403, b"no")
    assert passed.status == 200
    assert [r.target for r in upstream.requests] == ["/fine"]


def test_from_file(tmp_path: Path, upstream: EchoUpstream, processor: ScriptedProcessor) -> None:
    config = tmp_path / "extproc.yaml"
    config.write_text(
        f'listen: "127.0.0.1:0"\nupstream: "{upstream.address[0]}:{upstream.address[1]}"\n'
        f"ext_proc:\n  grpc_service: {{google_grpc: {{target_uri: '{processor.address}'}}}}\n"
        "  message_timeout: 10s\n"
    )
    with Proxy.from_file(config, request_header_mode="skip") as proxy:
        reply = request(proxy.address, "GET", "/file")
    assert reply.status == 200
    streams = processor.wait_streams(1)
    assert [m.WhichOneof("request") for m in streams[0].requests] == ["response_headers"]


def test_address_in_use_raises_in_caller(upstream: EchoUpstream) -> None:
    target = f"{upstream.address[0]}:{upstream.address[1]}"
    with Proxy.from_options(listen="127.0.0.1:0", upstream=target, processor="127.0.0.1:1") as a:
        taken = f"127.0.0.1:{a.address[1]}"
        second = Proxy.from_options(listen=taken, upstream=target, processor="127.0.0.1:1")
        with pytest.raises(OSError, match="in use"):
            second.start()
        assert not second.running
