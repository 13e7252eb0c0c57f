"""Pieces the operations tests share: a processor that records what each stream saw and can
hold a request, client load on keep-alive connections, and reading the admin listener."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field

from tests.support.processor import ProcessorStream, header_value, matching_reply
from tests.support.proxy import Client

HOLD_PATH = b"/hold"
# Below pytest-timeout (60 s), so a stuck wait fails with its own message.
WAIT = 30.0


@dataclass
class Recorder:
    """Answers CONTINUE to everything, records (path, message kinds) per stream, and keeps a
    request for ``HOLD_PATH`` waiting in its request headers until ``release`` is set."""

    streams: list[tuple[bytes, list[str]]] = field(default_factory=list)
    held: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stream: ProcessorStream) -> None:
        path, kinds = b"", []
        while (message := stream.recv(WAIT)) is not None:
            kind = str(message.WhichOneof("request"))
            kinds.append(kind)
            if kind == "request_headers":
                path = header_value(message.request_headers.headers, ":path") or b""
                if path.startswith(HOLD_PATH):
                    self.held.release()
                    self.release.wait(WAIT)
            stream.send(matching_reply(message))
        with self.lock:
            self.streams.append((path, kinds))

    def kinds(self, path: bytes) -> list[list[str]]:
        with self.lock:
            return [kinds for p, kinds in self.streams if p == path]

    def wait_held(self, count: int, timeout: float = WAIT) -> None:
        for _ in range(count):
            assert self.held.acquire(timeout=timeout), "a held request never reached us"


class Load:
    """``clients`` threads sending GETs on keep-alive connections until stopped; every reply
    status is kept, and any failure (an exception) too."""

    def __init__(self, address: tuple[str, int], clients: int = 4) -> None:
        self.address = address
        self.statuses: list[int] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        try:
            with Client(self.address, timeout=WAIT) as client:
                n = 0
                while not self._stop.is_set():
                    reply = client.request("GET", f"/load/{index}/{n}")
                    n += 1
                    with self._progress:
                        self.statuses.append(reply.status)
                        self._progress.notify_all()
        except BaseException as err:  # noqa: BLE001 - kept for the test to report
            with self._progress:
                self.failures.append(err)
                self._progress.notify_all()

    def wait_count(self, count: int, timeout: float = WAIT) -> None:
        """Until ``count`` more replies than now have come back."""
        with self._progress:
            target = len(self.statuses) + count
            assert self._progress.wait_for(
                lambda: len(self.statuses) >= target or bool(self.failures), timeout
            ), f"{len(self.statuses)} replies, wanted {target}"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)


def admin_stats(port: int) -> dict[str, float]:
    """The admin listener's /stats?format=json, counters and gauges by name."""
    url = f"http://127.0.0.1:{port}/stats?format=json"
    with urllib.request.urlopen(url, timeout=WAIT) as reply:
        stats = json.load(reply)["stats"]
    return {s["name"]: s["value"] for s in stats if "name" in s}


def admin_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as reply:
        return str(reply.read().decode())
