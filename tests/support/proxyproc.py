"""bin/extproc-proxy as a real child process, with its JSON log lines watched as they come,
and systemd's side of sd_notify and socket activation played by the test."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.proxy import REPO

BIN = str(REPO / "bin" / "extproc-proxy")
TIMEOUT = 30.0
# A fresh process answers its first requests while its processor channel still connects; the
# default 200 ms message timeout can expire then on a loaded machine (a 504 no test is about).
COLD_START = ("--message-timeout", "30s")


def proxy_args(upstream: tuple[str, int], processor: str) -> list[str]:
    """The upstream and processor flags, with a message timeout a cold start keeps within."""
    host, port = upstream
    return ["--upstream", f"{host}:{port}", "--processor", processor, *COLD_START]


# Systemd starts the service with the sockets at 3, 4, ... and LISTEN_PID set to the service's
# own pid, which only the process itself can know: this wrapper moves the sockets to 3, 4, ...,
# sets LISTEN_PID to its pid and execs the proxy in place, keeping that pid.
_ACTIVATE = (
    "import fcntl, os, sys\n"
    "fds = [int(fd) for fd in sys.argv[1].split(',')]\n"
    "moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]\n"
    "for fd in fds:\n"
    "    os.close(fd)\n"
    "for i, fd in enumerate(moved):\n"
    "    os.dup2(fd, 3 + i)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.environ['LISTEN_FDS'] = str(len(fds))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ProxyProcess:
    """The proxy with ``args``; ``activate`` passes those listening sockets systemd's way,
    ``pass_fds`` passes descriptors as they are."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        activate: Sequence[socket.socket] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        command = [BIN, *args]
        if activate:
            fds = [sock.fileno() for sock in activate]
            listed = ",".join(map(str, fds))
            command = [sys.executable, "-c", _ACTIVATE, listed, *command]
            pass_fds = (*pass_fds, *fds)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            pass_fds=pass_fds,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log record named ``event`` so far."""
        with self._changed:
            lines = list(self.lines)
        found = []
        for line in lines:
            if f'"{event}"' in line:
                record = json.loads(line)
                if record.get("event") == event:
                    found.append(record)
        return found

    def wait_event(self, event: str, count: int = 1, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The ``count``-th record named ``event``, once it is logged."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(found := self.events(event)) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count}x {event!r} in:\n" + "".join(self.lines))
                self._changed.wait(min(left, 1.0))
        return found[count - 1]

    def port(self) -> int:
        address = self.wait_event("listening")
        return int(str(address["address"]).rsplit(":", 1)[1])

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def log(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NotifySocket:
    """systemd's end of sd_notify: a datagram socket at a path in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[str] = []

    def next(self, timeout: float = TIMEOUT) -> str:
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.received.append(message)
        return message

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The next message matching ``pattern`` (others are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if re.search(pattern, message):
                return message
        raise AssertionError(f"no {pattern!r} in {self.received}")

    def close(self) -> None:
        self.sock.close()


def listening_socket() -> socket.socket:
    """A listening socket on 127.0.0.1:0, as a .socket unit would hold it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock
