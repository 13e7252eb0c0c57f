"""``--workers N``: a supervisor and N forked workers on one socket, as real processes."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from extproc.demo.upstream import EchoUpstream
from tests.support.opsload import Load, Recorder, admin_stats, admin_text
from tests.support.processor import ScriptedProcessor
from tests.support.proxy import Reply, request
from tests.support.proxyproc import NotifySocket, ProxyProcess, proxy_args

pytestmark = pytest.mark.integration


def start(
    upstream: EchoUpstream, processor: ScriptedProcessor, *more: str, **kw: object
) -> ProxyProcess:
    return ProxyProcess(
        "--listen",
        "127.0.0.1:0",
        *proxy_args(upstream.address, processor.address),
        "--admin",
        "127.0.0.1:0",
        *more,
        **kw,  # type: ignore[arg-type]
    )


def admin_port(proxy: ProxyProcess) -> int:
    return int(str(proxy.wait_event("admin_listening")["address"]).rsplit(":", 1)[1])


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Worker index -> pid of the latest worker started in that slot."""
    return {int(e["index"]): int(e["pid"]) for e in proxy.events("worker_started")}


def test_stats_are_the_sum_across_workers(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with start(upstream, processor, "--workers", "2") as proxy:
        proxy.wait_event("workers_ready")
        address = ("127.0.0.1", proxy.port())
        admin = admin_port(proxy)
        first, second = worker_pids(proxy).values()
        # Each worker alone on the socket in turn (the other stopped), so both count some.
        os.kill(second, signal.SIGSTOP)
        try:
            one = [request(address, "GET", f"/one/{i}").status for i in range(3)]
        finally:
            os.kill(second, signal.SIGCONT)
        os.kill(first, signal.SIGSTOP)
        try:
            two = [request(address, "GET", f"/two/{i}").status for i in range(5)]
        finally:
            os.kill(first, signal.SIGCONT)
        stats = admin_stats(admin)
        metrics = admin_text(admin, "/metrics")
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    assert one == [200] * 3 and two == [200] * 5
    # Worker lines say which worker wrote them.
    assert sorted(e["worker"] for e in proxy.events("request")) == [0] * 3 + [1] * 5
    assert stats["http.ingress.downstream_rq_total"] == 8
    assert stats["http.ingress.downstream_rq_2xx"] == 8
    assert stats["http.ingress.ext_proc.streams_started"] == 8
    assert stats["http.ingress.downstream_cx_total"] == 8
    assert "extproc_downstream_rq_total 8.0" in metrics
    assert stats["server.worker_restarts"] == 0


def test_killed_worker_is_replaced_and_serving_goes_on(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with start(upstream, processor, "--workers", "2") as proxy:
        proxy.wait_event("workers_ready")
        address = ("127.0.0.1", proxy.port())
        admin = admin_port(proxy)
        victim = worker_pids(proxy)[0]
        os.kill(victim, signal.SIGKILL)
        died = proxy.wait_event("worker_died")
        # The other worker serves while the replacement starts.
        during = [request(address, "GET", f"/during/{i}").status for i in range(5)]
        replaced = proxy.wait_event("worker_started", count=3)
        proxy.wait_event("listening", count=3)
        load = Load(address, clients=3)
        try:
            load.wait_count(30)
        finally:
            load.stop()
        stats = admin_stats(admin)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    assert died["pid"] == victim and died["signal"] == "SIGKILL" and died["index"] == 0
    assert replaced["index"] == 0 and replaced["pid"] != victim
    assert during == [200] * 5
    assert not load.failures and set(load.statuses) == {200}
    assert stats["server.worker_restarts"] == 1


def test_crash_looping_worker_backs_off(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with start(upstream, processor, "--workers", "2") as proxy:
        proxy.wait_event("workers_ready")
        delays = []
        for n in range(3):
            os.kill(worker_pids(proxy)[1], signal.SIGKILL)
            delays.append(proxy.wait_event("worker_died", count=n + 1)["restart_in"])
            proxy.wait_event("worker_started", count=n + 3)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    # Workers that die young wait longer each time before they are replaced.
    assert delays == [0.1, 0.2, 0.4]


def test_sigterm_drains_in_flight_requests_of_every_worker(upstream: EchoUpstream) -> None:
    recorder = Recorder()
    with ScriptedProcessor(recorder) as processor:
        try:
            with start(upstream, processor, "--workers", "2") as proxy:
                proxy.wait_event("workers_ready")
                address = ("127.0.0.1", proxy.port())
                replies: list[Reply] = []

                def hold(i: int) -> None:
                    replies.append(request(address, "GET", f"/hold/{i}"))

                clients = [threading.Thread(target=hold, args=(i,)) for i in range(4)]
                for client in clients:
                    client.start()
                recorder.wait_held(4)
                proxy.signal(signal.SIGTERM)
                proxy.wait_event("stop_requested", count=3)  # the supervisor and both workers
                refused = _refused(address)
                recorder.release.set()
                for client in clients:
                    client.join(30)
                assert proxy.wait() == 0
        finally:
            recorder.release.set()
    assert refused
    assert [r.status for r in replies] == [200] * 4
    assert len(proxy.events("worker_stopped")) == 2
    assert all(e["unfinished_requests"] == 0 for e in proxy.events("stopped"))


def _refused(address: tuple[str, int]) -> bool:
    """Whether new connections are refused, once every copy of the listener is closed."""
    for _ in range(300):
        try:
            socket.create_connection(address, timeout=5).close()
        except OSError:
            return True
        threading.Event().wait(0.05)
    return False


def test_reload_reaches_every_worker_and_notify_speaks_for_all(
    tmp_path: Path, upstream: EchoUpstream
) -> None:
    recorder = Recorder()
    config = tmp_path / "filter.yaml"
    config.write_text("processing_mode: {response_header_mode: SKIP}\n")
    notify = NotifySocket(tmp_path)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    try:
        with (
            ScriptedProcessor(recorder) as processor,
            start(upstream, processor, "--workers", "2", "--config", str(config), env=env) as proxy,
        ):
            assert notify.next() == "READY=1"
            proxy.wait_event("listening", count=2)
            assert notify.wait_for("^WATCHDOG=1$")
            address = ("127.0.0.1", proxy.port())
            first, second = worker_pids(proxy).values()
            config.write_text("processing_mode: {response_header_mode: SEND}\n")
            proxy.signal(signal.SIGHUP)
            assert notify.wait_for("^RELOADING=1\nMONOTONIC_USEC=[0-9]+$")
            assert notify.wait_for("^READY=1$")
            proxy.wait_event("reloaded", count=2)
            for pid in (first, second):
                os.kill(pid, signal.SIGSTOP)
                try:
                    other = ("127.0.0.1", proxy.port())
                    assert request(other, "GET", f"/after/{pid}").status == 200
                finally:
                    os.kill(pid, signal.SIGCONT)
            config.write_text("processing_mode: {request_body_mode: GRPC}\n")
            proxy.signal(signal.SIGHUP)
            failed = proxy.wait_event("reload_failed")
            assert notify.wait_for("^READY=1$")
            stats = admin_stats(admin_port(proxy))
            proxy.signal(signal.SIGTERM)
            assert notify.wait_for("^STOPPING=1$")
            assert proxy.wait() == 0
    finally:
        notify.close()
    assert address
    # Each worker, alone on the socket, served with the new configuration.
    for pid in (first, second):
        assert recorder.kinds(f"/after/{pid}".encode()) == [["request_headers", "response_headers"]]
    # The supervisor refused the bad file: no worker tried it.
    assert failed["field"] == "ext_proc.processing_mode.request_body_mode"
    assert len(proxy.events("reload_failed")) == 1
    assert stats["server.reloads"] == 1 and stats["server.reload_failures"] == 1


def test_workers_stop_when_the_supervisor_dies(
    upstream: EchoUpstream, processor: ScriptedProcessor
) -> None:
    with start(upstream, processor, "--workers", "2") as proxy:
        proxy.wait_event("workers_ready")
        workers = list(worker_pids(proxy).values())
        proxy.signal(signal.SIGKILL)
        assert proxy.wait() == -signal.SIGKILL
        # Each sees the end of its channel to the supervisor and drains.
        assert len(proxy.events("supervisor_gone")) == 2
        assert len(proxy.events("stopped")) == 2
    for pid in workers:
        assert _gone(pid)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie left for whoever adopted it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _thread_masks(pid: int) -> list[set[int]]:
    """The CPU mask of every thread of ``pid`` (one that just ended is skipped)."""
    masks = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            masks.append(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            continue
    return masks


@pytest.mark.parametrize("workers", [1, 2])
def test_cpu_affinity_pins_each_worker(
    upstream: EchoUpstream, processor: ScriptedProcessor, workers: int
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    with start(upstream, processor, "--workers", str(workers), "--cpu-affinity") as proxy:
        proxy.wait_event("listening", count=workers)
        address = ("127.0.0.1", proxy.port())
        assert request(address, "GET", "/").status == 200
        pinned = proxy.events("cpu_pinned")
        pids = list(worker_pids(proxy).values()) if workers > 1 else [proxy.pid]
        # Every thread of each worker, those started after pinning included.
        threads = {pid: _thread_masks(pid) for pid in pids}
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    assert sorted(int(e["cpu"]) for e in pinned) == sorted(
        cpus[i % len(cpus)] for i in range(workers)
    )
    for i, pid in enumerate(pids):
        assert len(threads[pid]) > 1
        assert all(mask == {cpus[i % len(cpus)]} for mask in threads[pid])
