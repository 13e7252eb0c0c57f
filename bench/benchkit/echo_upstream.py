"""The soak's upstream: check the request body against its checksum header, echo it back.

Run in its own process (``python -m benchkit.echo_upstream PORT``). A request carrying
``x-soak-sha256`` (the SHA-256 of the body the upstream should receive) is answered 200 with
the same body when it matches, 422 with the digest it computed otherwise; the reply is sent
with a Content-Length or chunked, as the request came. One thread per connection, keep-alive.
"""

from __future__ import annotations

import hashlib
import sys

import h11

from benchkit.h11peer import Peer, serve

CHECKSUM_HEADER = b"x-soak-sha256"
CHUNK = 1 << 14


class _Echo(Peer):
    def answer(self, request: h11.Request) -> None:
        body = b"".join(self.body())
        headers = dict(request.headers)
        digest = hashlib.sha256(body).hexdigest().encode()
        expected = headers.get(CHECKSUM_HEADER)
        if expected is not None and expected != digest:
            self._respond(422, digest, chunked=False)
        else:
            self._respond(200, body, chunked=b"transfer-encoding" in headers)

    def _respond(self, status: int, body: bytes, *, chunked: bool) -> None:
        framing = (
            ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body)))
        )
        self.send(h11.Response(status_code=status, headers=[framing]))
        for start in range(0, len(body), CHUNK):
            self.send(h11.Data(data=body[start : start + CHUNK]))
        self.send(h11.EndOfMessage())


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m benchkit.echo_upstream PORT", file=sys.stderr)
        return 2
    serve(int(argv[1]), _Echo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
