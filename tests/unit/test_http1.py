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
    conn = chunked_head(pair, b"%x\r\nhello" % MAX_BODY_LENGTH)
    assert conn.read_body(WAIT_S) == (b"hello", False, None)


@pytest.mark.parametrize(
    ("with_head", "after_head"),
    [
        (CHUNKED + b"%x\r\nhello" % (MAX_BODY_LENGTH + 1), b""),
        # The size line after a first chunk: what is left of it is checked, not what was read.
        (CHUNKED + b"5\r\nhello\r\n%x\r\nhello" % (MAX_BODY_LENGTH + 4), b""),
        (
            b"POST /l HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\nhello"
            % (MAX_BODY_LENGTH + 1),
            b"",
        ),
        (CHUNKED, b"%x\r\nhello" % (MAX_BODY_LENGTH + 1)),
    ],
    ids=["chunk-size", "second-chunk-size", "content-length", "chunk-size-after-the-head"],
)
def test_lengths_over_64_bits_are_refused(
    pair: tuple[socket.socket, Http1Connection], with_head: bytes, after_head: bytes
) -> None:
    """With the head they came with (never handed out), or as soon as they come."""
    client, conn = pair
    client.sendall(with_head)
    if after_head:
        assert isinstance(conn.next_event(WAIT_S), h11.Request)
        client.sendall(after_head)
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event(WAIT_S)


def chunked_head(pair: tuple[socket.socket, Http1Connection], body: bytes) -> Http1Connection:
    """The connection once it handed out the head of a chunked request sent with ``body``."""
    client, conn = pair
    client.sendall(CHUNKED + body)
    assert isinstance(conn.next_event(WAIT_S), h11.Request)
    return conn


def test_chunks_parsed_with_the_head_come_out_in_order(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    conn = chunked_head(pair, b"5\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\n")
    # Parsed already: the socket is not read again for them.
    assert conn.h11.their_state is h11.DONE
    assert conn.read_body(WAIT_S) == (b"hello!", False, None)
    assert conn.read_body(WAIT_S) == (b"", False, [(b"x-t", b"1")])


def test_next_event_hands_out_the_parsed_events(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    conn = chunked_head(pair, b"2\r\nok\r\n0\r\n\r\n")
    data = conn.next_event(WAIT_S)
    assert isinstance(data, h11.Data) and data.data == b"ok"
    assert isinstance(conn.poll_event(), h11.EndOfMessage)


def test_the_next_cycle_drops_what_the_last_message_left(
    pair: tuple[socket.socket, Http1Connection],
) -> None:
    conn = chunked_head(pair, b"2\r\nok\r\n0\r\n\r\n")
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]), WAIT_S)
    conn.send(h11.EndOfMessage(), WAIT_S)
    conn.start_next_cycle()  # the body was never taken
    pair[0].sendall(b"POST /n HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nnew")
    request = conn.next_event(WAIT_S)
    assert isinstance(request, h11.Request) and request.target == b"/n"
    assert conn.read_body(WAIT_S) == (b"new", False, None)
