"""Http1Connection over a real socket pair: body lengths beyond 64 bits, and the chunked body
bytes parsed with their head."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import h11
import pytest

from extproc.io.http1 import MAX_BODY_LENGTH, Http1Connection

WAIT_S = 5.0
CHUNKED = b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Http1Connection]]:
    client, server = socket.socketpair()
    conn = Http1Connection(server, h11.SERVER, max_head_bytes=65536)
    try:
        yield client, conn
    finally:
        client.close()
        conn.close()


def test_largest_lengths_are_taken(pair: tuple[socket.socket, Http1Connection]) -> None:
    client, conn = pair
    size = b"%x" % MAX_BODY_LENGTH
    client.sendall(CHUNKED + size + b"\r\nhello")
    assert isinstance(conn.next_event(WAIT_S), h11.Request)
    assert conn.read_body(WAIT_S) == (b"hello", False, None)


@pytest.mark.parametrize(
    "data",
    [
        CHUNKED + b"%x\r\nhello" % (MAX_BODY_LENGTH + 1),
        # The size line after a first chunk: what is left of it is checked, not what was read.
        CHUNKED + b"5\r\nhello\r\n%x\r\nhello" % (MAX_BODY_LENGTH + 4),
        b"POST /l HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\nhello" % (MAX_BODY_LENGTH + 1),
    ],
    ids=["chunk-size", "second-chunk-size", "content-length"],
)
def test_lengths_over_64_bits_are_refused_with_the_head(
    pair: tuple[socket.socket, Http1Connection], data: bytes
) -> None:
    client, conn = pair
    client.sendall(data)
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event(WAIT_S)


def test_a_size_line_after_the_head_is_refused_when_read(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    client, conn = pair
    client.sendall(CHUNKED)
    assert isinstance(conn.next_event(WAIT_S), h11.Request)
    client.sendall(b"%x\r\nhello" % (MAX_BODY_LENGTH + 1))
    with pytest.raises(h11.RemoteProtocolError):
        conn.read_body(WAIT_S)


def test_chunks_parsed_with_the_head_come_out_in_order(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    client, conn = pair
    client.sendall(CHUNKED + b"5\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\n")
    assert isinstance(conn.next_event(WAIT_S), h11.Request)
    # Parsed already: the socket is not read again for them.
    assert conn.h11.their_state is h11.DONE
    assert conn.read_body(WAIT_S) == (b"hello!", False, None)
    assert conn.read_body(WAIT_S) == (b"", False, [(b"x-t", b"1")])


def test_next_event_hands_out_the_parsed_events(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    client, conn = pair
    client.sendall(CHUNKED + b"2\r\nok\r\n0\r\n\r\n")
    assert isinstance(conn.next_event(WAIT_S), h11.Request)
    data = conn.next_event(WAIT_S)
    assert isinstance(data, h11.Data) and data.data == b"ok"
    assert isinstance(conn.poll_event(), h11.EndOfMessage)


def test_the_next_cycle_drops_what_the_last_message_left(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    client, conn = pair
    client.sendall(CHUNKED + b"2\r\nok\r\n0\r\n\r\n")
    assert isinstance(conn.next_event(WAIT_S), h11.Request)
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]), WAIT_S)
    conn.send(h11.EndOfMessage(), WAIT_S)
    conn.start_next_cycle()  # the body was never taken
    client.sendall(b"POST /n HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nnew")
    request = conn.next_event(WAIT_S)
    assert isinstance(request, h11.Request) and request.target == b"/n"
    assert conn.read_body(WAIT_S) == (b"new", False, None)
