"""Envoy's ``http_service`` transport: each ``ProcessingRequest`` POSTed as JSON to an HTTP
processor, from the worker thread itself, over a pool of keep-alive HTTP/1.1 connections.

The exchange and the loop are the gRPC transport's; only the stream differs. With
``http_service`` only header events go to the processor (the config refuses bodies and
trailers), so a message is always answered before the next is sent: :meth:`HttpStream.send`
writes the POST, :meth:`HttpStream.recv` reads its answer, both blocking with a deadline. No
thread is started. The JSON is protobuf's ``json_format``, the messages the gRPC path uses.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time

import h11
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from extproc.config import ProcessorSettings
from extproc.errors import ProcessorHttpError, ProcessorTimeout
from extproc.http_service import HttpTransport

READ_SIZE = 64 * 1024
# A processor's answer is header mutations or an immediate response: bounded, so a processor
# that streams without end cannot take the proxy's memory.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class HttpClient:
    """The keep-alive connections to one HTTP processor, shared by the worker threads."""

    def __init__(self, settings: ProcessorSettings, max_streams: int = 64) -> None:
        assert settings.http is not None
        self.settings = settings
        self.transport: HttpTransport = settings.http
        self._idle: list[_Connection] = []
        self._max_idle = max_streams
        self._lock = threading.Lock()
        self._closed = False

    def open_stream(self) -> HttpStream:
        return HttpStream(self)

    def checkout(self, deadline: float) -> _Connection:
        """An idle connection the processor has not closed, else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _Connection.connect(self.transport, deadline)
            if conn.usable():
                return conn
            conn.close()

    def checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Connection:
    """One HTTP/1.1 connection to the processor, parsed by h11."""

    __slots__ = ("sock", "h11")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    def connect(cls, transport: HttpTransport, deadline: float) -> _Connection:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left to connect")
        sock = socket.create_connection((transport.host, transport.port), timeout=left)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transport.tls is not None:
            sock = transport.tls.wrap_socket(sock, server_hostname=transport.server_hostname)
        return cls(sock)

    def usable(self) -> bool:
        """Whether an idle connection can carry the next POST: readable means the processor
        closed it (or sent what nobody asked for)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    def post(
        self, transport: HttpTransport, stream_id: bytes, body: bytes, deadline: float
    ) -> None:
        headers = [
            (b"host", transport.authority),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", stream_id),
            *transport.headers,
        ]
        request = h11.Request(method=b"POST", target=transport.path, headers=headers)
        data = self.h11.send(request) or b""
        data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        self.sock.sendall(data)

    def read_response(self, deadline: float) -> tuple[int, bytes]:
        """The status and body of the answer; raises TimeoutError at ``deadline``."""
        status = 0
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer in time")
                self.sock.settimeout(left)
                self.h11.receive_data(self.sock.recv(READ_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_RESPONSE_BYTES:
                    raise ProcessorHttpError(f"answer over {MAX_RESPONSE_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the processor closed the connection")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.sock.close()


class HttpStream:
    """The messages of one HTTP exchange: a POST each, tied by one ``x-request-id`` (the
    stream id Envoy sends, a decimal 64-bit number)."""

    __slots__ = ("_client", "_id", "_conn", "_deadline", "_failure")

    def __init__(self, client: HttpClient) -> None:
        self._client = client
        self._id = str(random.getrandbits(64)).encode()
        self._conn: _Connection | None = None  # carrying a POST whose answer is unread
        self._deadline = 0.0  # the POST's http_uri.timeout
        self._failure = ""  # why the POST could not be written, told by the next recv

    def send(self, request: ep.ProcessingRequest) -> None:
        transport = self._client.transport
        body = json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)
        self._deadline = time.monotonic() + transport.timeout
        conn: _Connection | None = None
        try:
            conn = self._client.checkout(self._deadline)
            conn.post(transport, self._id, body.encode(), self._deadline)
        except (OSError, h11.ProtocolError) as err:
            if conn is not None:
                conn.close()
            self._failure = f"cannot POST to the processor: {type(err).__name__}: {err}"
            return
        self._conn = conn

    def recv(self, timeout: float) -> ep.ProcessingResponse | None:
        """The answer to the last message. Raises :class:`ProcessorTimeout` after ``timeout``
        (the message timeout) and :class:`ProcessorHttpError` when the POST failed, including
        when its own http_uri.timeout passes first."""
        if self._failure:
            failure, self._failure = self._failure, ""
            raise ProcessorHttpError(failure)
        conn, self._conn = self._conn, None
        assert conn is not None, "recv without a message sent"
        message_deadline = time.monotonic() + timeout
        deadline = min(message_deadline, self._deadline)
        try:
            status, body = conn.read_response(deadline)
        except TimeoutError:
            conn.close()
            if self._deadline <= message_deadline:
                raise ProcessorHttpError("no answer within http_uri.timeout") from None
            raise ProcessorTimeout(f"no reply within {timeout:g}s") from None
        except (OSError, h11.ProtocolError, ProcessorHttpError) as err:
            conn.close()
            raise ProcessorHttpError(f"the answer was lost: {err}") from None
        if conn.reusable():
            self._client.checkin(conn)
        else:
            conn.close()
        if status != 200:
            raise ProcessorHttpError(f"answered {status}, not 200")
        if not body:
            raise ProcessorHttpError("answered 200 with an empty body")
        try:
            return json_format.Parse(body, ep.ProcessingResponse(), ignore_unknown_fields=True)
        except json_format.ParseError as err:
            raise ProcessorHttpError(f"the body is not a ProcessingResponse: {err}") from None

    def start_pump(self) -> None:
        """Nothing to drain: no answer comes unless a POST asked for it (see the module)."""

    def listen(self) -> None:
        """Nothing comes unasked over HTTP."""

    def ready(self) -> bool:
        return False

    def close(self) -> None:
        # A POST still unanswered (the exchange ended first): its connection cannot be reused.
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
