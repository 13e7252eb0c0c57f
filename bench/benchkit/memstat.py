"""Resident memory of a process over time, read from /proc on a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from types import TracebackType

from benchkit.procs import rss_bytes

SAMPLE_INTERVAL_S = 0.1
# The sampler only reads /proc; it stops within one interval, this is a safety margin.
JOIN_TIMEOUT_S = 5.0


class RssSampler:
    """Samples VmRSS of `pid` every `interval` seconds while the `with` block runs.

    A sample is also taken on entry and on exit, so a short block still has two.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic time, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        # The process may have died: the caller sees that from its own I/O, not from here.
        with contextlib.suppress(OSError, RuntimeError):
            self.samples.append((time.monotonic(), rss_bytes(self.pid)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)
        self._sample()

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)
