"""The processor address is any gRPC target: dns:///, ipv4: lists, unix:, xds:///."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.demo.processor import DemoProcessor
from extproc.demo.upstream import EchoUpstream
from tests.support.processor import ScriptedProcessor, mutate_headers, mutating
from tests.support.proxy import Reply, request, running_proxy
from tests.support.proxyproc import ProxyProcess
from tests.support.xds import ENDPOINTS, ControlPlane

pytestmark = pytest.mark.integration

WARM_UP_LIMIT = 200


def tagging(name: str) -> ScriptedProcessor:
    """A processor that sets ``x-served-by: NAME`` on the requests it sees."""
    tag = mutate_headers(set_headers=[("x-served-by", name)])
    return ScriptedProcessor(mutating("request_headers", tag))


@pytest.fixture
def trio() -> Iterator[list[ScriptedProcessor]]:
    with tagging("a") as a, tagging("b") as b, tagging("c") as c:
        yield [a, b, c]


def served_by(reply: Reply) -> str | None:
    assert reply.status == 200, reply
    return dict(json.loads(reply.body)["headers"]).get("x-served-by")


def ipv4_list(processors: list[ScriptedProcessor]) -> str:
    return "ipv4:" + ",".join(p.address for p in processors)


def test_dns_target_resolving_localhost(upstream: EchoUpstream) -> None:
    with tagging("dns") as processor:
        target = f"dns:///localhost:{processor.port}"
        with running_proxy(upstream.address, target) as proxy:
            reply = request(proxy.address, "GET", "/")
    assert served_by(reply) == "dns"


def test_dns_target_from_the_config_file(upstream: EchoUpstream) -> None:
    with tagging("dns") as processor:
        ext_proc = {
            "grpc_service": {"google_grpc": {"target_uri": f"dns:///localhost:{processor.port}"}}
        }
        with running_proxy(upstream.address, None, ext_proc=ext_proc) as proxy:
            reply = request(proxy.address, "GET", "/")
    assert served_by(reply) == "dns"


def _spread(address: tuple[str, int], processors: list[ScriptedProcessor], n: int) -> list[int]:
    """Streams each processor got for ``n`` requests, once every one of them took one
    (round robin only picks among connected processors, and they connect one by one)."""
    for _ in range(WARM_UP_LIMIT):
        if all(p.streams for p in processors):
            break
        request(address, "GET", "/")
    before = [len(p.streams) for p in processors]
    for _ in range(n):
        assert served_by(request(address, "GET", "/")) is not None
    return [len(p.streams) - b for p, b in zip(processors, before, strict=True)]


def test_ipv4_list_round_robin_spreads_streams_evenly(
    trio: list[ScriptedProcessor], upstream: EchoUpstream
) -> None:
    with running_proxy(upstream.address, ipv4_list(trio)) as proxy:
        assert _spread(proxy.address, trio, 30) == [10, 10, 10]


def test_pick_first_sends_everything_to_one_processor(
    trio: list[ScriptedProcessor], upstream: EchoUpstream
) -> None:
    channel: dict[str, Any] = {"processor_lb_policy": "pick_first"}
    with running_proxy(upstream.address, ipv4_list(trio), **channel) as proxy:
        for _ in range(10):
            request(proxy.address, "GET", "/")
    assert [len(p.streams) for p in trio] == [10, 0, 0]


def test_channel_args_from_the_config_choose_the_policy(
    trio: list[ScriptedProcessor], upstream: EchoUpstream
) -> None:
    google: dict[str, Any] = {
        "target_uri": ipv4_list(trio),
        "channel_args": {"args": {"grpc.lb_policy_name": {"string_value": "pick_first"}}},
    }
    ext_proc = {"grpc_service": {"google_grpc": google}}
    with running_proxy(upstream.address, None, ext_proc=ext_proc) as proxy:
        for _ in range(6):
            request(proxy.address, "GET", "/")
    assert [len(p.streams) for p in trio] == [6, 0, 0]


def test_envoy_grpc_cluster_resolves_to_a_target_list(
    trio: list[ScriptedProcessor], upstream: EchoUpstream
) -> None:
    config = {
        "clusters": {"ext_proc": ipv4_list(trio)},
        "ext_proc": {"grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}}},
    }
    with running_proxy(upstream.address, None, ext_proc=config) as proxy:
        assert _spread(proxy.address, trio, 9) == [3, 3, 3]


def test_unix_socket_target(tmp_path: Path, upstream: EchoUpstream) -> None:
    path = tmp_path / "processor.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ep_grpc.add_ExternalProcessorServicer_to_server(DemoProcessor(), server)
    assert server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        with running_proxy(upstream.address, f"unix:{path}") as proxy:
            reply = request(proxy.address, "GET", "/hello")
    finally:
        server.stop(grace=None).wait(10)
    assert reply.status == 200
    assert reply.header("x-extproc-demo") == "response-seen"


def test_xds_control_plane_steers_processor_traffic(tmp_path: Path, upstream: EchoUpstream) -> None:
    """A real ADS server sends the proxy to processor a, then moves it to processor b."""
    with tagging("a") as a, tagging("b") as b, ControlPlane("processors", [a.port]) as plane:
        bootstrap = tmp_path / "xds-bootstrap.json"
        bootstrap.write_text(plane.bootstrap())
        host, port = upstream.address
        with ProxyProcess(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"{host}:{port}",
            "--processor",
            "xds:///processors",
            "--message-timeout",
            "10s",
            # gRPC reads the bootstrap once per process: hence a process of its own.
            env={"GRPC_XDS_BOOTSTRAP": str(bootstrap)},
        ) as running:
            proxy = ("127.0.0.1", running.port())
            assert [served_by(request(proxy, "GET", "/")) for _ in range(3)] == ["a"] * 3
            plane.wait_acked(ENDPOINTS, "1")
            version = plane.set_endpoints([b.port])
            plane.wait_acked(ENDPOINTS, version)
            # The channel switches over once it connected to b; a stream that started
            # before may still go to a.
            for _ in range(WARM_UP_LIMIT):
                if served_by(request(proxy, "GET", "/")) == "b":
                    break
            assert [served_by(request(proxy, "GET", "/")) for _ in range(3)] == ["b"] * 3
    assert plane.nacks == []
    assert len(a.streams) >= 3 and len(b.streams) >= 4
