"""An ext_proc processor in a process of its own, so a test can kill it for real (SIGKILL).

Run as ``python -m tests.support.processor_process NAME [--hold]``: it prints ``port N`` once
it serves on 127.0.0.1, then tags every request it sees with ``x-served-by: NAME``. With
``--hold`` it answers nothing: each stream's request headers are held (and ``held`` printed)
until the client ends the stream. It accepts keepalive pings as often as they come.

:class:`ProcessorProcess` is the test side: start, read the port, count held streams, kill.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, Self

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.support.processor import matching_reply, mutate_headers

REPO = Path(__file__).resolve().parents[2]
_START_TIMEOUT = 30.0
# Pings every few hundred milliseconds must not be refused as abuse (GOAWAY too_many_pings).
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10),
    ("grpc.http2.max_ping_strikes", 0),
]


class _Tagging:
    """Duck-typed ExternalProcessorServicer."""

    def __init__(self, name: str, hold: bool) -> None:
        self.tag = mutate_headers(set_headers=[("x-served-by", name)])
        self.hold = hold

    def Process(  # noqa: N802 - the gRPC method name
        self, requests: Iterator[ep.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[ep.ProcessingResponse]:
        for request in requests:
            if request.WhichOneof("request") == "request_headers":
                if self.hold:
                    print("held", flush=True)
                    for _ in requests:  # until the client half-closes or cancels
                        pass
                    return
                yield matching_reply(request, self.tag)
            else:
                yield matching_reply(request)


def main() -> None:
    name, hold = sys.argv[1], "--hold" in sys.argv[2:]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=SERVER_OPTIONS)
    ep_grpc.add_ExternalProcessorServicer_to_server(_Tagging(name, hold), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=None))
    server.wait_for_termination()


class ProcessorProcess:
    """The processor above, run by a test."""

    def __init__(
        self, name: str, *, hold: bool = False, module: str = "tests.support.processor_process"
    ) -> None:
        """``module``: another processor run the same way (it prints ``port N`` first)."""
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", module, name]
        self._proc = subprocess.Popen(
            [*args, "--hold"] if hold else args,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.held = 0
        line = self._next_line(_START_TIMEOUT)
        if not line.startswith("port "):
            self.kill()
            raise RuntimeError(f"processor {name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _next_line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"processor {self.name}: no output in {timeout}s") from None
        if line is None:
            raise RuntimeError(f"processor {self.name} exited")
        return line

    def wait_held(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` streams in all are held (a ``--hold`` processor)."""
        while self.held < n:
            if self._next_line(timeout) == "held":
                self.held += 1

    def kill(self) -> None:
        """SIGKILL: the host is gone, its connections reset by the kernel."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(10)
        self._reader.join(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


if __name__ == "__main__":
    main()
