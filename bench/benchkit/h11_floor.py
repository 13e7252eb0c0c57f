"""The floors under extproc: the straightforward threaded h11 proxy of issue #8, with and
without an ext_proc stream.

One thread per client connection, one keep-alive upstream connection each, h11 on both sides,
each message read whole and written in one call, and nothing else: no header rewriting, no
timeouts, no stats or logs. The harness pins it to one CPU like the proxies it is compared
with. What any h11 proxy costs per request in CPython on the machine; extproc's CPU minus
this is what extproc itself adds.

With a processor port, each request also opens an ext_proc stream (`benchkit.floor_stream`,
driven from the connection's thread): request headers sent before the upstream is asked,
response headers too with ``both``, the empty replies checked and nothing applied, the
stream half-closed once the response is written.

    python -m benchkit.h11_floor PORT UPSTREAM_PORT [PROCESSOR_PORT request|both]
"""

from __future__ import annotations

import socket
import sys

import h11

from benchkit.floor_stream import Channel, Stream, request_headers, response_headers
from benchkit.h11peer import Peer, read_event, serve


class FloorPeer(Peer):
    upstream_port = 0

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = h11.Connection(h11.CLIENT)

    def answer(self, request: h11.Request) -> None:
        self.relay(request)

    def relay(self, request: h11.Request, stream: Stream | None = None) -> None:
        """Forward ``request`` and its body upstream and the whole response back; ``stream``,
        when given, is sent the response headers."""
        head = h11.Request(method=request.method, target=request.target, headers=request.headers)
        out = [self.client.send(head)]
        out += [self.client.send(h11.Data(data=piece)) for piece in self.body()]
        out.append(self.client.send(h11.EndOfMessage()))
        self.upstream.sendall(b"".join(filter(None, out)))
        reply = []
        while not isinstance(
            event := read_event(self.client, self.upstream, self.read_size), h11.EndOfMessage
        ):
            if isinstance(event, h11.Response):
                if stream is not None:
                    stream.exchange(response_headers(event), "response_headers")
                status, headers, reason = event.status_code, event.headers, event.reason
                reply.append(
                    self.h11.send(h11.Response(status_code=status, headers=headers, reason=reason))
                )
            elif isinstance(event, h11.Data):
                reply.append(self.h11.send(h11.Data(data=event.data)))
            else:
                raise ConnectionError(f"upstream response ended early: {event!r}")
        reply.append(self.h11.send(h11.EndOfMessage()))
        self.sock.sendall(b"".join(filter(None, reply)))
        self.client.start_next_cycle()

    def serve(self) -> None:
        try:
            super().serve()
        finally:
            self.upstream.close()


class StreamFloorPeer(FloorPeer):
    """`FloorPeer` plus an ext_proc stream per request."""

    channel: Channel | None = None
    sends_response_headers = False

    def answer(self, request: h11.Request) -> None:
        assert self.channel is not None, "set before serving"
        with self.channel.stream(request_headers(request)) as stream:
            stream.reply("request_headers")
            self.relay(request, stream if self.sends_response_headers else None)
            stream.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 5) or (len(argv) == 5 and argv[4] not in ("request", "both")):
        print(__doc__.rsplit("\n\n", 1)[-1], file=sys.stderr)
        return 2
    FloorPeer.upstream_port = int(argv[2])
    peer: type[FloorPeer] = FloorPeer
    if len(argv) == 5:
        StreamFloorPeer.channel = Channel(int(argv[3]))
        StreamFloorPeer.sends_response_headers = argv[4] == "both"
        peer = StreamFloorPeer
    serve(int(argv[1]), peer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
