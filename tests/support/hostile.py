"""Hostile-input harness: a strict recording upstream, a raw client, and the request corpus.

The upstream is the judge of what got through: it parses what a proxy sends it with rules
stricter than any proxy's (CRLF only, token names, one Host, never Content-Length with
Transfer-Encoding, only ``chunked`` as a coding, no chunk extensions) and records every message,
complete or cut off. It answers each request ``Connection: close`` and closes, so a proxy opens
one upstream connection per request, and a message can never be followed by a second one (a
smuggled request) on the same connection without the upstream calling it a violation.

Corpus entries live in ``tests/hostile/corpus``: ``NAME.http`` holds the raw bytes and
``NAME.toml`` what extproc and Envoy 1.40 do with them (see :class:`Expected`).
"""

from __future__ import annotations

import codecs
import re
import select
import socket
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

CORPUS = Path(__file__).resolve().parents[1] / "hostile" / "corpus"
# Long enough for a loaded 2-core machine; a hang is only declared after it.
ANSWER_TIMEOUT_S = 15.0
PROBE_TARGET = b"/__probe__"
PROBE = b"GET " + PROBE_TARGET + b" HTTP/1.1\r\nHost: probe.example\r\n\r\n"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (\S+) HTTP/1\.1")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_MAX_HEAD = 256 * 1024
# How often the acceptor looks at the stop flag.
_ACCEPT_POLL_S = 0.1


# The strict upstream ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the upstream saw it; ``complete`` False: the connection ended inside it."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    complete: bool

    def summary(self) -> str:
        text = f"{self.method.decode('latin-1')} {self.target.decode('latin-1')}"
        return text if self.complete else text + " (aborted)"


class Violation(Exception):
    """Bytes that are not exactly one valid HTTP/1.1 request reached the upstream."""


class _Incomplete(Exception):
    pass


class _Reader:
    """Strict incremental parsing of one upstream connection's bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> None:
        if self.eof:
            raise _Incomplete
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ConnectionError):
            data = b""
        if not data:
            self.eof = True
            raise _Incomplete
        self.buf += data

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise Violation("line longer than 256 KiB")
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        if b"\r" in line or b"\n" in line:
            raise Violation(f"bare CR or LF in {line[:80]!r}")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


def _parse_head(reader: _Reader) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    request_line = reader.line()
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise Violation(f"bad request line {request_line[:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    while line := reader.line():
        field_match = _FIELD.fullmatch(line)
        if field_match is None:
            raise Violation(f"bad header line {line[:80]!r}")
        headers.append((field_match[1].lower(), field_match[2]))
    return match[1], match[2], headers


def _body_framing(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length, or None for chunked; raises Violation on anything ambiguous."""
    names = [n for n, _ in headers]
    if names.count(b"host") != 1:
        raise Violation(f"{names.count(b'host')} Host headers")
    lengths = [v for n, v in headers if n == b"content-length"]
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    if lengths and codings:
        raise Violation("Content-Length with Transfer-Encoding")
    if codings:
        if codings != [b"chunked"]:
            raise Violation(f"Transfer-Encoding {codings!r}")
        return None
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise Violation(f"Content-Length {lengths!r}")
    return int(lengths[0]) if lengths else 0


def _chunked_body(reader: _Reader, body: bytearray) -> None:
    while True:
        size_line = reader.line()
        if _CHUNK_SIZE.fullmatch(size_line) is None:
            raise Violation(f"bad chunk size line {size_line[:80]!r}")
        size = int(size_line, 16)
        if size == 0:
            break
        body += reader.exactly(size)
        if reader.exactly(2) != b"\r\n":
            raise Violation("chunk data not followed by CRLF")
    while line := reader.line():
        if _FIELD.fullmatch(line) is None:
            raise Violation(f"bad trailer line {line[:80]!r}")


class RecordingUpstream:
    """A raw-socket upstream on 127.0.0.1:0 that records and judges every request."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.received: list[Received] = []
        self.violations: list[str] = []
        self._active = 0
        self._changed = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="recording-upstream")
        self._acceptor.start()

    def __enter__(self) -> RecordingUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping = True
        self._acceptor.join(10)
        self.sock.close()
        for thread in list(self._threads):
            thread.join(ANSWER_TIMEOUT_S)

    def take(self) -> tuple[list[Received], list[str]]:
        """What arrived since the last take, once every connection made so far has ended.

        Every upstream connection a proxy opened for a request is made before the proxy
        answers that request, so once the client has its answer, that connection is either
        accepted or waiting in the backlog; both are drained here.
        """
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        with self._changed:
            while self._active or self._backlog_waiting():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._active} upstream connection(s) still open")
                self._changed.wait(min(left, 0.05))
            received, self.received = self.received, []
            violations, self.violations = self.violations, []
        return received, violations

    def _backlog_waiting(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def _accept(self) -> None:
        self.sock.setblocking(False)
        while not self._stopping:
            if not select.select([self.sock], [], [], _ACCEPT_POLL_S)[0]:
                continue
            # Accepted and counted under the lock take() checks with: no moment where a
            # connection is neither in the backlog nor counted.
            with self._changed:
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    continue
                self._active += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(ANSWER_TIMEOUT_S)
        reader = _Reader(conn)
        record: Received | None = None
        violation: str | None = None
        try:
            record = self._read_one(reader)
            if record.complete:
                body = b"seen " + record.target + b"\n"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: text/plain\r\n"
                    b"x-seen-target: " + record.target + b"\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                conn.shutdown(socket.SHUT_WR)
                # Anything after the message on this connection is a second request.
                conn.settimeout(ANSWER_TIMEOUT_S)
                extra = reader.buf or conn.recv(65536)
                if extra:
                    violation = f"bytes after the message: {bytes(extra[:80])!r}"
        except Violation as err:
            violation = str(err)
        except OSError:
            pass
        finally:
            conn.close()
            with self._changed:
                if record is not None:
                    self.received.append(record)
                if violation is not None:
                    self.violations.append(violation)
                self._active -= 1
                self._changed.notify_all()

    def _read_one(self, reader: _Reader) -> Received:
        method = target = b""
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        try:
            method, target, headers = _parse_head(reader)
            length = _body_framing(headers)
            if length is None:
                _chunked_body(reader, body)
            else:
                body += reader.exactly(length)
        except _Incomplete:
            if not method and not reader.buf:
                raise Violation("a connection without a request") from None
            return Received(method, target, tuple(headers), bytes(body), False)
        return Received(method, target, tuple(headers), bytes(body), True)


# The raw client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a client saw: the statuses of the responses, then whether the connection was
    ``closed``, still ``open`` (it answered a probe request), or ``hung`` (neither)."""

    responses: tuple[int, ...]
    after: str

    def __str__(self) -> str:
        return f"responses={list(self.responses)} after={self.after}"


def _split_response(data: bytearray) -> tuple[int, dict[bytes, bytes], int] | None:
    """(status, headers, bytes used) of the first whole response in ``data``, if any."""
    if not data:
        return None
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(bytes(data))
    status, headers = 0, {}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, len(data) - len(conn.trailing_data[0])


def observe(address: tuple[str, int], data: bytes, timeout: float = ANSWER_TIMEOUT_S) -> Outcome:
    """Send ``data`` on a new connection and see what comes back.

    After each response that leaves the connection open, a probe request is sent (pipelined
    behind whatever the proxy still has to answer); its answer shows the connection is still
    usable and ends the observation.
    """
    responses: list[int] = []
    buf = bytearray()
    probed = False
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while True:
            parsed = _split_response(buf)
            if parsed is not None:
                status, headers, used = parsed
                del buf[:used]
                if headers.get(b"x-seen-target") == PROBE_TARGET:
                    return Outcome(tuple(responses), "open")
                responses.append(status)
                if headers.get(b"connection", b"").lower() != b"close" and not probed:
                    sock.sendall(PROBE)
                    probed = True
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome(tuple(responses), "hung")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return Outcome(tuple(responses), "hung")
            except ConnectionError:
                chunk = b""
            if not chunk:
                if buf:
                    responses.append(0)  # a partial response, then the close
                return Outcome(tuple(responses), "closed")
            buf += chunk


# The corpus -------------------------------------------------------------------------------


_REPEAT = re.compile(rb"\$\{(\d+)\*([^}$]*)\}")


def decode_http(text: bytes) -> bytes:
    """The raw bytes a ``.http`` file describes.

    Line breaks in the file are layout only; bytes are written as Python escapes (``\\r\\n``,
    ``\\0``, ``\\t``, ``\\xff``), and ``${N*TEXT}`` repeats TEXT N times (for over-long
    lines; repeats may nest).
    """
    flat = text.replace(b"\r", b"").replace(b"\n", b"")
    expanded = b""
    while expanded != flat:  # innermost repeats first
        expanded, flat = flat, _REPEAT.sub(lambda m: m[2] * int(m[1]), flat)
    return codecs.escape_decode(expanded)[0]


@dataclass(frozen=True, slots=True)
class Expected:
    """One side's expected result: response statuses, what became of the connection, and
    the summaries of what the upstream received (``METHOD target``, `` (aborted)`` when the
    connection was cut inside the message)."""

    responses: tuple[int, ...]
    after: str
    upstream: tuple[str, ...]

    @classmethod
    def from_toml(cls, table: dict[str, Any]) -> Expected:
        return cls(tuple(table["responses"]), table["after"], tuple(table["upstream"]))


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    group: str
    about: str
    data: bytes
    extproc: Expected
    envoy: Expected
    difference: str = field(default="")


def load_corpus() -> list[Entry]:
    entries = []
    for path in sorted(CORPUS.glob("*.http")):
        meta = tomllib.loads(path.with_suffix(".toml").read_text())
        entry = Entry(
            name=path.stem,
            group=meta["group"],
            about=meta["about"],
            data=decode_http(path.read_bytes()),
            extproc=Expected.from_toml(meta["extproc"]),
            envoy=Expected.from_toml(meta["envoy"]),
            difference=meta.get("difference", ""),
        )
        if (entry.extproc != entry.envoy) != bool(entry.difference):
            raise ValueError(f"{path.name}: a difference from Envoy must be explained, only then")
        entries.append(entry)
    return entries


def run_entry(address: tuple[str, int], upstream: RecordingUpstream, data: bytes) -> Expected:
    """Send one entry's bytes and gather the result in the shape of an expectation."""
    outcome = observe(address, data)
    received, violations = upstream.take()
    if violations:
        raise Violation(f"the upstream got invalid HTTP/1.1: {violations}")
    seen = tuple(r.summary() for r in received if r.target != PROBE_TARGET)
    return Expected(outcome.responses, outcome.after, seen)
