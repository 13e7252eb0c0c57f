"""The admin listener over real sockets on 127.0.0.1: /stats, /metrics, /ready, stopping."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc import cli
from extproc.addresses import Address
from extproc.config import build_config
from extproc.core.record import RequestRecord
from extproc.demo.upstream import EchoUpstream
from extproc.io.admin import AdminServer
from extproc.io.server import ProxyServer
from extproc.metrics import Stats, record_exchange
from tests.support.processor import ScriptedProcessor
from tests.support.proxy import request, running_proxy

pytestmark = pytest.mark.integration

LOOPBACK = Address("127.0.0.1", 0)
STOP_BOUND_S = 5.0


class State:
    """What the proxy reports to /ready; tests change it."""

    def __init__(self) -> None:
        self.value = "LIVE"

    def __call__(self) -> str:
        return self.value


@pytest.fixture
def stats() -> Stats:
    stats = Stats("foo")
    record_exchange(
        stats,
        RequestRecord(
            messages_sent=2,
            messages_received=2,
            status=200,
            duration=0.004,
            processor_time=0.001,
        ),
    )
    return stats


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def admin(stats: Stats, state: State) -> Iterator[AdminServer]:
    server = AdminServer(LOOPBACK, stats, state).start()
    try:
        yield server
    finally:
        server.stop()


def get(
    address: tuple[str, int], path: str, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET."""
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def cut(sock: socket.socket) -> bool:
    """Whether the peer ended the connection (closed it, or reset it with our bytes unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_stats_is_envoy_text(admin: AdminServer, stats: Stats) -> None:
    status, content_type, body = get(admin.address, "/stats")
    assert (status, content_type) == (200, "text/plain; charset=UTF-8")
    assert body.decode() == stats.render_envoy_stats()
    assert "http.ingress.ext_proc.foo.streams_started: 1\n" in body.decode()


def test_stats_filter_and_bad_regex(admin: AdminServer) -> None:
    status, _, body = get(admin.address, "/stats?filter=ext_proc%5C.foo%5C.stream_msgs")
    assert status == 200
    assert body == (
        b"http.ingress.ext_proc.foo.stream_msgs_received: 2\n"
        b"http.ingress.ext_proc.foo.stream_msgs_sent: 2\n"
    )
    status, _, body = get(admin.address, "/stats?filter=(")
    assert status == 400 and body.startswith(b"Invalid regex")


def test_stats_json_is_envoys_shape(admin: AdminServer) -> None:
    status, content_type, body = get(admin.address, "/stats?format=json")
    assert (status, content_type) == (200, "application/json")
    *scalars, histograms = json.loads(body)["stats"]
    assert {"name": "http.ingress.ext_proc.foo.stream_msgs_sent", "value": 2} in scalars
    assert {"name": "http.ingress.downstream_rq_2xx", "value": 1} in scalars
    names = [h["name"] for h in histograms["histograms"]["computed_quantiles"]]
    assert "http.ingress.downstream_rq_time" in names


def test_stats_unknown_format_is_400(admin: AdminServer) -> None:
    assert get(admin.address, "/stats?format=yaml")[0] == 400


@pytest.mark.parametrize("path", ["/metrics", "/stats/prometheus", "/stats?format=prometheus"])
def test_metrics_is_prometheus_text(admin: AdminServer, path: str) -> None:
    status, content_type, body = get(admin.address, path)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (sample,) = [
        s for s in families["extproc_ext_proc_streams_started"].samples if s.name.endswith("_total")
    ]
    assert sample.labels == {"stat_prefix": "foo"} and sample.value == 1
    assert families["extproc_downstream_rq_time_seconds"].type == "histogram"


def test_metrics_openmetrics_on_request(admin: AdminServer) -> None:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    status, content_type, body = get(admin.address, "/metrics", accept)
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_ready_follows_the_proxy_state(admin: AdminServer, state: State) -> None:
    assert get(admin.address, "/ready") == (200, "text/plain; charset=UTF-8", b"LIVE\n")
    state.value = "DRAINING"
    assert get(admin.address, "/ready")[::2] == (503, b"DRAINING\n")


def test_unknown_path_is_404(admin: AdminServer) -> None:
    assert get(admin.address, "/clusters")[0] == 404


def test_stop_is_clean_and_prompt_with_a_stalled_client(stats: Stats, state: State) -> None:
    # A client timeout far beyond the bound: stop() must cut the stalled client, not wait.
    server = AdminServer(LOOPBACK, stats, state, client_timeout=60.0).start()
    address = server.address
    assert get(address, "/ready")[0] == 200
    stalled = socket.create_connection(address, timeout=STOP_BOUND_S)
    stalled.sendall(b"GET /stats HTTP/1.1\r\n")  # and never the end of the head
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(STOP_BOUND_S)
    try:
        assert not stopper.is_alive(), "stop() waited for the stalled client"
        assert cut(stalled)
    finally:
        stalled.close()
    server.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "extproc-admin"]
    assert not [t for t in threading.enumerate() if "process_request" in t.name]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=STOP_BOUND_S).close()


def test_a_listener_never_started_is_released(stats: Stats, state: State) -> None:
    server = AdminServer(LOOPBACK, stats, state)
    address = server.address
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=STOP_BOUND_S).close()


# Within the proxy --------------------------------------------------------------------------


def test_proxy_serves_admin_while_running_and_closes_it_on_stop(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with running_proxy(upstream.address, processor.address, admin="127.0.0.1:0") as proxy:
        assert proxy.admin is not None
        address = proxy.admin.address
        assert request(proxy.address, "GET", "/").status == 200
        assert get(address, "/ready")[::2] == (200, b"LIVE\n")
        status, _, body = get(address, "/stats?filter=downstream_cx_total")
        assert (status, body) == (200, b"http.ingress.downstream_cx_total: 1\n")
    assert proxy.state == "DRAINING"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=STOP_BOUND_S).close()


def test_stat_prefix_comes_from_the_filter_config(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    ext_proc = {"ext_proc": {"stat_prefix": "edge"}}
    with running_proxy(
        upstream.address, processor.address, ext_proc=ext_proc, admin="127.0.0.1:0"
    ) as proxy:
        assert proxy.admin is not None
        _, _, body = get(proxy.admin.address, "/stats?filter=streams_started")
    assert body == b"http.ingress.ext_proc.edge.streams_started: 0\n"


def test_admin_address_taken_fails_before_anything_starts(
    upstream: EchoUpstream, processor: ScriptedProcessor, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = {
            "listen": "127.0.0.1:0",
            "upstream": f"{upstream.address[0]}:{upstream.address[1]}",
            "processor": processor.address,
            "admin": f"127.0.0.1:{port}",
        }
        config = build_config(None, flags)
        with pytest.raises(OSError, match="in use") as failure:
            ProxyServer(config)
        assert failure.value.filename == f"127.0.0.1:{port}"
        with pytest.raises(SystemExit) as exited:
            cli._serve(config)
    assert exited.value.code == cli.EXIT_STARTUP
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
