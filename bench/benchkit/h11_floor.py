"""The floor under extproc's proxy-only row: the straightforward threaded h11 proxy of issue #8.

One thread per client connection, one keep-alive upstream connection each, h11 on both sides,
each message read whole and written in one call, pinned to one CPU like `--cpu-affinity`, and
nothing else: no ext_proc, no header rewriting, no timeouts, no stats or logs. What any h11
proxy costs per request in CPython on the machine; extproc's proxy-only CPU minus this is
what extproc itself adds.

    python -m benchkit.h11_floor PORT UPSTREAM_PORT
"""

from __future__ import annotations

import os
import socket
import sys

import h11

from benchkit.h11peer import Peer, read_event, serve


class FloorPeer(Peer):
    upstream_port = 0

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = h11.Connection(h11.CLIENT)

    def answer(self, request: h11.Request) -> None:
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


if __name__ == "__main__":
    FloorPeer.upstream_port = int(sys.argv[2])
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    serve(int(sys.argv[1]), FloorPeer)
