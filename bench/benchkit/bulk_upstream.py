"""An upstream for large bodies: count and discard the request body, answer with N bytes.

Run in its own process (``python -m benchkit.bulk_upstream PORT``) so its CPU and memory are
apart from the proxy's. ``GET|POST /?respond=N`` is answered 200 with an N-byte body
(content-length) and an ``x-bench-received`` header telling how many request body bytes
arrived, so the client can check both directions. One thread per connection, keep-alive.
"""

from __future__ import annotations

import sys
import urllib.parse

import h11

from benchkit.h11peer import Peer, serve

RECEIVED_HEADER = "x-bench-received"
READ_SIZE = 1 << 20
# Built once and sent again and again: generating the body costs nothing per byte.
_BLOCK = memoryview(bytes(range(256)) * (READ_SIZE // 256))


def respond_bytes(target: bytes) -> int:
    """The N of ``/?respond=N`` (0 when absent or malformed)."""
    query = urllib.parse.urlsplit(target.decode("latin-1")).query
    values = urllib.parse.parse_qs(query).get("respond", ["0"])
    return int(values[0]) if values[0].isdigit() else 0


class _Bulk(Peer):
    read_size = READ_SIZE

    def answer(self, request: h11.Request) -> None:
        received = sum(len(piece) for piece in self.body())
        headers = [
            ("content-length", str(length := respond_bytes(request.target))),
            (RECEIVED_HEADER, str(received)),
        ]
        self.send(h11.Response(status_code=200, headers=headers))
        left = length
        while left:
            piece = _BLOCK if left >= len(_BLOCK) else _BLOCK[:left]
            # h11 passes any buffer through uncopied, though its annotation says bytes.
            self.send(h11.Data(data=piece))  # type: ignore[arg-type]
            left -= len(piece)
        self.send(h11.EndOfMessage())


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m benchkit.bulk_upstream PORT", file=sys.stderr)
        return 2
    serve(int(argv[1]), _Bulk)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
