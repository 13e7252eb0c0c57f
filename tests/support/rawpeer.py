"""Raw-socket peers that misbehave on purpose (urllib3's socket_handler idea)."""

from __future__ import annotations

import socket
import threading


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
