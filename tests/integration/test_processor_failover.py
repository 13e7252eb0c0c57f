"""Several processors behind one target: one dies under load, or goes silent behind the network.

The processors run in processes of their own and the dying one is SIGKILLed, so its
connections are reset by the kernel as when a host crashes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from extproc.demo.upstream import EchoUpstream
from extproc.io.server import ProxyServer
from tests.support.processor_process import ProcessorProcess
from tests.support.proxy import Client, Reply, running_proxy
from tests.support.relay import Relay

pytestmark = pytest.mark.integration

CLIENTS = 6
AFTER_KILL = 5
SCOPE = "http.ingress.ext_proc."


def served_by(reply: Reply) -> str | None:
    """The processor that tagged the request the echo upstream got (None: untagged)."""
    if reply.status != 200:
        return None
    headers = dict(json.loads(reply.body)["headers"])
    return headers.get("x-served-by")


@dataclass
class Worker:
    """One client thread: requests in a loop until one fails, then AFTER_KILL more."""

    address: tuple[str, int]
    replies: list[Reply] = field(default_factory=list)
    failed_at: int | None = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.failed_at is None or len(self.replies) < self.failed_at + 1 + AFTER_KILL:
                with Client(self.address, timeout=60) as client:
                    reply = client.request("GET", "/work")
                self.replies.append(reply)
                if self.failed_at is None and served_by(reply) is None:
                    self.failed_at = len(self.replies) - 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


@pytest.fixture
def three_processors() -> Iterator[tuple[ProcessorProcess, ProcessorProcess, ProcessorProcess]]:
    with (
        ProcessorProcess("a") as a,
        ProcessorProcess("b") as b,
        ProcessorProcess("victim", hold=True) as victim,
    ):
        yield a, b, victim


def _load(proxy: ProxyServer, victim: ProcessorProcess) -> list[Worker]:
    """Load until every client waits on the victim, kill it, let the clients go on."""
    workers = [Worker(proxy.address) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    # Round robin sends every client's requests to the victim in turn, where they stay.
    victim.wait_held(CLIENTS)
    victim.kill()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert [w.error for w in workers] == [None] * CLIENTS
    return workers


@pytest.mark.parametrize("allow", [False, True], ids=["fail-closed", "failure-mode-allow"])
def test_killed_processor_fails_its_streams_and_the_others_take_the_load(
    three_processors: tuple[ProcessorProcess, ProcessorProcess, ProcessorProcess],
    upstream: EchoUpstream,
    allow: bool,
) -> None:
    a, b, victim = three_processors
    target = f"ipv4:{a.address},{b.address},{victim.address}"
    with running_proxy(
        upstream.address, target, failure_mode_allow=allow, message_timeout="120s"
    ) as proxy:
        workers = _load(proxy, victim)
    stats = proxy.stats.snapshot()  # once stopped: every request is counted
    for worker in workers:
        assert worker.failed_at is not None
        before = worker.replies[: worker.failed_at]
        failed = worker.replies[worker.failed_at]
        after = worker.replies[worker.failed_at + 1 :]
        # The request held by the victim when it died gets the configured failure behaviour.
        if allow:
            assert failed.status == 200 and served_by(failed) is None  # unprocessed, let through
        else:
            assert failed.status == 500
        # Before and after, every request is processed by a survivor.
        assert {served_by(r) for r in before + after} <= {"a", "b"}
        assert len(after) == AFTER_KILL
    served = [served_by(r) for w in workers for r in w.replies]
    assert served.count("a") > 0 and served.count("b") > 0
    assert stats[SCOPE + "streams_failed"] == CLIENTS
    assert stats[SCOPE + "failure_mode_allowed"] == (CLIENTS if allow else 0)
    assert stats[SCOPE + "message_timeouts"] == 0
    assert stats["http.ingress.downstream_rq_5xx"] == (0 if allow else CLIENTS)


def test_keepalive_notices_a_processor_gone_silent(upstream: EchoUpstream) -> None:
    """A held request on a processor whose network goes quiet fails once a ping goes
    unanswered, long before the 120 s message timeout would end it."""
    with (
        ProcessorProcess("silent", hold=True) as silent,
        Relay(("127.0.0.1", silent.port)) as relay,
    ):
        channel: dict[str, Any] = {
            "processor_keepalive_time": 0.5,
            "processor_keepalive_timeout": 0.5,
        }
        with (
            running_proxy(
                upstream.address,
                relay.address,
                message_timeout="120s",
                **channel,
            ) as proxy,
            Client(proxy.address, timeout=60) as client,
        ):
            replies: list[Reply] = []
            thread = threading.Thread(
                target=lambda: replies.append(client.request("GET", "/held")), daemon=True
            )
            thread.start()
            silent.wait_held(1)
            relay.blackhole()
            thread.join(60)
        stats = proxy.stats.snapshot()
    assert [r.status for r in replies] == [500]
    assert stats[SCOPE + "streams_failed"] == 1
    assert stats[SCOPE + "message_timeouts"] == 0
    assert upstream.requests == []
