"""Raw-socket peers that misbehave on purpose (urllib3's socket_handler idea)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import h11


class ScriptedUpstream:
    """A one-shot raw upstream: reads a request, waits for ``go`` if given, answers ``answer``
    bytes, then closes (or, with ``stall``, holds the connection until closed)."""

    def __init__(
        self,
        answer: bytes,
        stall: bool = False,
        go: threading.Event | None = None,
    ) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.address = self.sock.getsockname()
        self.answer, self.stall = answer, stall
        self.release = threading.Event()
        self.go = go
        self.received = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            self.received.set()
            if self.go is not None:
                self.go.wait(30)
            conn.sendall(self.answer)
            if self.stall:
                self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.thread.join(10)
        self.sock.close()


GOOD_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood"
Script = Callable[[socket.socket, threading.Event], None]


def read_request_head(conn: socket.socket) -> bytes:
    """Read until the end of a request head (the fault scripts' requests have no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


class FaultyUpstream:
    """A raw upstream whose first connections each run a fault script; every later connection
    runs ``then``, by default answering each request with ``GOOD_ANSWER`` (keep-alive), so the
    next request can be seen to work. ``release`` ends any script still waiting."""

    def __init__(self, *scripts: Script, then: Script | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.scripts = list(scripts)
        self.then = then or _answer_good
        self.release = threading.Event()
        self.connections = 0
        self._threads: list[threading.Thread] = []
        acceptor = threading.Thread(target=self._accept, daemon=True)
        acceptor.start()
        self._threads.append(acceptor)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            script = self.scripts.pop(0) if self.scripts else self.then
            thread = threading.Thread(
                target=_run_script, args=(script, conn, self.release), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.release.set()
        # shutdown, not just close, wakes the acceptor blocked in accept().
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> FaultyUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_script(script: Script, conn: socket.socket, release: threading.Event) -> None:
    conn.settimeout(30)
    with conn, contextlib.suppress(OSError):
        script(conn, release)


def _answer_good(conn: socket.socket, release: threading.Event) -> None:
    while read_request_head(conn):
        conn.sendall(GOOD_ANSWER)


def reset(conn: socket.socket, release: threading.Event) -> None:
    """Close with a TCP RST (SO_LINGER 0) once the request arrived."""
    read_request_head(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def answer_then_close(answer: bytes) -> Script:
    def script(conn: socket.socket, release: threading.Event) -> None:
        read_request_head(conn)
        conn.sendall(answer)

    return script


def answer_then_hold(answer: bytes) -> Script:
    """Send ``answer`` (possibly nothing) and keep the connection open until released."""

    def script(conn: socket.socket, release: threading.Event) -> None:
        read_request_head(conn)
        if answer:
            conn.sendall(answer)
        release.wait(30)

    return script


def answer_then_serve(answer: bytes) -> Script:
    """Send ``answer`` for the first request and keep serving the connection: whatever the
    proxy sends next on it is answered ``GOOD_ANSWER`` too."""

    def script(conn: socket.socket, release: threading.Event) -> None:
        read_request_head(conn)
        conn.sendall(answer)
        _answer_good(conn, release)

    return script


UPSTREAM_BODY = b"from-upstream"


class CapturingUpstream:
    """Records every byte the proxy sends on each connection, to be parsed afterwards.

    Each connection is answered ``answer`` once h11 saw a complete request on it (400 if h11
    refused it), its sending side is shut, and it is read to its end. ``answer`` should say
    ``connection: close``, so that the proxy ends it and the capture is complete.
    :meth:`collect` hands out the captures of the connections made so far.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        self.answer = (
            b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\nconnection: close\r\n\r\n" + UPSTREAM_BODY
        )
        self._lock = threading.Lock()
        self._captures: list[bytes] = []
        self._threads: list[threading.Thread] = []
        self._marker: tuple[str, int] | None = None
        self._marker_seen = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if peer == self._marker:
                conn.close()
                self._marker_seen.set()
                continue
            thread = threading.Thread(target=self._capture, args=(conn, self.answer), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _capture(self, conn: socket.socket, answer: bytes) -> None:
        data = bytearray()
        parser = h11.Connection(h11.SERVER)
        answered = False
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                data += chunk
                if not answered:
                    answered = _complete(parser, chunk)
                    if answered:
                        conn.sendall(answer if parser.their_state is h11.DONE else BAD_REQUEST)
                        # The end of a close-delimited answer; reading goes on to the end.
                        conn.shutdown(socket.SHUT_WR)
        with self._lock:
            self._captures.append(bytes(data))

    def collect(self, timeout: float = 30.0) -> list[bytes]:
        """The bytes of every connection accepted so far, once each was closed."""
        # The listen queue is FIFO: once a fresh connection of ours is accepted, every
        # connection the proxy made before it has been accepted too.
        self._marker_seen.clear()
        with socket.socket() as marker:
            marker.bind(("127.0.0.1", 0))
            self._marker = marker.getsockname()
            marker.settimeout(timeout)
            marker.connect(self.address)
            if not self._marker_seen.wait(timeout):
                raise TimeoutError("the capturing upstream stopped accepting")
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError("the proxy kept an upstream connection open")
        with self._lock:
            captures, self._captures = self._captures, []
        return captures

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(10)

    def __enter__(self) -> CapturingUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def _complete(parser: h11.Connection, chunk: bytes) -> bool:
    """Feed ``chunk``; True once the request is complete or h11 refused it."""
    parser.receive_data(chunk)
    try:
        while (event := parser.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return True
    except h11.RemoteProtocolError:
        return True
    return False


def assert_one_message(
    conn: h11.Connection, data: bytes, kind: type, *, may_cut: bool = False
) -> None:
    """``data`` holds exactly one complete message of ``kind``, then the close.

    With ``may_cut``, the message may instead stop short in its body, where its framing shows
    it incomplete: how a reply that fails once its head went out ends (Envoy resets the
    stream).
    """
    conn.receive_data(data)
    conn.receive_data(b"")
    events: list[Any] = []
    error = ""
    try:
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.InformationalResponse):
                events.append(event)
            assert event is not h11.NEED_DATA and not isinstance(event, h11.ConnectionClosed), (
                f"incomplete message: {events!r} from {data!r}"
            )
    except h11.RemoteProtocolError as err:
        error = str(err)
    if error:
        cut = may_cut and events and "without sending complete message body" in error
        assert cut, f"{error} in {data!r}"
        return
    assert isinstance(events[0], kind), f"{events[0]!r} from {data!r}"
    # (h11 pauses after a request naming Upgrade; what matters is that nothing follows.)
    assert conn.trailing_data == (b"", True), f"bytes after the message: {data!r}"
