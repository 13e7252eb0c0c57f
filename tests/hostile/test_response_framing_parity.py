"""Upstream responses whose body length does not fit in 64 bits, through Envoy 1.40 and extproc.

Envoy's HTTP/1 codec holds a Content-Length or a chunk size in 64 bits and refuses one beyond
(a codec error, as for any malformed response); h11 takes 20 digits of either and would wait
for that much body. One upstream answers each case by the request's target, sending the
rest of its answer only once the client has the response head (or has its whole answer), so
a length that arrives after the head is seen after the head went out, without a sleep.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest

from extproc.core import wire
from extproc.io.server import ProxyServer
from tests.support.envoy import EnvoyProxy, require_envoy
from tests.support.proxy import running_proxy
from tests.support.rawpeer import FaultyUpstream, read_request_head

pytestmark = pytest.mark.parity

WAIT_S = 15.0
CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
OK_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
PROTOCOL_ERROR = wire.upstream_reset(wire.PROTOCOL_ERROR).body


@dataclass(frozen=True, slots=True)
class Seen:
    """What the client saw: the status (0: none), the body, and then whether the response was
    ``cut`` off by a close, or whole with the connection ``open`` (a next request on it was
    answered) or ``closed``."""

    status: int
    body: bytes
    after: str


@dataclass(frozen=True, slots=True)
class Case:
    first: bytes  # the upstream's answer up to the head the proxy reads
    rest: bytes  # sent once the client has the response head; then the upstream closes
    seen: Seen  # through either proxy


REFUSED = Seen(502, PROTOCOL_ERROR, "open")
CUT_AFTER_HELLO = Seen(200, b"hello", "cut")

CASES = {
    # Refused with the head it came with: 502, and the client's connection stays.
    "chunk-size-over-64-bits": Case(CHUNKED + b"10000000000000000\r\nhello", b"", REFUSED),
    "content-length-over-64-bits": Case(
        b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551616\r\n\r\nhello",
        b"",
        REFUSED,
    ),
    # After the head went out the response can only be cut off: at once, not at a timeout.
    "chunk-size-over-64-bits-after-the-head": Case(
        CHUNKED + b"5\r\nhello\r\n", b"10000000000000000\r\nhello", CUT_AFTER_HELLO
    ),
    # 2^64 - 1 fits: both pass on what comes, until the upstream closes.
    "chunk-size-of-64-bits": Case(CHUNKED + b"ffffffffffffffff\r\nhello", b"", CUT_AFTER_HELLO),
}


class CaseScript:
    """Every upstream connection's script: ``/case/NAME`` is answered as :data:`CASES` says,
    anything else with :data:`OK_ANSWER` (keep-alive). ``go`` lets the current case send the
    rest of its answer."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def __call__(self, conn: socket.socket, release: threading.Event) -> None:
        while head := read_request_head(conn):
            target = head.split(b" ", 2)[1].decode()
            case = CASES.get(target.removeprefix("/case/"))
            if case is None:
                conn.sendall(OK_ANSWER)
                continue
            go = self.go
            conn.sendall(case.first)
            go.wait(WAIT_S)
            if case.rest:
                conn.sendall(case.rest)
            return


def fetch(address: tuple[str, int], name: str, script: CaseScript) -> Seen:
    """GET the case, then (when its response ended whole) one more request on the connection."""
    script.go = go = threading.Event()
    conn = h11.Connection(h11.CLIENT)
    status, body = 0, b""
    with socket.create_connection(address, timeout=WAIT_S) as sock:
        request = h11.Request(method="GET", target=f"/case/{name}", headers=[("host", "a")])
        sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    go.set()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        except (h11.RemoteProtocolError, ConnectionError):
            go.set()
            return Seen(status, body, "cut")
        go.set()
        if conn.our_state is h11.MUST_CLOSE:
            return Seen(status, body, "closed")
        conn.start_next_cycle()
        sock.sendall(conn.send(h11.Request(method="GET", target="/ok", headers=[("host", "a")])))
        sock.sendall(conn.send(h11.EndOfMessage()))
        data = sock.recv(65536)
    return Seen(status, body, "open" if data.startswith(b"HTTP/1.1 200") else "closed")


@pytest.fixture(scope="module")
def script() -> CaseScript:
    return CaseScript()


@pytest.fixture(scope="module")
def case_upstream(script: CaseScript) -> Iterator[FaultyUpstream]:
    with FaultyUpstream(then=script) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def envoy(
    case_upstream: FaultyUpstream, processor_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProxy]:
    require_envoy()
    host, port = processor_target.rsplit(":", 1)
    with EnvoyProxy(
        upstream=case_upstream.address,
        processor=(host, int(port)),
        ext_proc={"message_timeout": "20s"},
        workdir=Path(tmp_path_factory.mktemp("envoy-response-framing")),
    ) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def extproc_proxy(case_upstream: FaultyUpstream, processor_target: str) -> Iterator[ProxyServer]:
    with running_proxy(case_upstream.address, processor_target) as proxy:
        yield proxy


@pytest.mark.parametrize("name", sorted(CASES))
def test_response_length_envoy_and_extproc(
    name: str, envoy: EnvoyProxy, extproc_proxy: ProxyServer, script: CaseScript
) -> None:
    through_envoy = fetch(envoy.address, name, script)
    through_extproc = fetch(extproc_proxy.address, name, script)
    assert through_envoy == through_extproc == CASES[name].seen, envoy.log_tail()
